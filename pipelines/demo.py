"""The embedded demo (`make demo`): teacher -> pool -> selection -> shards -> student -> report.

1. Train a BatchNorm CNN teacher on Fashion-MNIST train[0:50000] (digits when Fashion-MNIST is absent).
2. Score a heterogeneous pool: the unseen rest of the teacher's data among MNIST, digits, rendered glyphs,
   photo crops, dead leaves, shader-like patterns and noise; build the FAISS index.
3. Print, per source, how related the teacher finds it, and how well each score separates the teacher's
   own domain from the rest (AUROC, that domain positive).
4. Select a class-balanced top-per-class subset, export it as WebDataset shards with the teacher's soft
   labels, distill a smaller student from them, evaluate it on the test set, and write the report.

Everything lands under work/demo/; rerunning resumes (the teacher is kept, scored units are skipped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import duckdb
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from curate.export import ExportConfig, export
from curate.generated import FASHION_CLASSES, FASHION_DIR, _digits, _fashion
from curate.index import index
from curate.report import report
from curate.score import ScoreConfig, score
from curate.select import SelectConfig, select
from distill import models
from distill.evaluate import evaluate
from distill.train import FitConfig, TrainConfig, accuracy, fit_arrays, to_input, train

out = Console()


def train_teacher(path: Path, fashion: bool, steps: int) -> None:
    if fashion:
        x, y = _fashion("train")
        x_test, y_test = _fashion("test")
        x, y, classes = x[:50000], y[:50000], FASHION_CLASSES
        spec = models.InputSpec(28, 1, (0.286,), (0.353,))
    else:
        x_all, y_all = _digits()
        x, y, x_test, y_test = x_all[:1500], y_all[:1500], x_all[1500:], y_all[1500:]
        classes, spec = [str(i) for i in range(10)], models.InputSpec(8, 1, (0.25,), (0.35,))
    torch.manual_seed(0)
    model, factory, kwargs = models.build("cnn-small", 10, spec)
    t = time.perf_counter()
    with out.status(f"training the teacher ({steps} steps)"):
        fit_arrays(model, to_input(x, spec), torch.from_numpy(y), FitConfig(steps=steps, batch_size=128))
    acc = accuracy(model, to_input(x_test, spec), torch.from_numpy(y_test))
    out.print(f"teacher: cnn-small, test accuracy {acc:.1%}, trained in {time.perf_counter() - t:.0f} s")
    models.save_checkpoint(path, model, factory, kwargs, list(classes), spec, extra={"test_accuracy": acc})


def pool_sources(fashion: bool) -> tuple[list[str], str]:
    related = "fashion=builtin:fashion-mnist?split=train&start=50000" if fashion else "digits=builtin:digits?start=1500"
    others = [
        "mnist=builtin:mnist",
        "glyphs=synthetic:glyphs?n=3000&size=28",
        "photos=builtin:photos?n=3000&size=28",
        "leaves=synthetic:dead-leaves?n=3000&size=28",
        "shaders=synthetic:shaders?n=3000&size=28",
        "noise=synthetic:noise?n=3000&size=28",
    ]
    if fashion:
        others.insert(1, "digits=builtin:digits")
    return [related, *others], related.split("=")[0]


def summarise(pool: Path, related: str) -> None:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{pool}/samples/*/*.parquet', hive_partitioning=1)")
    t = Table(title="pool by source (every score: higher = more related to the teacher's task)")
    for c in ("source", "rows", "confidence", "energy", "bn_score", "top predicted class"):
        t.add_column(c, justify="left" if c in ("source", "top predicted class") else "right")
    rows = con.execute(
        "SELECT source, count(*), avg(confidence), avg(energy), avg(bn_score), mode(pred) FROM samples "
        "GROUP BY source ORDER BY avg(confidence) DESC"
    ).fetchall()
    classes = models.load(str(pool.parent / "teacher.pt")).classes
    for s, n, conf, en, bn, pred in rows:
        bn_text = f"{bn:.2f}" if bn is not None else "-"
        t.add_row(s, f"{n:,}", f"{conf:.3f}", f"{en:.2f}", bn_text, classes[pred])
    out.print(t)
    data = con.execute("SELECT source, confidence, margin, entropy, energy, max_logit, bn_score, feat_norm, "
                       "proj_score FROM samples").fetchnumpy()  # fmt: skip
    pos = data["source"] == related
    t = Table(title=f"AUROC: '{related}' (positive) vs the rest of the pool")
    t.add_column("score")
    t.add_column("AUROC", justify="right")
    for col in [c for c in data if c != "source"]:
        v = np.asarray(data[col], float)
        ranks = np.argsort(np.argsort(v)) + 1.0
        auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
        t.add_row(col, f"{auc:.3f}")
    out.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work/demo", help="output directory (default work/demo)")
    ap.add_argument("--steps", type=int, default=800, help="teacher training steps")
    ap.add_argument("--student-steps", type=int, default=1000, help="student distillation steps")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fashion = (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()
    if not fashion:
        out.print("[yellow]Fashion-MNIST not installed: the demo uses scikit-learn's digits as the teacher's task")
    teacher = work / "teacher.pt"
    if not teacher.exists():
        train_teacher(teacher, fashion, args.steps)
    sources, related = pool_sources(fashion)
    res = score(ScoreConfig(teacher=str(teacher), sources=sources, pool=str(work / "pool")))
    out.print(f"scored {res.rows:,} new samples in {res.seconds:.0f} s (error rate {res.error_rate:.2%})")
    idx = index(str(work / "pool"))
    out.print(f"index: {idx.kind} ({idx.factory}), {idx.rows:,} vectors, recall@10 {idx.recall_at_10:.3f}")
    summarise(work / "pool", related)
    distill_student(work, fashion, args.student_steps)


def distill_student(work: Path, fashion: bool, steps: int) -> None:
    pool = str(work / "pool")
    sel = select(SelectConfig(pool=pool, out=str(work / "selection"), strategy="top-per-class",
                              per_class=1000 if fashion else 30, score="energy"))  # fmt: skip
    out.print(f"selection: {sel.rows:,} samples, by source {sel.per_source}, class entropy {sel.rel_entropy:.3f}")
    shards = export(ExportConfig(out=str(work / "shards"), pool=pool, selection=str(work / "selection"),
                                 shard_size=2000, show_progress=False))  # fmt: skip
    test = "test=builtin:fashion-mnist?split=test" if fashion else "test=builtin:digits?start=1500"
    export(ExportConfig(out=str(work / "test-shards"), sources=[test], shard_size=5000, show_progress=False))
    out.print(f"shards: {shards.samples:,} samples in {shards.shards} shards ({shards.bytes / 2**20:.1f} MiB)")
    run = work / "student"
    if not (run / "student.pt").exists():
        train(TrainConfig(shards=str(work / "shards"), out=str(run), student="cnn-tiny", steps=steps,
                          batch_size=128, eval=str(work / "test-shards"), eval_every=max(1, steps // 4),
                          resume=(run / "checkpoint.pt").exists()))  # fmt: skip
    res = evaluate(str(run), str(work / "test-shards"))
    teacher_acc = models.load(str(work / "teacher.pt")).describe()
    rep = report(pool, str(work / "report"), selection=str(work / "selection"))
    out.print(
        f"\nstudent (cnn-tiny, {steps} steps on {sel.rows:,} selected samples): test accuracy "
        f"{res['accuracy']:.1%}\nteacher: {work / 'teacher.pt'} ({teacher_acc['num_classes']} classes)\n"
        f"student: {run / 'student.pt'}\nreport:  {rep.html}\n"
        f"pool:    {pool}  (query it: curate sql {pool} 'SELECT source, count(*) FROM samples GROUP BY source')"
    )


if __name__ == "__main__":
    main()

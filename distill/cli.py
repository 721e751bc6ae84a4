"""`distill`: the typer layer over distill.train.train, distill.finetune.finetune and distill.evaluate.evaluate.
Each command's options are its config's fields (distill/config.py). Results go to stdout, progress to stderr."""

from __future__ import annotations

import typer

from distill import config
from kdcore.errors import run_app
from kdcore.options import command

app = typer.Typer(
    help="Train a student from WebDataset shards of teacher soft labels, and evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print(text: str) -> None:
    from rich.console import Console

    Console().print(text, markup=False, highlight=False)


def _train(cfg: config.TrainConfig) -> None:
    from distill.train import train

    res = train(cfg)
    note = f" (resumed at step {res.resumed_from})" if res.resumed_from else ""
    final = ", ".join(f"{k} {v:.4f}" for k, v in res.final.items() if k in ("accuracy", "agreement"))
    _print(f"{res.steps} steps{note} in {res.seconds:.1f} s; {final or 'no --eval'} -> {res.out}/student.pt")


command(
    app,
    config.TrainConfig,
    _train,
    "train",
    """Distill a student from shards written by 'curate export'.

Offline (default), the soft labels stored in the shards are the targets. With --teacher, the teacher
runs on every augmented or mixed view (online); --online-fraction keeps the stored labels for plain
batches and pays for the teacher only on the augmented ones. Under torchrun this is data-parallel
(DDP): shards are split by rank, rank 0 writes.

\b
Examples:
  distill train shards/ --out runs/s1 --steps 3000 --eval eval-shards/
  distill train 's3://bucket/shards/shard-{000000..000099}.tar' --out runs/s2 --epochs 5
  distill train shards/ --out runs/s3 --steps 3000 --teacher work/demo/teacher/run --crop 2 --mixup 0.4
  distill train labelled/ --out runs/teacher --loss ce --labels true --epochs 10 --student cnn
  torchrun --nproc_per_node 2 -m distill train shards/ --out runs/ddp --steps 3000
""",
)


def _finetune(cfg: config.FinetuneConfig) -> None:
    from distill.finetune import finetune

    res = finetune(cfg)
    msg = f"{res['samples']} labelled samples, {cfg.steps} steps -> {res['out']}/student.pt"
    if "accuracy" in res:
        msg += f"; accuracy {res['accuracy_before']:.4f} -> {res['accuracy']:.4f}"
    _print(msg)


command(
    app,
    config.FinetuneConfig,
    _finetune,
    "finetune",
    """Fine-tune a distilled student on a few labelled samples
per class at a low learning rate.

\b
Example:
  curate export --source 'few=folder:/data/labelled?labels=dirs' --out few-shards/
  distill finetune runs/s1 --data few-shards/ --per-class 10 --eval test-shards/
""",
)


def _eval(cfg: config.EvalConfig) -> None:
    from distill.evaluate import evaluate

    res = evaluate(cfg)
    if "accuracy" in res:
        _print(f"accuracy {res['accuracy']:.4f} on {res['samples']:,} labelled samples")
        worst = sorted(res["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
        _print("weakest classes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))
    if "agreement" in res:
        _print(f"agreement with the teacher {res['agreement']:.4f} on {res['teacher_samples']:,} samples")


command(
    app,
    config.EvalConfig,
    _eval,
    "eval",
    """Accuracy against true labels (per class, confusion matrix) and
agreement with the teacher's soft labels; writes eval.json and confusion.png into the run.

\b
Example:
  distill eval runs/s1 --data eval-shards/
""",
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

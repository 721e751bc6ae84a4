"""`distill`: the typer layer over distill.train.train, distill.finetune.finetune and distill.evaluate.evaluate.
Each command's options are its config's fields (distill/config.py). Results go to stdout, progress to stderr; with
--json stdout holds one JSON object, the command's result (kdcore.output)."""

from __future__ import annotations

import os
from typing import Any

import typer

from distill import config
from kdcore.errors import run_app
from kdcore.options import command
from kdcore.output import console, jsonable

app = typer.Typer(
    help="Train a student from WebDataset shards of teacher soft labels, and evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print(text: str) -> None:
    console().print(text, markup=False, highlight=False)


def _train(cfg: config.TrainConfig) -> dict[str, Any] | None:
    from distill.train import train

    res = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # under torchrun, rank 0 speaks for the run
    return {**jsonable(res), "student": f"{res.out}/student.pt"}


def _show_train(d: dict[str, Any]) -> None:
    note = f" (resumed at step {d['resumed_from']})" if d["resumed_from"] else ""
    final = ", ".join(f"{k} {v:.4f}" for k, v in d["final"].items() if k in ("accuracy", "agreement") and v is not None)
    _print(f"{d['steps']} steps{note} in {d['seconds']:.1f} s; {final or 'no --eval'} -> {d['student']}")


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
    show=_show_train,
)


def _finetune(cfg: config.FinetuneConfig) -> dict[str, Any]:
    from distill.finetune import finetune

    res = finetune(cfg)
    return jsonable({**res, "steps": cfg.steps, "student": f"{res['out']}/student.pt"})


def _show_finetune(d: dict[str, Any]) -> None:
    msg = f"{d['samples']} labelled samples, {d['steps']} steps -> {d['student']}"
    if d.get("accuracy") is not None and d.get("accuracy_before") is not None:
        msg += f"; accuracy {d['accuracy_before']:.4f} -> {d['accuracy']:.4f}"
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
    show=_show_finetune,
)


def _eval(cfg: config.EvalConfig) -> dict[str, Any]:
    from distill.evaluate import evaluate

    res = evaluate(cfg)  # the confusion matrix stays in the file evaluate writes
    return jsonable({k: v for k, v in res.items() if k != "confusion"})


def _show_eval(res: dict[str, Any]) -> None:
    if res.get("accuracy") is not None:
        _print(f"accuracy {res['accuracy']:.4f} on {res['samples']:,} labelled samples")
        worst = sorted(res.get("per_class_accuracy", {}).items(), key=lambda kv: kv[1] if kv[1] is not None else 1)[:3]
        if worst:
            _print("weakest classes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst if v is not None))
    if res.get("top5_accuracy") is not None:
        _print(f"top-5 accuracy {res['top5_accuracy']:.4f}")
    if res.get("note"):
        _print(res["note"])
    if res.get("agreement") is not None:
        _print(f"agreement with the teacher {res['agreement']:.4f} on {res['teacher_samples']:,} samples")
    extra = [
        f"{label} {res[k]:.4f}"
        for k, label in (("top5_agreement", "top-5 agreement"), ("kl_to_teacher", "KL to the teacher"))
        if res.get(k) is not None
    ]
    if extra:
        _print(", ".join(extra))
    if res.get("file"):
        _print(f"-> {res['file']} (index: eval.json)")


command(
    app,
    config.EvalConfig,
    _eval,
    "eval",
    """Top-1/top-5 accuracy against true labels (per class, confusion
matrix; a set holding some of the student's classes is evaluated on those), and top-1/top-5 agreement and
KL with the teacher: its soft labels in the shards, or --teacher run here on the student's view (unlabelled
shards, a folder of images). One result per data set: RUN/eval/NAME.json, indexed in RUN/eval.json.

\b
Examples:
  distill eval runs/s1 --data eval-shards/
  distill eval s3://bucket/runs/s1 --data photos/ --teacher work/demo/teacher/run
""",
    show=_show_eval,
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

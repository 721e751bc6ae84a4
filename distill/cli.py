"""`distill`: the typer layer over distill.train.train and distill.evaluate.evaluate."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from distill.models import ZOO, SpecError

app = typer.Typer(
    help="Train a student from WebDataset shards of teacher soft labels, and evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.command()
def train(
    shards: str = typer.Argument(..., help="Shard directory (with manifest.json) or a brace pattern of tars."),
    out: str = typer.Option(..., help="Run directory: student.pt, checkpoint.pt, metrics.jsonl, curves.png."),
    student: str = typer.Option("cnn-small", help=f"Student from the zoo: {', '.join(ZOO)}."),
    steps: int = typer.Option(None, help="Optimizer steps (or give --epochs)."),
    epochs: float = typer.Option(None, help="Passes over the shards (or give --steps)."),
    batch_size: int = typer.Option(128, help="Samples per step and rank."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (linear warm-up, then cosine to 0)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd (momentum 0.9, Nesterov)."),
    loss: str = typer.Option("kd", help="kd (T²·KL), ce (on the teacher's argmax or true labels) or kd+ce."),
    temperature: float = typer.Option(4.0, help="Softmax temperature T of kd."),
    alpha: float = typer.Option(0.9, help="kd+ce: weight of kd."),
    labels: str = typer.Option("teacher", help="teacher, or true to train on true labels (a teacher, a baseline)."),
    topk_classes: int = typer.Option(None, help="Class-dropping: keep the teacher's top-K classes, renormalised."),
    weights: bool = typer.Option(True, help="Multiply each sample's loss by its selection weight."),
    eval: str = typer.Option(None, help="Labelled shards to evaluate on every --eval-every steps."),
    eval_every: int = typer.Option(500, help="Steps between evaluations."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: int = typer.Option(2, help="Loader worker processes (decode)."),
    shuffle_buffer: int = typer.Option(5000, help="Samples in the shuffle buffer."),
    flip: bool = typer.Option(False, help="Random horizontal flips (only where a flip keeps the soft label valid)."),
    teacher: str = typer.Option(
        None, help="Online teacher (any teacher spec, as for 'curate score'): it labels each augmented/mixed view."
    ),
    online_fraction: float = typer.Option(
        1.0, help="With stored soft labels: share of steps that augment and ask --teacher (the rest reuse them)."
    ),
    crop: int = typer.Option(0, help="Random crop after zero-padding by this many pixels (0: off)."),
    randaugment: bool = typer.Option(False, help="RandAugment (2 ops, magnitude 9), one draw per group of samples."),
    mixup: float = typer.Option(0.0, help="Mixup with lambda ~ Beta(A, A) (0: off)."),
    cutmix: float = typer.Option(0.0, help="CutMix with lambda ~ Beta(A, A) (0: off; with --mixup, one per step)."),
    feature_weight: float = typer.Option(0.0, help="FitNets term: L2 between projected student and teacher features."),
    feature_layers: str = typer.Option("auto", help="STUDENT_LAYER:TEACHER_LAYER for --feature-weight, or auto."),
    rkd_distance: float = typer.Option(0.0, help="Weight of the RKD distance term on the penultimate embeddings."),
    rkd_angle: float = typer.Option(0.0, help="Weight of the RKD angle term on the penultimate embeddings."),
    init: str = typer.Option(None, help="Start from these weights (a student.pt or run directory)."),
    seed: int = typer.Option(0, help="Seed of initialisation and data order."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Distill a student from shards written by 'curate export'.

    Offline (default), the soft labels stored in the shards are the targets. With --teacher, the teacher
    runs on every augmented or mixed view (online); --online-fraction keeps the stored labels for plain
    batches and pays for the teacher only on the augmented ones. Under torchrun this is data-parallel
    (DDP): shards are split by rank, rank 0 writes.

    \b
    Examples:
      distill train shards/ --out runs/s1 --steps 3000 --eval eval-shards/
      distill train shards/ --out runs/s2 --steps 3000 --teacher work/demo/teacher/run --crop 2 --mixup 0.4
      distill train labelled/ --out runs/teacher --loss ce --labels true --epochs 10 --student cnn
      torchrun --nproc_per_node 2 -m distill train shards/ --out runs/ddp --steps 3000
    """
    from distill.train import TrainConfig
    from distill.train import train as run

    res = run(
        TrainConfig(
            shards=shards, out=out, student=student, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, optimizer=optimizer, loss=loss, temperature=temperature, alpha=alpha,
            labels=labels, topk_classes=topk_classes, weights=weights, eval=eval, eval_every=eval_every,
            checkpoint_every=checkpoint_every, device=device, workers=workers, shuffle_buffer=shuffle_buffer,
            flip=flip, teacher=teacher, online_fraction=online_fraction, crop=crop, randaugment=randaugment,
            mixup=mixup, cutmix=cutmix, feature_weight=feature_weight, feature_layers=feature_layers,
            rkd_distance=rkd_distance, rkd_angle=rkd_angle, init=init, seed=seed, resume=resume,
            show_progress=progress,
        )
    )  # fmt: skip
    note = f" (resumed at step {res.resumed_from})" if res.resumed_from else ""
    final = ", ".join(f"{k} {v:.4f}" for k, v in res.final.items() if k in ("accuracy", "agreement"))
    Console().print(f"{res.steps} steps{note} in {res.seconds:.1f} s; {final or 'no --eval'} -> {res.out}/student.pt")


@app.command()
def finetune(
    run: str = typer.Argument(..., help="A run directory (or student.pt) to start from."),
    data: str = typer.Option(..., help="Labelled shards; --per-class samples of each class are used."),
    out: str = typer.Option(None, help="Where the fine-tuned run goes (default: RUN/finetune)."),
    per_class: int = typer.Option(10, help="Labelled samples per class (drawn with --seed)."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    lr: float = typer.Option(3e-4, help="Learning rate: about a tenth of distillation's."),
    batch_size: int = typer.Option(64, help="Samples per step."),
    crop: int = typer.Option(2, help="Random-crop padding (0: off)."),
    flip: bool = typer.Option(False, help="Random horizontal flips."),
    freeze_bn: bool = typer.Option(
        True, help="Keep BatchNorm's running statistics (a few samples per class would overwrite them)."
    ),
    eval: str = typer.Option(None, help="Labelled shards to evaluate on before and after."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed of the labelled draw and of the batches."),
) -> None:
    """Fine-tune a distilled student on a few labelled samples per class at a low learning rate.

    \b
    Example:
      curate export --source 'few=folder:/data/labelled?labels=dirs' --out few-shards/
      distill finetune runs/s1 --data few-shards/ --per-class 10 --eval test-shards/
    """
    from distill.finetune import FinetuneConfig
    from distill.finetune import finetune as run_finetune

    res = run_finetune(FinetuneConfig(run=run, data=data, out=out, per_class=per_class, steps=steps, lr=lr,
                                      batch_size=batch_size, crop=crop, flip=flip, freeze_bn=freeze_bn, eval=eval,
                                      device=device, seed=seed))  # fmt: skip
    msg = f"{res['samples']} labelled samples, {steps} steps -> {res['out']}/student.pt"
    if "accuracy" in res:
        msg += f"; accuracy {res['accuracy_before']:.4f} -> {res['accuracy']:.4f}"
    Console().print(msg)


@app.command("eval")
def eval_(
    run: str = typer.Argument(..., help="Run directory (or a student.pt)."),
    data: str = typer.Option(..., help="Labelled shards (directory or brace pattern)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(512, help="Samples per batch."),
    workers: int = typer.Option(2, help="Loader worker processes."),
) -> None:
    """Accuracy, per-class accuracy, confusion matrix (PNG) and agreement with the teacher; writes eval.json.

    \b
    Example:
      distill eval runs/s1 --data eval-shards/
    """
    from distill.evaluate import evaluate

    res = evaluate(run, data, device=device, batch_size=batch_size, workers=workers)
    console = Console()
    if "accuracy" in res:
        console.print(f"accuracy {res['accuracy']:.4f} on {res['samples']:,} samples")
        worst = sorted(res["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
        console.print("weakest classes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))
    if "agreement" in res:
        console.print(f"agreement with the teacher {res['agreement']:.4f}")


def main() -> None:
    try:
        app()
    except (SpecError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

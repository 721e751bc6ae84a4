"""The configs of the distill commands: each option declared once, with its help text. `distill`'s CLI
options and the pipeline's TOML keys are derived from these fields (kdcore.options)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdcore.errors import UserError
from kdcore.options import option

PROGRESS = "the pipeline's own --progress"
WORK = "the job's work directory"


def check_numbers(cfg: object, *, positive: tuple[str, ...] = (), at_least_one: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = (), unit: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The one check of numeric options (None: not given): > 0, >= 1, >= 0, in [0, 1]. Messages name the option."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for names, ok, rule in ((positive, lambda v: v > 0, "must be > 0"),
                            (at_least_one, lambda v: v >= 1, "must be at least 1"),
                            (non_negative, lambda v: v >= 0, "must be >= 0"),
                            (unit, lambda v: 0 <= v <= 1, "must be in [0, 1]")):  # fmt: skip
        for name in names:
            value = getattr(cfg, name)
            if value is not None and (value != value or not ok(value)):  # NaN fails every rule
                raise UserError(f"{flag(name)} {rule}, got {value}")


@dataclass
class TrainConfig:
    shards: str = option(
        help="Shard directory (with manifest.json), a brace pattern of tars, or their URLs (s3://, http(s)://, pipe:).",
        positional=True,
        toml_reason="the job's [export] stage",
    )
    out: str = option(help="Run directory: student.pt, checkpoint.pt, metrics.jsonl, curves.png.", toml_reason=WORK)
    manifest: str | None = option(None, "The shards' manifest.json, when it is not beside them (pipe: shards).",
                                  toml_reason="the job's [export] stage")  # fmt: skip
    student: str = option("cnn-small", "Student from the zoo: cnn-tiny, cnn-small, cnn, cnn-wide, mlp, resnet18, "
                          "mobilenet_v2, shufflenet_v2.")  # fmt: skip
    steps: int | None = option(None, "Optimizer steps (or give --epochs).")
    epochs: float | None = option(None, "Passes over the shards (or give --steps).")
    batch_size: int = option(128, "Samples per step and rank.")
    lr: float = option(3e-3, "Peak learning rate (linear warm-up, then cosine to 0).")
    weight_decay: float = option(5e-4, "Weight decay.")
    optimizer: str = option("adamw", "adamw or sgd (momentum 0.9, Nesterov).")
    warmup: float = option(0.03, "Share of the steps spent warming the learning rate up.")
    loss: str = option("kd", "kd (T²·KL), ce (on the teacher's argmax or true labels) or kd+ce.")
    temperature: float = option(4.0, "Softmax temperature T of kd.")
    alpha: float = option(0.9, "kd+ce: weight of kd.")
    labels: str = option("teacher", "teacher, or true to train on true labels (a teacher, a baseline).")
    topk_classes: int | None = option(None, "Class-dropping: keep the teacher's top-K classes, renormalised.")
    weights: bool = option(True, "Multiply each sample's loss by its selection weight.")
    eval: str | None = option(None, "Labelled shards to evaluate on every --eval-every steps.",
                              toml_reason="the job's [eval] stage")  # fmt: skip
    eval_every: int = option(500, "Steps between evaluations.")
    checkpoint_every: int = option(500, "Steps between checkpoints.")
    log_every: int = option(50, "Steps between rows of metrics.jsonl.")
    device: str = option("auto", "auto, cpu or cuda.")
    workers: int = option(2, "Loader worker processes (decode).")
    shuffle_buffer: int = option(5000, "Samples in the shuffle buffer.")
    flip: bool = option(False, "Random horizontal flips (only where a flip keeps the soft label valid).")
    teacher: str | None = option(None, "Online teacher (any teacher spec, as for 'curate score'): it labels each "
                                 "augmented/mixed view. In a job: online = true uses the job's teacher.")  # fmt: skip
    online_fraction: float = option(
        1.0, "With stored soft labels: share of steps that augment and ask --teacher (the rest reuse them)."
    )
    crop: int = option(0, "Random crop after zero-padding by this many pixels (0: off).")
    randaugment: bool = option(False, "RandAugment (2 ops, magnitude 9), one draw per group of samples.")
    mixup: float = option(0.0, "Mixup with lambda ~ Beta(A, A) (0: off).")
    cutmix: float = option(0.0, "CutMix with lambda ~ Beta(A, A) (0: off; with --mixup, one per step).")
    feature_weight: float = option(0.0, "FitNets term: L2 between projected student and teacher features.")
    feature_layers: str = option("auto", "STUDENT_LAYER:TEACHER_LAYER for --feature-weight, or auto.")
    rkd_distance: float = option(0.0, "Weight of the RKD distance term on the penultimate embeddings.")
    rkd_angle: float = option(0.0, "Weight of the RKD angle term on the penultimate embeddings.")
    init: str | None = option(None, "Start from these weights (a student.pt or run directory).")
    seed: int = option(0, "Seed of initialisation and data order.")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.",
                          toml_reason="a job resumes an interrupted stage itself")  # fmt: skip
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        from distill.losses import LOSSES

        if self.labels not in ("teacher", "true"):
            raise UserError(f"--labels must be teacher or true, got {self.labels!r}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        if (self.steps is None) == (self.epochs is None):
            raise UserError("give exactly one of --steps N or --epochs N")
        check_numbers(self, positive=("epochs", "lr", "temperature", "online_fraction"),
                      at_least_one=("steps", "batch_size", "eval_every", "checkpoint_every", "log_every",
                                    "topk_classes"),
                      non_negative=("weight_decay", "mixup", "cutmix", "crop", "workers", "shuffle_buffer",
                                    "feature_weight", "rkd_distance", "rkd_angle"),
                      unit=("alpha", "online_fraction", "warmup"))  # fmt: skip
        if self.warmup >= 1:
            raise UserError(f"--warmup must be below 1 (a share of the steps), got {self.warmup}")

    @property
    def supervised(self) -> bool:
        return self.loss == "ce" and self.labels == "true"


@dataclass
class FinetuneConfig:
    run: str = option(help="A run directory (or student.pt) to start from.", positional=True)
    data: str = option(help="Labelled shards; --per-class samples of each class are used.")
    out: str | None = option(None, "Where the fine-tuned run goes (default: RUN/finetune).")
    per_class: int = option(10, "Labelled samples per class (drawn with --seed).")
    steps: int = option(200, "Optimizer steps.")
    lr: float = option(3e-4, "Learning rate: about a tenth of distillation's.")
    batch_size: int = option(64, "Samples per step.")
    crop: int = option(2, "Random-crop padding (0: off).")
    flip: bool = option(False, "Random horizontal flips.")
    freeze_bn: bool = option(True, "Keep BatchNorm's running statistics (a few samples per class would overwrite "
                             "them).")  # fmt: skip
    eval: str | None = option(None, "Labelled shards to evaluate on before and after.")
    device: str = option("auto", "auto, cpu or cuda.")
    seed: int = option(0, "Seed of the labelled draw and of the batches.")

    def __post_init__(self) -> None:
        check_numbers(self, positive=("lr",), at_least_one=("per_class", "steps", "batch_size"), non_negative=("crop",))


@dataclass
class EvalConfig:
    run: str = option(help="Run directory (or a student.pt).", positional=True)
    data: str = option(help="Shards (directory, brace pattern or URLs) with true labels or teacher soft labels; with "
                       "--teacher also unlabelled shards or a folder of images.")  # fmt: skip
    manifest: str | None = option(None, "The shards' manifest.json, when it is not beside them (pipe: shards).")
    teacher: str | None = option(None, "A teacher spec (as for 'curate score') run here on the student's own view of "
                                 "each image: agreement with it, on any data.")  # fmt: skip
    name: str | None = option(None, "Name of this result in the run (RUN/eval/NAME.json); default: the data's name.")
    device: str = option("auto", "auto, cpu or cuda.")
    batch_size: int = option(512, "Samples per batch.")
    workers: int = option(2, "Loader worker processes.")

    def __post_init__(self) -> None:
        check_numbers(self, at_least_one=("batch_size",), non_negative=("workers",))
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", self.name):
            raise UserError(f"--name must be letters, digits, '.', '_' or '-' (at most 80), got {self.name!r}")

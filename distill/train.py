"""Stage 4: train a student from shards (`distill train`), and `fit_arrays`, which trains a zoo model on
labelled in-memory images (how the demo and the tests make a teacher in seconds).

The loop: AdamW (or SGD + Nesterov) with linear warm-up and a cosine schedule, `--steps` or `--epochs`,
evaluation every N steps on `--eval` shards, a checkpoint every N steps (`checkpoint.pt`, atomic) and
`--resume` from it after a kill (the step count, optimizer, schedule and metrics continue; the interrupted
epoch restarts with a new shard order). CUDA: bf16 autocast, channels_last, pinned memory, non-blocking
copies. Under torchrun: DDP (gloo on CPU, NCCL on CUDA), shards split by rank, rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distill.augment import AugmentConfig, augment
from distill.data import loader, open_shards
from distill.evaluate import evaluate_model
from distill.losses import LOSSES, LossConfig, combine, feature_l2, projection, rkd_angle, rkd_distance
from distill.metrics import append_metrics, plot_curves, progress_bar, read_metrics, write_json
from distill.models import InputSpec, SpecError, build, load, save_checkpoint
from distill.online import OnlineTeacher, Tap, to_view


@dataclass
class FitConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def to_input(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 N×S×S (grayscale at the model's size) -> normalised float N×1×S×S."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255).unsqueeze(1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def fit_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FitConfig,
               view: Callable[[torch.Tensor], torch.Tensor] | None = None,
               freeze_bn: bool = False) -> list[float]:  # fmt: skip
    """Cross-entropy on (x, y) with AdamW and a cosine schedule; `view` turns a batch of x into the model's
    input (augmentation, normalisation); `freeze_bn` keeps BatchNorm's running statistics as they are
    (fine-tuning on a handful of samples must not overwrite statistics learned on thousands). Returns the
    loss per step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen).to(x.device)
        loss = F.cross_entropy(model(view(x[idx]) if view else x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / max(1, len(x))


# ------------------------------------------------------------------------------------------ distill train


@dataclass
class TrainConfig:
    shards: str
    out: str
    student: str = "cnn-small"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"  # adamw | sgd
    warmup: float = 0.03  # share of the steps spent warming the learning rate up
    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9
    labels: str = "teacher"  # teacher | true
    topk_classes: int | None = None
    weights: bool = True  # per-sample weights from the selection
    eval: str | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    workers: int = 2
    shuffle_buffer: int = 5000
    flip: bool = False
    teacher: str | None = None  # online teacher spec: it labels every augmented or mixed view
    online_fraction: float = 1.0  # with stored soft labels: share of steps that augment and ask the teacher
    crop: int = 0  # random-crop padding in pixels
    randaugment: bool = False
    mixup: float = 0.0  # Beta(α, α)
    cutmix: float = 0.0
    feature_weight: float = 0.0  # FitNets term
    feature_layers: str = "auto"  # STUDENT_LAYER:TEACHER_LAYER, or auto (the penultimate embeddings)
    rkd_distance: float = 0.0  # RKD terms on the penultimate embeddings
    rkd_angle: float = 0.0
    init: str | None = None  # start from these weights (a student.pt or run directory)
    seed: int = 0
    resume: bool = False
    show_progress: bool = True

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(crop=self.crop, randaugment=self.randaugment, mixup=self.mixup, cutmix=self.cutmix)

    @property
    def needs_features(self) -> bool:
        return self.feature_weight > 0 or self.rkd_distance > 0 or self.rkd_angle > 0


@dataclass
class TrainResult:
    out: str
    steps: int
    resumed_from: int
    final: dict[str, Any]
    seconds: float


def train(cfg: TrainConfig) -> TrainResult:
    """Distill (or, with --loss ce --labels true, supervise) a student from shards. See module doc."""
    t0 = time.perf_counter()
    rank, world, local = _dist_env()
    device = _device(cfg.device, local)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, rank, world, device, t0)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, t0: float) -> TrainResult:
    shards = open_shards(cfg.shards)
    _check(cfg, shards)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        if ckpt_path.exists() and not cfg.resume:
            raise SpecError(f"{out} holds a run already; pass --resume to continue it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    per_step = cfg.batch_size * world
    steps = cfg.steps or math.ceil((cfg.epochs or 1) * shards.count / per_step)
    torch.manual_seed(cfg.seed)
    model, factory, kwargs = build(cfg.student, len(shards.classes), shards.input)
    if cfg.init:
        _init_from(model, cfg.init)
    model = model.to(device).to(memory_format=torch.channels_last)
    spec = shards.input
    s_layer, t_layer = _layers(cfg)
    teacher = (OnlineTeacher(cfg.teacher, device, len(shards.classes), [t_layer, "auto"] if cfg.needs_features
                             else []) if cfg.teacher else None)  # fmt: skip
    s_taps = {layer: Tap(model, layer, "student") for layer in {s_layer, "auto"}} if cfg.needs_features else {}
    proj = _projection(model, teacher, s_taps[s_layer], t_layer, spec, device) if cfg.feature_weight > 0 else None
    opt = _optimizer(cfg, model, proj)
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    step, epoch = 0, 0
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if proj is not None:
            proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch = int(state["step"]), int(state["epoch"]) + 1  # the interrupted epoch restarts reshuffled
        torch.set_rng_state(state["rng"])
    resumed_from = step
    loss_cfg = LossConfig(cfg.loss, cfg.temperature, cfg.alpha, cfg.labels, cfg.topk_classes)
    if rank == 0:
        write_json(out / "config.json", {**asdict(cfg), "steps_total": steps, "world_size": world,
                                         "classes": shards.classes, "input": shards.manifest["input"],
                                         "soft_label_teacher": shards.manifest.get("teacher"), "factory": factory,
                                         "kwargs": kwargs})  # fmt: skip
        _truncate_metrics(out / "metrics.jsonl", step)
    ddp = DDP(model) if world > 1 else model
    eval_shards = open_shards(cfg.eval) if cfg.eval else None
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    cuda = device.type == "cuda"

    stream = loader(shards, cfg.batch_size, train=True, epoch=epoch, seed=cfg.seed, rank=rank, world=world,
                    workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, pin_memory=cuda)  # fmt: skip
    epoch_size = max(1, shards.count // world)

    final: dict[str, Any] = {}
    seen, window_t, window_n, window_loss = 0, time.perf_counter(), 0, 0.0
    window_terms: dict[str, float] = {}  # the weighted feature/relational terms, logged beside the loss
    ddp.train()
    with progress_bar("distilling", steps, enabled=cfg.show_progress and rank == 0, start=step) as advance:
        while step < steps:
            batch = next(stream)
            x01 = batch["image"].to(device, non_blocking=True).float().div_(255)
            stored = batch["logits"].to(device, non_blocking=True) if bool(batch["has_logits"].all()) else None
            labels = batch["label"].to(device, non_blocking=True)
            weights = batch["weight"].to(device, non_blocking=True) if cfg.weights else None
            online = teacher is not None and (stored is None or _online_step(cfg, step))
            mix, t_feats = None, {}
            if online or teacher is None:  # stored soft labels belong to the plain view: only it uses them
                x01, mix = augment(x01, cfg.augment)
            t_logits = stored
            if online:
                t_logits, t_feats = teacher(x01)
            x = x01.sub(mean).div_(std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                logits = ddp(x)
            loss = combine(loss_cfg, logits.float(), t_logits, labels, weights, mix)
            if t_feats:
                terms = _feature_terms(cfg, s_taps, t_feats, s_layer, t_layer, proj)
                loss = loss + sum(terms.values())
                for k, v in terms.items():
                    window_terms[k] = window_terms.get(k, 0.0) + v.item() * len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            n = len(x)
            seen += n
            window_n += n
            window_loss += loss.item() * n
            advance(1, f"loss {loss.item():.3f}")
            last = step == steps
            if rank == 0 and (step % cfg.log_every == 0 or last):
                now = time.perf_counter()
                row = {
                    "step": step,
                    "epoch": round(epoch + seen / epoch_size, 3),
                    "loss": window_loss / max(1, window_n),
                    "lr": sched.get_last_lr()[0],
                    "samples_per_s": window_n * world / (now - window_t),
                    **{k: v / max(1, window_n) for k, v in window_terms.items()},
                }
                window_terms = {}
                append_metrics(out / "metrics.jsonl", row)
                window_t, window_n, window_loss = now, 0, 0.0
            if eval_shards is not None and (step % cfg.eval_every == 0 or last):
                if rank == 0:
                    final = evaluate_model(model, eval_shards, device, spec, cfg.batch_size * 2, workers=cfg.workers)
                    append_metrics(out / "metrics.jsonl", {"step": step, **_scalars(final)})
                ddp.train()
            if step % cfg.checkpoint_every == 0 or last:
                if rank == 0:
                    _save_state(ckpt_path, model, opt, sched, step, epoch + seen // epoch_size, proj)
                if world > 1:
                    dist.barrier()
    if rank == 0:
        save_checkpoint(out / "student.pt", model, factory, kwargs, shards.classes, spec,
                        extra={"run": {"steps": step, "loss": cfg.loss, "shards": cfg.shards,
                                       "teacher": cfg.teacher or shards.manifest.get("teacher")}})  # fmt: skip
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    return TrainResult(str(out), step, resumed_from, _scalars(final), time.perf_counter() - t0)


def _check(cfg: TrainConfig, shards) -> None:
    if cfg.labels not in ("teacher", "true"):
        raise SpecError(f"--labels must be teacher or true, got {cfg.labels!r}")
    if cfg.loss not in LOSSES:
        raise SpecError(f"unknown --loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}")
    if cfg.labels == "true" and not shards.manifest.get("labels"):
        raise SpecError(f"--labels true needs shards with true labels; {cfg.shards} has none")
    supervised = cfg.loss == "ce" and cfg.labels == "true"
    if shards.soft_labels == "none" and not supervised and not cfg.teacher:
        raise SpecError(
            f"{cfg.shards} holds no teacher soft labels; give an online --teacher, or use --loss ce --labels true"
        )
    aug = cfg.augment
    if (aug.geometric or aug.mixing) and not cfg.teacher and not supervised:
        raise SpecError("--crop, --randaugment, --mixup and --cutmix change the view the stored soft labels belong to; "
                        "give an online --teacher (or train with --loss ce --labels true)")  # fmt: skip
    if cfg.needs_features and not cfg.teacher:
        raise SpecError("--feature-weight and --rkd-* compare against the teacher's features; give an online --teacher")
    if cfg.mixup < 0 or cfg.cutmix < 0 or cfg.crop < 0:
        raise SpecError("--mixup, --cutmix and --crop must be >= 0")
    if not 0 < cfg.online_fraction <= 1:
        raise SpecError(f"--online-fraction must be in (0, 1], got {cfg.online_fraction}")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise SpecError(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    if (cfg.steps is None) == (cfg.epochs is None):
        raise SpecError("give exactly one of --steps N or --epochs N")


def _optimizer(cfg: TrainConfig, model: nn.Module, proj: nn.Module | None = None) -> torch.optim.Optimizer:
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _online_step(cfg: TrainConfig, step: int) -> bool:
    """Whether this step augments and asks the teacher (a function of seed and step: resumes agree)."""
    return cfg.online_fraction >= 1 or np.random.default_rng([cfg.seed, step]).random() < cfg.online_fraction


def _layers(cfg: TrainConfig) -> tuple[str, str]:
    if cfg.feature_layers == "auto":
        return "auto", "auto"
    s_layer, sep, t_layer = cfg.feature_layers.partition(":")
    if not sep or not s_layer or not t_layer:
        raise SpecError(f"--feature-layers must be STUDENT_LAYER:TEACHER_LAYER or auto, got {cfg.feature_layers!r}")
    return s_layer, t_layer


def _projection(model: nn.Module, teacher: OnlineTeacher, tap: Tap, t_layer: str, spec: InputSpec,
                device: torch.device) -> nn.Module:  # fmt: skip
    """FitNets' regressor, sized by one forward of a blank batch through both networks."""
    was_training = model.training
    model.eval()
    blank = torch.zeros(2, spec.channels, spec.size, spec.size, device=device)
    with torch.no_grad():
        model(to_view(blank, spec))
    _, t_feats = teacher(blank)
    s, t = tap.value, t_feats[t_layer]
    model.train(was_training)
    if s.dim() != t.dim() or s.dim() not in (2, 4):
        raise SpecError(f"--feature-layers: the student layer gives {tuple(s.shape[1:])}, the teacher layer "
                        f"{tuple(t.shape[1:])}; pair two feature maps or two vectors")  # fmt: skip
    return projection(s.shape[1], t.shape[1], s.dim() == 4).to(device)


def _feature_terms(cfg: TrainConfig, s_taps: dict[str, Tap], t_feats: dict[str, torch.Tensor], s_layer: str,
                   t_layer: str, proj: nn.Module | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The weighted feature and relational terms of this batch, by name."""
    terms = {}
    if proj is not None:
        terms["feature"] = cfg.feature_weight * feature_l2(s_taps[s_layer].value.float(), t_feats[t_layer], proj).mean()
    s_emb, t_emb = s_taps["auto"].value, t_feats["auto"]
    if cfg.rkd_distance > 0:
        terms["rkd_distance"] = cfg.rkd_distance * rkd_distance(s_emb, t_emb)
    if cfg.rkd_angle > 0:
        terms["rkd_angle"] = cfg.rkd_angle * rkd_angle(s_emb, t_emb)
    return terms


def _init_from(model: nn.Module, spec: str) -> None:
    src = load(spec).model
    try:
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise SpecError(f"--init {spec} does not fit --student: {str(e).splitlines()[0]}") from None


def _save_state(path: Path, model, opt, sched, step: int, epoch: int, proj: nn.Module | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "epoch": epoch, "rng": torch.get_rng_state(),
                **({"proj": proj.state_dict()} if proj is not None else {})}, tmp)  # fmt: skip
    tmp.replace(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metrics logged past the checkpoint (they will be logged again)."""
    if path.exists():
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpecError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise SpecError(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device(name)

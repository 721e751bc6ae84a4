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
import sys
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
from distill.config import TrainConfig
from distill.data import Shards, loader, open_shards
from distill.evaluate import evaluate_model, save_result
from distill.losses import TERMS, Features, LossConfig, active_terms, combine, projection
from distill.metrics import append_metrics, plot_curves, read_metrics, write_json
from distill.online import OnlineTeacher, Tap, to_view
from distill.rundir import RunDir
from kdcore import progress, storage
from kdcore.errors import UserError
from kdcore.models import build, load, save_checkpoint
from kdcore.models.kinds import first_line
from kdcore.tensors import Normalize, resolve_device
from kdcore.view import InputSpec


@dataclass
class FitConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def to_input(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 N×S×S (grayscale at the model's size) -> normalised float N×1×S×S."""
    return Normalize(spec)(torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)).contiguous()


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
    device = resolve_device(cfg.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, rank, world, device, t0)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, t0: float) -> TrainResult:
    with RunDir(cfg.out) as run:
        return _train_in(cfg, run, rank, world, device, t0)


def _train_in(cfg: TrainConfig, run: RunDir, rank: int, world: int, device: torch.device, t0: float) -> TrainResult:
    shards = open_shards(cfg.shards, cfg.manifest)
    _check(cfg, shards)
    shown = storage.redact(run.url)
    has_run = run.exists("checkpoint.pt")
    if has_run and not cfg.resume:
        raise UserError(f"{shown} holds a run already; pass --resume to continue it, or choose another --out")
    if cfg.resume and not has_run:
        raise UserError(f"--resume: there is no run to resume in {shown} (no checkpoint.pt); drop --resume to start "
                        "a new run there")  # fmt: skip
    out = run.root
    ckpt_path = out / "checkpoint.pt"
    run.make()
    if cfg.resume:
        run.pull("checkpoint.pt", *(("metrics.jsonl",) if rank == 0 else ()))
    per_step = cfg.batch_size * world
    steps = cfg.steps or math.ceil((cfg.epochs or 1) * shards.count / per_step)
    torch.manual_seed(cfg.seed)
    model, factory, kwargs = build(cfg.student, len(shards.classes), shards.input)
    if cfg.init:
        _init_from(model, cfg.init)
    model = model.to(device).to(memory_format=torch.channels_last)
    spec = shards.input
    terms = active_terms(cfg)
    s_layer, t_layer = _layers(cfg)
    teacher = (OnlineTeacher(cfg.teacher, device, len(shards.classes), [t_layer, "auto"] if terms else [])
               if cfg.teacher else None)  # fmt: skip
    s_taps = {layer: Tap(model, layer, "student") for layer in {s_layer, "auto"}} if terms else {}
    needs_proj = any(TERMS[t].needs_projection for t in terms)
    proj = _projection(model, teacher, s_taps[s_layer], t_layer, spec, device) if needs_proj else None
    opt = _optimizer(cfg, model, proj)
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    step, epoch = 0, 0
    if cfg.resume:
        state = _load_state(ckpt_path, shown)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(
                f"--resume: the checkpoint in {shown} is not a {cfg.student} for these shards "
                f"({first_line(e)[:120]}); resume with the run's own --student"
            ) from None
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
        run.push("config.json", "metrics.jsonl")
    ddp = DDP(model) if world > 1 else model
    eval_shards = _eval_shards(cfg.eval, shards) if cfg.eval else None
    normalize = Normalize(spec, device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    cuda = device.type == "cuda"

    stream = loader(shards, cfg.batch_size, train=True, epoch=epoch, seed=cfg.seed, rank=rank, world=world,
                    workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, pin_memory=cuda)  # fmt: skip
    epoch_size = max(1, shards.count // world)
    augment_cfg = AugmentConfig(crop=cfg.crop, randaugment=cfg.randaugment, mixup=cfg.mixup, cutmix=cfg.cutmix)

    final: dict[str, Any] = {}
    view_check: float | None = None  # does the teacher keep its stored label on the augmented views?
    seen, window_t, window_n, window_loss = 0, time.perf_counter(), 0, 0.0
    window_terms: dict[str, float] = {}  # the weighted feature/relational terms, logged beside the loss
    ddp.train()
    with progress.bar("distilling", steps, enabled=cfg.show_progress and rank == 0, unit="steps", start=step) as adv:
        while step < steps:
            batch = next(stream)
            x01 = batch["image"].to(device, non_blocking=True).float().div_(255)
            stored = batch["logits"].to(device, non_blocking=True) if bool(batch["has_logits"].all()) else None
            labels = batch["label"].to(device, non_blocking=True)
            weights = batch["weight"].to(device, non_blocking=True) if cfg.weights else None
            online = teacher is not None and (stored is None or _online_step(cfg, step))
            mix, t_feats = None, {}
            plain = x01  # flipped by the loader when --flip; not yet cropped or mixed
            if online or teacher is None:  # stored soft labels belong to the plain view: only it uses them
                x01, mix = augment(x01, augment_cfg)
            t_logits = stored
            if online:
                t_logits, t_feats = teacher(x01)
                if view_check is None and stored is not None and (cfg.flip or cfg.crop or cfg.randaugment):
                    unmixed = t_logits if mix is None else None  # the teacher has labelled the augmented view
                    view_check = _view_agreement(cfg, teacher, plain, stored, unmixed)
                    if rank == 0:
                        _say_view_agreement(view_check)
                        append_metrics(out / "metrics.jsonl", {"step": step, "online_view_agreement": view_check})
            x = normalize(x01, scaled=True)
            with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                logits = ddp(x)
            loss = combine(loss_cfg, logits.float(), t_logits, labels, weights, mix)
            if t_feats:
                feats = Features(s_taps[s_layer].value, t_feats.get(t_layer), proj, s_taps["auto"].value,
                                 t_feats["auto"])  # fmt: skip
                for name, weight in terms.items():
                    term = weight * TERMS[name].fn(feats)
                    loss = loss + term
                    window_terms[name] = window_terms.get(name, 0.0) + term.item() * len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            n = len(x)
            seen += n
            window_n += n
            window_loss += loss.item() * n
            adv(1, f"loss {loss.item():.3f}")
            last = step == steps
            if rank == 0 and (step % cfg.log_every == 0 or last):
                now = time.perf_counter()
                row = {"step": step, "epoch": round(epoch + seen / epoch_size, 3),
                       "loss": window_loss / max(1, window_n), "lr": sched.get_last_lr()[0],
                       "samples_per_s": window_n * world / (now - window_t),
                       **{k: v / max(1, window_n) for k, v in window_terms.items()}}  # fmt: skip
                window_terms = {}
                append_metrics(out / "metrics.jsonl", row)
                window_t, window_n, window_loss = now, 0, 0.0
            if eval_shards is not None and (step % cfg.eval_every == 0 or last):
                if rank == 0:
                    final = evaluate_model(model, eval_shards, device, spec, cfg.batch_size * 2, workers=cfg.workers)
                    append_metrics(out / "metrics.jsonl", {"step": step, **_scalars(final)})
                ddp.train()
            if step % cfg.checkpoint_every == 0 or last:
                if world > 1:
                    _average_buffers(model, world)  # BatchNorm statistics of every rank's data, not rank 0's
                if rank == 0:
                    _save_state(ckpt_path, model, opt, sched, step, epoch + seen // epoch_size, proj)
                    run.push("metrics.jsonl", "checkpoint.pt")  # the metrics first: a resume truncates them
                if world > 1:
                    dist.barrier()
    if rank == 0:
        save_checkpoint(out / "student.pt", model, factory, kwargs, shards.classes, spec,
                        extra={"run": {"steps": step, "loss": cfg.loss, "shards": storage.redact(cfg.shards),
                                       "teacher": cfg.teacher or shards.manifest.get("teacher")}})  # fmt: skip
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        run.push("metrics.jsonl", "curves.png", "student.pt")
        if final and eval_shards is not None:
            save_result(run.url, final, cfg.eval, classes=eval_shards.classes)
    checked = {} if view_check is None else {"online_view_agreement": view_check}
    return TrainResult(shown, step, resumed_from, {**_scalars(final), **checked}, time.perf_counter() - t0)


def _eval_shards(spec: str, shards: Shards) -> Shards | None:
    """Evaluation shards, when they can measure something: true labels in the student's classes, or the teacher's
    soft labels. Unlabelled shards without soft labels (e.g. held-out images for agreement) are skipped here."""
    found = open_shards(spec, need_classes=False)
    if not found.manifest.get("labels") and found.soft_labels == "none":
        print(f"note: --eval {storage.redact(spec)} holds neither true labels nor soft labels; no evaluation during "
              "training", file=sys.stderr)  # fmt: skip
        return None
    if found.classes != shards.classes:
        raise UserError(f"--eval {storage.redact(spec)} has other classes than the training shards")
    return found


def _check(cfg: TrainConfig, shards: Shards) -> None:
    """What the config alone cannot tell: whether these shards can train this way."""
    if cfg.labels == "true" and not shards.manifest.get("labels"):
        raise UserError(f"--labels true needs shards with true labels; {storage.redact(cfg.shards)} has none")
    if shards.soft_labels == "none" and not cfg.supervised and not cfg.teacher:
        raise UserError(f"{storage.redact(cfg.shards)} holds no teacher soft labels; give an online --teacher, or "
                        "use --loss ce --labels true")  # fmt: skip
    augmenting = bool(cfg.crop or cfg.randaugment or cfg.mixup or cfg.cutmix)
    if augmenting and not cfg.teacher and not cfg.supervised:
        raise UserError("--crop, --randaugment, --mixup and --cutmix change the view the stored soft labels belong "
                        "to; give an online --teacher (or train with --loss ce --labels true)")  # fmt: skip
    if active_terms(cfg) and not cfg.teacher:
        raise UserError("--feature-weight and --rkd-* compare against the teacher's features; give an online --teacher")
    if cfg.topk_classes is not None and cfg.topk_classes > len(shards.classes):
        raise UserError(f"--topk-classes {cfg.topk_classes} exceeds the {len(shards.classes)} classes")


def _optimizer(cfg: TrainConfig, model: nn.Module, proj: nn.Module | None = None) -> torch.optim.Optimizer:
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


VIEW_AGREEMENT_WARN = 0.9


def _view_agreement(cfg: TrainConfig, teacher: OnlineTeacher, plain: torch.Tensor, stored: torch.Tensor,
                    on_view: torch.Tensor | None) -> float:  # fmt: skip
    """Share of a batch on which the teacher, on the augmented view (flip, crop, RandAugment; not mixed: mixing
    changes the class on purpose), keeps the class its stored soft label gives the plain view. A teacher trained
    without these augmentations changes its mind often, and its online labels are then worse than the stored ones.
    `on_view`: the teacher's logits on the step's own view when that view was not mixed (no second forward)."""
    if on_view is None:
        with torch.random.fork_rng(devices=[]):  # the run's own random draws stay as they were
            view, _ = augment(plain, AugmentConfig(crop=cfg.crop, randaugment=cfg.randaugment))
        on_view = teacher(view)[0]
    return float((on_view.argmax(1) == stored.argmax(1)).float().mean())


def _say_view_agreement(value: float) -> None:
    print(f"note: on the first batch's augmented views the online teacher keeps its stored label for "
          f"{value:.0%} of the samples", file=sys.stderr)  # fmt: skip
    if value < VIEW_AGREEMENT_WARN:
        print(f"warning: the online teacher changes its prediction on {1 - value:.0%} of the augmented views (was it "
              "trained with these augmentations?): its online labels are noisier than the stored soft labels; unless "
              "the selection is small, distill offline or lower --crop / drop --flip", file=sys.stderr)  # fmt: skip


def _online_step(cfg: TrainConfig, step: int) -> bool:
    """Whether this step augments and asks the teacher (a function of seed and step: resumes agree)."""
    return cfg.online_fraction >= 1 or np.random.default_rng([cfg.seed, step]).random() < cfg.online_fraction


def _layers(cfg: TrainConfig) -> tuple[str, str]:
    if cfg.feature_layers == "auto":
        return "auto", "auto"
    s_layer, sep, t_layer = cfg.feature_layers.partition(":")
    if not sep or not s_layer or not t_layer:
        raise UserError(f"--feature-layers must be STUDENT_LAYER:TEACHER_LAYER or auto, got {cfg.feature_layers!r}")
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
        raise UserError(f"--feature-layers: the student layer gives {tuple(s.shape[1:])}, the teacher layer "
                        f"{tuple(t.shape[1:])}; pair two feature maps or two vectors")  # fmt: skip
    return projection(s.shape[1], t.shape[1], s.dim() == 4).to(device)


def _init_from(model: nn.Module, spec: str) -> None:
    src = load(spec).model
    try:
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise UserError(f"--init {spec} does not fit --student: {first_line(e)}") from None


def _save_state(path: Path, model, opt, sched, step: int, epoch: int, proj: nn.Module | None = None) -> None:
    with storage.atomic_path(path, tag="train") as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step, "epoch": epoch, "rng": torch.get_rng_state(),
                    **({"proj": proj.state_dict()} if proj is not None else {})}, tmp)  # fmt: skip


def _load_state(path: Path, shown: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a cut or foreign file fails in many ways
        raise UserError(f"--resume: the checkpoint.pt in {shown} is not readable (cut or foreign); remove it to start "
                        "over, or choose another --out") from None  # fmt: skip


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metrics logged past the checkpoint (they will be logged again)."""
    if path.exists():
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        storage.write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode(), tag="train")


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _average_buffers(model: nn.Module, world: int) -> None:
    """All-reduce the floating buffers (BatchNorm running statistics) to their mean over ranks: DDP keeps the
    parameters equal but each rank's statistics follow its own shards (timm's distribute_bn, 'reduce')."""
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))

"""`curate synthesize`: teacher-guided images, written as a folder that any stage reads as a `folder:` source.

When the pool holds little of the teacher's own kind of data, the teacher itself can make more:
- inversion (DeepInversion, Yin et al. 2020): a batch of noise images is optimised (Adam on the pixels,
  random jitter each step) until the teacher predicts a target class for each and the batch's per-channel
  mean and variance at every BatchNorm layer match the running statistics stored there: the statistics of
  the data the teacher was trained on. Targets cycle through the classes, so every class gets images.
- boundary (Frank & Davis 2025): images of a source are moved a few signed-gradient steps toward the class
  the teacher ranks second, inside an L-infinity ball; an image stops moving once the teacher's prediction
  reaches that class, so it ends near a decision boundary, where the teacher's soft labels say most.

Images are PNG files named BATCH-INDEX-cCLASS.png (the target class; not a true label). Each batch is
seeded by (seed, batch), written file by file atomically, then recorded in OUT/synthesize.json: a killed
run resumes at the first batch not recorded, and a batch redone writes the same images.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curate.config import SynthesizeConfig
from kdcore import models, progress, storage
from kdcore.errors import UserError
from kdcore.limits import DEFAULT_MAX_PIXELS
from kdcore.tensors import resolve_device

STATE = "synthesize.json"
FIRST_BN = 10.0  # DeepInversion weighs the first BatchNorm layer more: it sees the pixels' colour statistics
TV_WEIGHT = 1e-4  # total variation (smooth images), as in DeepInversion
L2_WEIGHT = 1e-5


@dataclass
class SynthesizeResult:
    out: str
    method: str
    images: int
    batches_run: int
    batches_skipped: int
    seconds: float
    target_hit: float | None = None  # share of the images the teacher predicts as their target class
    confidence: float | None = None  # the teacher's mean max softmax on the written images
    moved: float | None = None  # boundary: mean L-infinity change (share of the range)
    notes: list[str] = field(default_factory=list)


def settings(cfg: SynthesizeConfig, teacher_sha: str) -> dict[str, Any]:
    """What makes a run's images what they are: a folder resumes only under the same settings."""
    keep = ("method", "n", "source", "batch_size", "lr", "bn_weight", "eps", "seed")
    return {"teacher": teacher_sha, "steps": cfg.step_count, **{k: getattr(cfg, k) for k in keep}}


def synthesize(cfg: SynthesizeConfig) -> SynthesizeResult:
    t0 = time.perf_counter()
    out = storage.target(cfg.out, "--out")
    if storage.exists(out) and not storage.isdir(out):
        raise UserError(f"--out {out} is a file; give a folder (created when missing)")
    storage.check_writable(out, "--out")
    teacher = models.load(cfg.teacher)
    device = resolve_device(cfg.device)
    model = teacher.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if cfg.method == "inversion" and not bns:
        raise UserError("--method inversion matches the teacher's BatchNorm statistics, and this teacher has no "
                        "BatchNorm layer (or is opaque); use --method boundary")  # fmt: skip
    _check_gradients(model, teacher.input, device)
    state = _open_state(out, settings(cfg, teacher.fingerprint), cfg.overwrite)
    done: dict[str, int] = state["done"]  # batch -> images written
    batches = -(-cfg.n // cfg.batch_size)
    res = SynthesizeResult(storage.redact(out), cfg.method, 0, 0, 0, 0.0)
    hits, conf, moved = [], [], []
    todo = [b for b in range(batches) if str(b) not in done]
    res.batches_skipped = batches - len(todo)
    classes = len(teacher.classes)
    with progress.bar(f"synthesize ({cfg.method})", total=cfg.n, enabled=cfg.show_progress, unit="images",
                      start=sum(done.values())) as advance:  # fmt: skip
        for b, pixels in _inputs(cfg, teacher.input, todo, res.notes):
            size = len(pixels) if pixels is not None else min(cfg.batch_size, cfg.n - b * cfg.batch_size)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
            norm = _Norm(teacher.input, device)
            if cfg.method == "inversion":
                target = (torch.arange(size) + b * cfg.batch_size) % classes
                images = invert(model, bns, norm, target, teacher.input, cfg, gen, device)
            else:
                images, target, step = toward_runner_up(model, norm, pixels, cfg, device)
                moved.append(step)
            with torch.no_grad():
                p = F.softmax(model(norm(images.to(device))).float(), 1).cpu()
            hits.append((p.argmax(1) == target).float())
            conf.append(p.max(1).values)
            _write(out, b, images, target)
            done[str(b)] = size
            storage.write_json(storage.join(out, STATE), state)
            res.batches_run += 1
            advance(size)
    res.images = sum(done.values())
    if hits:
        res.target_hit = float(torch.cat(hits).mean())
        res.confidence = float(torch.cat(conf).mean())
    if moved:
        res.moved = float(torch.cat(moved).mean())
    if res.images < cfg.n:
        res.notes.append(f"--source holds {res.images:,} readable images, fewer than --n {cfg.n:,}")
    res.seconds = time.perf_counter() - t0
    return res


class _Norm:
    """[0, 1] pixels (N, C, S, S) -> the teacher's normalised input, differentiably."""

    def __init__(self, spec: models.InputSpec, device: torch.device) -> None:
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _check_gradients(model: nn.Module, spec: models.InputSpec, device: torch.device) -> None:
    x = torch.zeros(2, spec.channels, spec.size, spec.size, device=device, requires_grad=True)
    try:
        model(x).float().sum().backward()
        ok = x.grad is not None
    except RuntimeError:
        ok = False
    if not ok:
        raise UserError("the teacher gives no gradients with respect to its input (an ONNX model?); synthesize "
                        "needs a torch teacher")  # fmt: skip


def _open_state(out: str, want: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    path = storage.join(out, STATE)
    if storage.isfile(path):
        state = storage.read_json(path, STATE)
        if state.get("settings") == want:
            return state
        if not overwrite:
            changed = sorted(k for k in want if state.get("settings", {}).get(k) != want[k])
            raise UserError(f"--out {storage.redact(out)} holds images synthesized with other settings "
                            f"({', '.join(changed)}); give another --out, or --overwrite to start again")  # fmt: skip
        storage.rmtree(out)
    elif storage.isdir(out) and storage.listdir(out):
        if not overwrite:
            raise UserError(f"--out {storage.redact(out)} already holds other files; give a new or empty folder "
                            "(or --overwrite to empty it)")  # fmt: skip
        storage.rmtree(out)
    state = {"settings": want, "done": {}}
    storage.write_json(path, state)
    return state


def _inputs(cfg: SynthesizeConfig, spec: models.InputSpec, todo: list[int], notes: list[str]
            ) -> Iterator[tuple[int, torch.Tensor | None]]:  # fmt: skip
    """(batch, uint8 pixels or None) for each batch to run; boundary reads the first N images of its sources."""
    if cfg.method == "inversion":
        for b in todo:
            yield b, None
        return
    wanted, batch, b = set(todo), [], 0
    for img in _source_images(cfg, spec, notes):
        batch.append(img)
        if len(batch) == cfg.batch_size:
            if b in wanted:
                yield b, torch.stack(batch)
            batch, b = [], b + 1
    if batch and b in wanted:
        yield b, torch.stack(batch)


def _source_images(cfg: SynthesizeConfig, spec: models.InputSpec, notes: list[str]) -> Iterator[torch.Tensor]:
    """The first N decodable images of --source, one (C, S, S) uint8 tensor each, in the sources' order."""
    from curate.scoring import UnitBatches
    from curate.sources import parse_sources

    sources = parse_sources(cfg.source)
    units = [u for src in sources.values() for u in src.units()]
    if not units:
        raise UserError("--source holds no image (an empty folder, no matching file)")
    count = errors = 0
    for chunk in UnitBatches(sources, units, spec, cfg.batch_size, DEFAULT_MAX_PIXELS, 0):
        if "failed" in chunk:
            raise UserError(f"reading --source failed: {chunk['failed']}")
        errors += len(chunk["errors"])
        for px in chunk["pixels"]:
            yield torch.from_numpy(px)
            count += 1
            if count == cfg.n:
                break
        if count == cfg.n:
            break
    if errors:
        notes.append(f"{errors:,} images of --source could not be decoded and were skipped")


def invert(model: nn.Module, bns: list[nn.Module], norm: _Norm, target: torch.Tensor, spec: models.InputSpec,
           cfg: SynthesizeConfig, gen: torch.Generator, device: torch.device) -> torch.Tensor:  # fmt: skip
    """DeepInversion of one batch: [0, 1] images (N, C, S, S) whose teacher statistics match the stored ones."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    n, c, s = len(target), spec.channels, spec.size
    z = torch.randn(n, c, s, s, generator=gen).to(device).mul_(0.2).add_(0.5).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr, betas=(0.5, 0.9))
    target = target.to(device)
    jitter = max(1, s // 16)
    shifts = torch.randint(-jitter, jitter + 1, (cfg.step_count, 2), generator=gen).tolist()
    try:
        for t in range(cfg.step_count):
            stats.clear()
            x = torch.roll(z.clamp(0, 1), shifts=shifts[t], dims=(2, 3))
            logits = model(norm(x)).float()
            bn = sum((FIRST_BN if i == 0 else 1.0) * ((mu - m.running_mean.float()).norm() +
                                                      (var - m.running_var.float()).norm())
                     for i, ((mu, var), m) in enumerate(zip(stats, bns, strict=True)))  # fmt: skip
            tv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
            loss = F.cross_entropy(logits, target) + cfg.bn_weight * bn / len(bns) + TV_WEIGHT * tv * s * s
            loss = loss + L2_WEIGHT * x.pow(2).sum() / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return z.detach().clamp(0, 1).cpu()


def toward_runner_up(model: nn.Module, norm: _Norm, pixels: torch.Tensor, cfg: SynthesizeConfig,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Signed-gradient steps toward each image's runner-up class, inside an L-inf ball of cfg.eps; an image stops
    once the teacher predicts that class. Returns ([0, 1] images, runner-up classes, L-inf change)."""
    x0 = pixels.to(device).float().div(255)
    with torch.no_grad():
        logits = model(norm(x0)).float()
    if logits.shape[1] < 2:
        raise UserError("--method boundary needs a teacher with at least two classes")
    target = logits.topk(2, dim=1).indices[:, 1]
    alpha = 2.5 * cfg.eps / cfg.step_count
    x = x0.clone()
    active = torch.ones(len(x), dtype=torch.bool, device=device)
    for _ in range(cfg.step_count):
        x.requires_grad_(True)
        out = model(norm(x)).float()
        active &= out.argmax(1) != target
        if not active.any():
            break
        (grad,) = torch.autograd.grad(F.cross_entropy(out, target, reduction="sum"), x)
        with torch.no_grad():
            step = alpha * grad.sign() * active.view(-1, 1, 1, 1)
            x = torch.minimum(torch.maximum(x - step, x0 - cfg.eps), x0 + cfg.eps).clamp(0, 1)
    x = x.detach()
    return x.cpu(), target.cpu(), (x - x0).abs().flatten(1).max(1).values.cpu()


def _write(out: str, batch: int, images: torch.Tensor, target: torch.Tensor) -> None:
    from PIL import Image

    arr = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for j, (img, cls) in enumerate(zip(arr, target.tolist(), strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        storage.write_bytes(storage.join(out, f"{batch:05d}-{j:03d}-c{cls}.png"), buf.getvalue())


def result_dict(res: SynthesizeResult) -> dict[str, Any]:
    return asdict(res)

"""`distill finetune`: a distilled student, fine-tuned on a few labelled samples per class at a low
learning rate (Menghani & Ravi 2019: a little labelled data corrects what the proxy data got wrong).

The K samples per class are drawn with the seed from labelled shards and held in memory; batches are
drawn from them with a random crop (and flip when asked); BatchNorm's running statistics stay frozen
(on the quality benchmark: 0.577 against 0.523 with them updating); cross-entropy on the true labels,
AdamW with a cosine schedule from `lr`. The result is a new run directory with `student.pt` and `finetune.json`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from distill.augment import AugmentConfig, augment
from distill.config import FinetuneConfig
from distill.data import loader, open_shards
from distill.evaluate import evaluate_model, load_run, run_folder
from distill.metrics import write_json
from distill.rundir import RunDir
from distill.train import FitConfig, fit_arrays
from kdcore import storage
from kdcore.errors import UserError
from kdcore.models import LoadedModel, save_checkpoint
from kdcore.tensors import Normalize, resolve_device


def labelled_subset(data: str, spec, num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of every class (fewer where a class has fewer), drawn with `seed`, as uint8 images
    in the student's preprocessing and their labels."""
    shards = open_shards(data)
    if not shards.manifest.get("labels"):
        raise UserError(f"{data} holds no true labels; export a labelled source ('?labels=dirs', idx labels, ...)")
    if len(shards.classes) != num_classes:
        raise UserError(f"{data} has {len(shards.classes)} classes, the student {num_classes}")
    images, labels = [], []
    for batch in loader(shards, 512, train=False, workers=0, spec=spec):
        images.append(batch["image"])
        labels.append(batch["label"])
    x, y = torch.cat(images), torch.cat(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(y.numpy() == c)
        keep.append(rng.permutation(members)[:per_class])
    idx = torch.from_numpy(np.sort(np.concatenate(keep)))
    if len(idx) == 0:
        raise UserError(f"{data} has no labelled samples of the student's classes")
    return x[idx], y[idx]


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    student = load_run(cfg.run)
    out_url = cfg.out if cfg.out is not None else storage.join(run_folder(cfg.run), "finetune")
    with RunDir(out_url) as out:
        return _finetune(cfg, student, out)


def _finetune(cfg: FinetuneConfig, student: LoadedModel, out: RunDir) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if student.factory is None:
        raise UserError(f"{cfg.run} is not a student checkpoint with a factory; fine-tune a 'distill train' run")
    spec, classes = student.input, student.classes
    x, y = labelled_subset(cfg.data, spec, len(classes), cfg.per_class, cfg.seed)
    model = student.model.to(device)
    eval_shards = open_shards(cfg.eval) if cfg.eval else None
    result: dict[str, Any] = {"samples": len(y), "per_class": cfg.per_class, "out": storage.redact(out.url)}
    if eval_shards is not None:
        result["accuracy_before"] = evaluate_model(model, eval_shards, device, spec, workers=0)["accuracy"]
    normalize = Normalize(spec, device)
    aug = AugmentConfig(crop=cfg.crop, flip=cfg.flip)
    torch.manual_seed(cfg.seed)
    fit = FitConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=5e-4, seed=cfg.seed)
    losses = fit_arrays(model, x.to(device), y.to(device), fit,
                        view=lambda b: normalize(augment(b.float().div(255), aug)[0], scaled=True),
                        freeze_bn=cfg.freeze_bn)  # fmt: skip
    model.eval()
    out.make()
    if eval_shards is not None:
        result["accuracy"] = evaluate_model(model, eval_shards, device, spec, workers=0)["accuracy"]
    result["loss_first"], result["loss_last"] = losses[0], float(np.mean(losses[-10:]))
    save_checkpoint(out / "student.pt", model.cpu(), student.factory, student.kwargs, classes, spec,
                    extra={"finetune": {**asdict(cfg), "from": student.fingerprint}})  # fmt: skip
    write_json(out / "finetune.json", result)
    out.push("student.pt", "finetune.json")
    return result

"""Shards -> batches. The shard format (manifest.json + WebDataset tars) is all distill knows of curate.

Pipeline (webdataset): shards split by rank (DDP) and by loader worker, shard order shuffled per epoch,
a sample shuffle buffer, decode in the workers to uint8 C×S×S in the manifest's preprocessing, soft
labels to float32 logits (top-K expanded: the leftover probability spread evenly over the other classes),
`cls` to a label (-1 when absent), `weight` from the json. Normalisation happens on the device.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torchvision.transforms import functional as TF

from distill.models import InputSpec, SpecError

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Shards:
    urls: list[str]
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def input(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    @property
    def soft_labels(self) -> str:
        return self.manifest.get("soft_labels", "none")

    @property
    def count(self) -> int:
        return int(self.manifest.get("count") or sum(s["count"] for s in self.manifest.get("shards", [])))


def open_shards(spec: str) -> Shards:
    """A shard directory (its manifest.json) or a brace pattern of tars beside a manifest.json."""
    path = Path(spec)
    if path.is_dir():
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise SpecError(f"{spec} has no manifest.json; export shards with 'curate export'")
        manifest = json.loads(mpath.read_text())
        urls = [str(path / s["name"]) for s in manifest["shards"]]
    else:
        urls = sorted(braceexpand(spec))
        if not urls or not all(Path(u).is_file() for u in urls):
            missing = next((u for u in urls if not Path(u).is_file()), spec)
            raise SpecError(f"no shard at {missing}; give a shard directory or a brace pattern of existing tars")
        mpath = Path(urls[0]).parent / "manifest.json"
        if not mpath.is_file():
            raise SpecError(f"no manifest.json beside {urls[0]}; the classes and preprocessing come from it")
        manifest = json.loads(mpath.read_text())
    if not manifest.get("classes"):
        raise SpecError(f"the shards at {spec} have no classes (an unlabelled export without a teacher)")
    if not urls:
        raise SpecError(f"the shards at {spec} are empty")
    return Shards(urls, manifest)


def rank_shards(urls: list[str], rank: int, world: int, epoch: int, seed: int, shuffle: bool) -> list[str]:
    """This rank's shards for an epoch: every shard goes to exactly one rank, so across ranks every
    sample is seen once per epoch. The order is shuffled per epoch (same permutation on every rank)."""
    order = list(urls)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if world > 1 and len(order) < world:
        raise SpecError(f"{len(order)} shards cannot be split over {world} ranks; export with a smaller --shard-size")
    return order[rank::world]


def decode(sample: dict[str, Any], spec: InputSpec, num_classes: int, flip: bool = False) -> dict[str, Any]:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_KEYS)})")
    with Image.open(io.BytesIO(sample[key])) as img:
        img = img.convert("L" if spec.channels == 1 else "RGB")
        if img.size != (spec.size, spec.size):
            img = TF.center_crop(TF.resize(img, spec.size, antialias=True), [spec.size, spec.size])
        x = torch.from_numpy(np.asarray(img).copy())
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    if flip and random.random() < 0.5:
        x = x.flip(-1)
    meta = json.loads(sample["json"]) if "json" in sample else {}
    logits = torch.zeros(num_classes)
    has_logits = "logits.npy" in sample
    if has_logits:
        vals = np.load(io.BytesIO(sample["logits.npy"]), allow_pickle=False).astype(np.float32)
        if "topk.npy" in sample:
            logits = expand_topk(vals, np.load(io.BytesIO(sample["topk.npy"])), meta["logsumexp"], num_classes)
        else:
            logits = torch.from_numpy(vals)
    return {
        "image": x,
        "logits": logits,
        "has_logits": has_logits,
        "label": int(sample["cls"]) if "cls" in sample else -1,
        "weight": float(meta.get("weight", 1.0)),
    }


def expand_topk(vals: np.ndarray, idx: np.ndarray, logsumexp: float, num_classes: int) -> torch.Tensor:
    """Full logits from the top-K: the K kept exactly, the rest share the leftover probability evenly."""
    out = np.empty(num_classes, np.float32)
    kept = np.exp(vals.astype(np.float64) - logsumexp).sum()
    rest = num_classes - len(vals)
    if rest:
        out[:] = logsumexp + np.log(max(1.0 - kept, 1e-12) / rest)
    out[idx.astype(np.int64)] = vals
    return torch.from_numpy(out)


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "logits": torch.stack([s["logits"] for s in samples]),
        "has_logits": torch.tensor([s["has_logits"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "weight": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
    }


def epoch_urls(urls: list[str], rank: int, world: int, seed: int, epochs: int | None, start_epoch: int = 0):
    """This rank's shard urls, epoch after epoch (endless when epochs is None), as webdataset url dicts."""
    epoch = start_epoch
    while epochs is None or epoch < start_epoch + epochs:
        for url in rank_shards(urls, rank, world, epoch, seed, shuffle=epochs is None):
            yield {"url": url}
        epoch += 1


def loader(
    shards: Shards,
    batch_size: int,
    *,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    shuffle_buffer: int = 5000,
    flip: bool = False,
    pin_memory: bool = False,
    spec: InputSpec | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches, decoded to `spec` (default: the shards' own preprocessing). Training: an endless stream over
    this rank's shards, reshuffled every epoch, from one set of worker processes for the whole run.
    Evaluation: one ordered pass (the last batch partial)."""
    n_urls = len(rank_shards(shards.urls, rank, world, 0, seed, shuffle=False))
    workers = max(0, min(workers, n_urls)) if not train else max(0, workers)
    stages: list[Any] = [
        partial(epoch_urls, shards.urls, rank, world, seed, None if train else 1, epoch),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
    ]
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000), seed=seed * 7919 + epoch))
    stages += [
        wds.map(partial(decode, spec=spec or shards.input, num_classes=len(shards.classes), flip=flip and train)),
        wds.batched(batch_size, collation_fn=collate, partial=not train),
    ]
    pipeline = wds.DataPipeline(_Source(stages[0]), *stages[1:])
    return iter(
        wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )  # fmt: skip
    )


class _Source(torch.utils.data.IterableDataset):
    """A picklable, re-iterable head for a DataPipeline."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def __iter__(self):
        return iter(self.make())

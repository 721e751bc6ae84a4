"""Shards -> batches. The shard format (manifest.json + WebDataset tars) is all distill knows of curate.

Pipeline (webdataset): shards split by rank (DDP) and by loader worker, shard order shuffled per epoch,
a sample shuffle buffer, decode in the workers with kdcore.view (exactly the pixels `curate score` gave the
teacher for the same bytes and preprocessing), soft labels to float32 logits (top-K expanded: the leftover
probability spread evenly over the other classes), `cls` to a label (-1 when absent), `weight` and `pred`
from the json. Normalisation happens on the device. Shards may live anywhere kdcore.storage reads: local,
s3://, gs://, http(s)://, or pipe:COMMAND; they are streamed, never copied whole.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from kdcore import storage
from kdcore.errors import UserError
from kdcore.view import DecodeError, InputSpec, to_pixels

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


def open_shards(spec: str, manifest: str | None = None, need_classes: bool = True) -> Shards:
    """A shard directory (its manifest.json), or a brace pattern / glob of tar paths or URLs (pipe: too) with
    `manifest` (default: the manifest.json beside the first tar)."""
    if manifest is not None and storage.scheme(manifest) != "pipe" and not storage.isfile(manifest):
        raise UserError(f"--manifest {storage.redact(manifest)}: manifest file not found; give the manifest.json "
                        "'curate export' wrote beside the shards")  # fmt: skip
    if storage.scheme(spec) != "pipe" and "{" not in spec and "*" not in spec and storage.isdir(spec):
        mpath = manifest or storage.join(spec, "manifest.json")
        if not storage.isfile(mpath):
            raise UserError(f"{spec} has no manifest.json; export shards with 'curate export'")
        meta = storage.read_json(mpath, "manifest.json")
        urls = [storage.join(spec, s["name"]) for s in meta.get("shards", [])]
    else:
        urls = storage.expand(spec)
        checkable = [u for u in urls if storage.scheme(u) not in ("pipe", "http", "https")]
        missing = next((u for u in checkable if not storage.isfile(u)), None)
        if not urls or missing:
            raise UserError(f"no shard at {storage.redact(missing or spec)}; give a shard directory or a brace "
                            "pattern of existing tars")  # fmt: skip
        if manifest is None and storage.scheme(urls[0]) == "pipe":
            raise UserError(f"pipe: shards need --manifest (the manifest.json 'curate export' wrote): {spec[:80]}")
        mpath = manifest or storage.join(storage.parent(urls[0]), "manifest.json")
        if not storage.exists(mpath):
            raise UserError(f"no manifest.json beside {storage.redact(urls[0])}; the classes and preprocessing come "
                            "from it (give --manifest)")  # fmt: skip
        meta = storage.read_json(mpath, "manifest.json")
    if not isinstance(meta, dict) or "input" not in meta:
        raise UserError(f"{storage.redact(mpath)} is not a kdcurate shard manifest")
    if need_classes and not meta.get("classes"):
        raise UserError(f"the shards at {storage.redact(spec)} have no classes: they were exported without a "
                        "teacher from a source without labels")  # fmt: skip
    if not urls:
        raise UserError(f"the shards at {storage.redact(spec)} are empty")
    return Shards(urls, meta)


def rank_shards(urls: list[str], rank: int, world: int, epoch: int, seed: int, shuffle: bool) -> list[str]:
    """This rank's shards for an epoch: every shard goes to exactly one rank, so across ranks every
    sample is seen once per epoch. The order is shuffled per epoch (same permutation on every rank)."""
    order = list(urls)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if world > 1 and len(order) < world:
        raise UserError(f"{len(order)} shards cannot be split over {world} ranks; export with a smaller --shard-size")
    return order[rank::world]


class Flip:
    """Mirrors half the samples, drawing from a generator seeded by the run's seed and the worker: the same
    --seed (and --workers) mirrors the same samples."""

    def __init__(self, seed: int) -> None:
        self.seed, self.rng = seed, None

    def __call__(self) -> bool:
        if self.rng is None:  # first use in this (worker) process
            info = torch.utils.data.get_worker_info()
            self.rng = random.Random(self.seed * 1009 + 1 + (info.id if info else 0))
        return self.rng.random() < 0.5


def decode(sample: dict[str, Any], spec: InputSpec, num_classes: int, flip: Flip | None = None) -> dict[str, Any]:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_KEYS)})")
    try:
        px, _, _ = to_pixels(sample[key], spec)
    except DecodeError as e:
        raise ValueError(f"sample {sample.get('__key__')}: {e}") from None
    x = torch.from_numpy(px if px.flags.writeable else px.copy())
    if flip is not None and flip():
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
    pred = meta.get("pred")
    return {
        "image": x,
        "logits": logits,
        "has_logits": has_logits,
        "pred": int(pred) if pred is not None else (int(logits.argmax()) if has_logits else -1),
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
        "pred": torch.tensor([s["pred"] for s in samples], dtype=torch.long),
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


def open_streams(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's url_opener through kdcore.storage: local files, object stores, http(s), pipe: commands."""
    for sample in src:
        try:
            with storage.open_read(sample["url"]) as stream:
                yield {**sample, "stream": stream}
        except (OSError, UserError) as e:
            raise OSError(f"cannot read shard {storage.redact(sample['url'])}: {e}") from None


def tar_samples(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return group_by_keys(tar_file_expander(open_streams(src)))


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
        tar_samples,
    ]
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 1000), seed=seed * 7919 + epoch))
    mirror = Flip(seed) if flip and train else None
    stages += [
        wds.map(
            partial(decode, spec=spec or shards.input, num_classes=len(shards.classes or []), flip=mirror),
            handler=wds.warn_and_continue,
        ),  # a sample that does not decode is skipped with a warning
        wds.batched(batch_size, collation_fn=collate, partial=not train),
    ]
    pipeline = wds.DataPipeline(_Source(stages[0]), *stages[1:])
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                              prefetch_factor=4 if workers else None, persistent_workers=False))  # fmt: skip


class _Source(torch.utils.data.IterableDataset):
    """A picklable, re-iterable head for a DataPipeline."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def __iter__(self):
        return iter(self.make())

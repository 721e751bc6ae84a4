"""`distill eval`: accuracy against true labels, per-class accuracy, confusion matrix, and agreement with
the teacher (the share of samples where the model's class is the teacher's, from the shards' soft labels).
The two are different measures: accuracy needs labelled shards, agreement needs shards with soft labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.config import EvalConfig
from distill.data import Shards, loader, open_shards
from distill.metrics import write_json
from distill.models import load
from kdcore.errors import UserError
from kdcore.tensors import Normalize, resolve_device
from kdcore.view import InputSpec


@torch.inference_mode()
def evaluate_model(model: nn.Module, shards: Shards, device: torch.device, spec: InputSpec, batch_size: int = 512,
                   workers: int = 2) -> dict[str, Any]:  # fmt: skip
    """Metrics of `model` (which sees inputs as `spec`) on shards: accuracy where they hold true labels,
    agreement with the teacher where they hold its soft labels."""
    was_training = model.training
    model.eval()
    normalize = Normalize(spec, device)
    c = len(shards.classes)
    confusion = np.zeros((c, c), np.int64)
    agree = with_teacher = 0
    for batch in loader(shards, batch_size, train=False, workers=workers, spec=spec):
        pred = model(normalize(batch["image"])).argmax(1).cpu()
        labels = batch["label"]
        known = labels >= 0
        np.add.at(confusion, (labels[known].numpy(), pred[known].numpy()), 1)
        teacher_pred = batch["pred"]
        has = teacher_pred >= 0
        if has.any():
            agree += int((pred[has] == teacher_pred[has]).sum())
            with_teacher += int(has.sum())
    model.train(was_training)
    total = int(confusion.sum())
    out: dict[str, Any] = {"samples": total}
    if total:
        out["accuracy"] = float(np.trace(confusion) / total)
        per = confusion.diagonal() / np.maximum(1, confusion.sum(1))
        out["per_class_accuracy"] = {shards.classes[i]: float(per[i]) for i in range(c) if confusion[i].sum()}
        out["confusion"] = confusion.tolist()
    if with_teacher:
        out["agreement"] = agree / with_teacher
        out["teacher_samples"] = with_teacher
    return out


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run's student.pt on shards; writes eval.json and confusion.png into the run."""
    run_dir = Path(cfg.run)
    student = load(str(run_dir))
    shards = open_shards(cfg.data, cfg.manifest)
    if shards.classes != student.classes:
        raise UserError(f"the shards' classes {shards.classes[:5]}… are not the student's {student.classes[:5]}…")
    dev = resolve_device(cfg.device)
    model = student.model.to(dev).to(memory_format=torch.channels_last)
    res = evaluate_model(model, shards, dev, student.input, cfg.batch_size, cfg.workers)
    if "accuracy" not in res and "agreement" not in res:
        raise UserError(f"{cfg.data} holds neither true labels nor teacher soft labels: nothing to evaluate against")
    res["data"] = cfg.data
    out_dir = run_dir if run_dir.is_dir() else run_dir.parent
    write_json(out_dir / "eval.json", res)
    if "confusion" in res:
        plot_confusion(np.array(res["confusion"]), shards.classes, out_dir / "confusion.png")
    return res


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(classes) > 40:  # many classes: the 40 most frequent true classes
        keep = np.sort(np.argsort(-confusion.sum(1))[:40])
        confusion, classes = confusion[np.ix_(keep, keep)], [classes[i] for i in keep]
    norm = confusion / np.maximum(1, confusion.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.inference_mode()
def predictions(spec: str, shards: Shards, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true label) for every sample of the shards, in shard order, by the model `spec`."""
    model = load(spec)
    net = model.model.to(device).eval()
    normalize = Normalize(model.input, device)
    preds, labels = [], []
    for batch in loader(shards, 512, train=False, workers=0, spec=model.input):
        preds.append(net(normalize(batch["image"])).argmax(1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(preds), np.concatenate(labels)


def compare(teacher: str, student: str | None, data: str, device: str = "auto") -> dict[str, Any]:
    """On the same shards: the student's agreement with the teacher (the teacher run on them here), and, where
    the shards hold true labels, the teacher's and the student's accuracy."""
    dev = resolve_device(device)
    shards = open_shards(data, need_classes=False)
    t_pred, labels = predictions(teacher, shards, dev)
    known = labels >= 0
    out: dict[str, Any] = {"eval_samples": int(len(labels))}
    if known.any():
        out["teacher_accuracy"] = float((t_pred == labels)[known].mean())
    if student:
        s_pred, _ = predictions(student, shards, dev)
        if known.any():
            out["student_accuracy"] = float((s_pred == labels)[known].mean())
        out["agreement"] = float((s_pred == t_pred).mean())
    return out

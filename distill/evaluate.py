"""`distill eval`: accuracy, per-class accuracy, confusion matrix, agreement with the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.data import Shards, loader, open_shards
from distill.metrics import write_json
from distill.models import InputSpec, SpecError, load


@torch.inference_mode()
def evaluate_model(model: nn.Module, shards: Shards, device: torch.device, spec: InputSpec, batch_size: int = 512,
                   workers: int = 2) -> dict[str, Any]:  # fmt: skip
    """Metrics of `model` (which sees inputs as `spec`) on labelled shards; agreement with the teacher where
    the shards hold logits."""
    was_training = model.training
    model.eval()
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    c = len(shards.classes)
    confusion = np.zeros((c, c), np.int64)
    agree = with_logits = 0
    for batch in loader(shards, batch_size, train=False, workers=workers, spec=spec):
        x = (
            batch["image"]
            .to(device)
            .float()
            .div_(255)
            .sub_(mean)
            .div_(std)
            .contiguous(memory_format=torch.channels_last)
        )
        pred = model(x).argmax(1).cpu()
        labels = batch["label"]
        known = labels >= 0
        np.add.at(confusion, (labels[known].numpy(), pred[known].numpy()), 1)
        has = batch["has_logits"]
        if has.any():
            agree += int((pred[has] == batch["logits"][has].argmax(1)).sum())
            with_logits += int(has.sum())
    model.train(was_training)
    total = int(confusion.sum())
    out: dict[str, Any] = {"samples": total}
    if total:
        out["accuracy"] = float(np.trace(confusion) / total)
        per = confusion.diagonal() / np.maximum(1, confusion.sum(1))
        out["per_class_accuracy"] = {shards.classes[i]: float(per[i]) for i in range(c)}
        out["confusion"] = confusion.tolist()
    if with_logits:
        out["agreement"] = agree / with_logits
    return out


def evaluate(run: str, data: str, device: str = "auto", batch_size: int = 512, workers: int = 2) -> dict[str, Any]:
    """Evaluate a run's student.pt on labelled shards; writes eval.json and confusion.png into the run."""
    run_dir = Path(run)
    student = load(str(run_dir))
    shards = open_shards(data)
    if shards.classes != student.classes:
        raise SpecError(f"the shards' classes {shards.classes[:5]}… are not the student's {student.classes[:5]}…")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    model = student.model.to(dev).to(memory_format=torch.channels_last)
    res = evaluate_model(model, shards, dev, student.input, batch_size, workers)
    if "accuracy" not in res and "agreement" not in res:
        raise SpecError(f"{data} holds neither true labels nor teacher logits: nothing to evaluate against")
    res["data"] = data
    out_dir = run_dir if run_dir.is_dir() else run_dir.parent
    write_json(out_dir / "eval.json", res)
    if "confusion" in res:
        plot_confusion(np.array(res["confusion"]), shards.classes, out_dir / "confusion.png")
    return res


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    s = model.input
    mean = torch.tensor(s.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(s.std, device=device).view(1, -1, 1, 1)
    preds, labels = [], []
    for batch in loader(shards, 512, train=False, workers=0, spec=s):
        x = batch["image"].to(device).float().div_(255).sub_(mean).div_(std)
        preds.append(net(x).argmax(1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(preds), np.concatenate(labels)


def compare(teacher: str, student: str | None, data: str, device: str = "auto") -> dict[str, Any]:
    """Teacher accuracy, student accuracy and their agreement on the same labelled shards."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    shards = open_shards(data)
    t_pred, labels = predictions(teacher, shards, dev)
    known = labels >= 0
    out: dict[str, Any] = {
        "eval_samples": int(len(labels)),
        "teacher_accuracy": float((t_pred == labels)[known].mean()),
    }
    if student:
        s_pred, _ = predictions(student, shards, dev)
        out["student_accuracy"] = float((s_pred == labels)[known].mean())
        out["agreement"] = float((s_pred == t_pred).mean())
    return out

"""`distill eval`: how a student does on a data set, kept per data set in the run.

Against true labels: top-1 and top-5 accuracy, per-class accuracy, the confusion matrix. A labelled set that
holds only some of the student's classes (matched by name) is evaluated on those classes: the student's
prediction is restricted to them (as ImageNet-A/-R subsets are scored), the share over all its classes is
kept beside it, and the result says so. Against the teacher: top-1 agreement (the student's class is the
teacher's), top-5 agreement (the teacher's class is among the student's five) and the mean KL divergence
KL(teacher || student) of the softmaxes (T = 1, nats) where the teacher's full soft labels are known. The
teacher is the one whose soft labels the shards carry, or `--teacher SPEC`, run here on the very pixels the
student sees (kdcore.view.to_pixels with the student's input spec), which also labels unlabelled shards and a
plain folder of images.

Results: RUN/eval/NAME.json (NAME from the data, or --name), RUN/eval/NAME-confusion.png, and RUN/eval.json,
the index of every result in the run (its scalars, keyed by NAME).
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.config import EvalConfig
from distill.data import Shards, loader, open_shards
from kdcore import storage
from kdcore.errors import UserError
from kdcore.models import LoadedModel, load
from kdcore.tensors import Normalize, resolve_device
from kdcore.view import DecodeError, InputSpec, to_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TOPK = 5


class Tally:
    """Running sums of every measure, batch by batch."""

    def __init__(self, student_classes: list[str], data_classes: list[str] | None,
                 teacher_classes: list[str] | None) -> None:  # fmt: skip
        index = {c: i for i, c in enumerate(student_classes)}
        self.student_classes = student_classes
        data_classes = data_classes or []
        # the data's classes the student knows, in the data's order (the evaluated classes)
        self.evaluated = [c for c in data_classes if c in index]
        self.to_eval = np.array([self.evaluated.index(c) if c in index else -1 for c in data_classes] or [-1])
        self.cols = torch.tensor([index[c] for c in self.evaluated], dtype=torch.long)
        self.restricted = 0 < len(self.evaluated) < len(student_classes)
        self.to_student = torch.tensor([index[c] for c in self.evaluated], dtype=torch.long)
        n = len(self.evaluated)
        self.confusion = np.zeros((n, n), np.int64)
        self.top5 = self.all_classes = self.other = 0
        t_classes = teacher_classes or []
        self.t2s = torch.tensor([index.get(c, -1) for c in t_classes] or [-1], dtype=torch.long)
        self.same_space = t_classes == student_classes
        self.has_teacher = bool(t_classes)
        self.agree = self.agree5 = self.with_teacher = 0
        self.kl, self.with_kl = 0.0, 0
        self.images = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, t_pred: torch.Tensor,
            t_logits: torch.Tensor | None) -> None:  # fmt: skip
        """logits: the student's (N×C, cpu float); labels in the data's classes (-1: none); t_pred the teacher's
        class in the teacher's classes (-1: none); t_logits the teacher's logits where all are known."""
        self.images += len(logits)
        known = labels >= 0
        if known.any() and len(self.evaluated):
            ev = torch.from_numpy(self.to_eval[labels[known].numpy()])
            self.other += int((ev < 0).sum())
            ok = ev >= 0
            ev, sub = ev[ok], logits[known][ok]
            if len(ev):
                scores = sub[:, self.cols]  # the student's logits over the evaluated classes, in their order
                pred = scores.argmax(1)
                np.add.at(self.confusion, (ev.numpy(), pred.numpy()), 1)
                k = min(TOPK, scores.shape[1])
                self.top5 += int((scores.topk(k, 1).indices == ev[:, None]).any(1).sum())
                self.all_classes += int((sub.argmax(1) == self.to_student[ev]).sum())
        elif known.any():
            self.other += int(known.sum())
        has = (t_pred >= 0) & (t_pred < len(self.t2s))
        if self.has_teacher and has.any():
            target = self.t2s[t_pred[has]]
            mapped = target >= 0
            s = logits[has][mapped]
            target = target[mapped]
            self.with_teacher += len(target)
            self.agree += int((s.argmax(1) == target).sum())
            self.agree5 += int((s.topk(min(TOPK, s.shape[1]), 1).indices == target[:, None]).any(1).sum())
        if t_logits is not None and self.same_space and t_logits.shape == logits.shape:
            log_t, log_s = F.log_softmax(t_logits.float(), 1), F.log_softmax(logits, 1)
            self.kl += float((log_t.exp() * (log_t - log_s)).sum())
            self.with_kl += len(t_logits)

    def result(self) -> dict[str, Any]:
        total = int(self.confusion.sum())
        out: dict[str, Any] = {"images": self.images, "samples": total}
        many = len(self.student_classes) > TOPK
        if total:
            out["accuracy"] = float(np.trace(self.confusion) / total)
            if len(self.evaluated) > TOPK:
                out["top5_accuracy"] = self.top5 / total
            per = self.confusion.diagonal() / np.maximum(1, self.confusion.sum(1))
            out["per_class_accuracy"] = {self.evaluated[i]: float(per[i]) for i in range(len(self.evaluated))
                                         if self.confusion[i].sum()}  # fmt: skip
            out["confusion"] = self.confusion.tolist()
            out["classes_evaluated"] = self.evaluated
            if self.restricted:
                out["accuracy_all_classes"] = self.all_classes / total
                out["note"] = (f"evaluated on the {len(self.evaluated)} of the student's {len(self.student_classes)} "
                               "classes this data holds (predictions restricted to them)")  # fmt: skip
        if self.other:
            out["skipped_other_classes"] = self.other
        if self.with_teacher:
            out["agreement"] = self.agree / self.with_teacher
            if many:
                out["top5_agreement"] = self.agree5 / self.with_teacher
            out["teacher_samples"] = self.with_teacher
        if self.with_kl:
            out["kl_to_teacher"] = self.kl / self.with_kl
        return out


@torch.inference_mode()
def measure(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, spec: InputSpec,
            tally: Tally, teacher: Any = None) -> dict[str, Any]:  # fmt: skip
    """Run `model` (which sees inputs as `spec`) over the batches and fill `tally`; `teacher` (an OnlineTeacher)
    labels each batch, on the same pixels, instead of the soft labels the batches carry."""
    was_training = model.training
    model.eval()
    normalize = Normalize(spec, device)
    for batch in batches:
        logits = model(normalize(batch["image"].to(device))).float().cpu()
        if teacher is not None:
            t_logits = teacher(batch["image"].to(device).float().div_(255))[0].float().cpu()
            t_pred = t_logits.argmax(1)
        else:
            t_pred = batch["pred"]
            t_logits = batch["logits"] if bool(batch["has_logits"].all()) else None
        tally.add(logits, batch["label"], t_pred, t_logits)
    model.train(was_training)
    return tally.result()


def evaluate_model(model: nn.Module, shards: Shards, device: torch.device, spec: InputSpec, batch_size: int = 512,
                   workers: int = 2, classes: list[str] | None = None,
                   teacher: Any = None) -> dict[str, Any]:  # fmt: skip
    """Metrics of `model` (classes `classes`, default the shards' own) on shards: accuracy where they hold true
    labels, agreement and KL with the teacher where they hold its soft labels (or where `teacher` labels them)."""
    classes = classes or shards.classes
    t_classes = teacher.spec.classes if teacher is not None else shards.classes
    tally = Tally(classes, shards.classes, t_classes)
    batches = loader(shards, batch_size, train=False, workers=workers, spec=spec)
    return measure(model, batches, device, spec, tally, teacher)


def image_batches(url: str, spec: InputSpec, batch_size: int, skipped: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Every image file under a folder (any storage), decoded to `spec`, without labels; a file that does not
    decode is skipped (and listed in `skipped`)."""
    files = [rel for rel, _, _ in storage.find(url) if rel.lower().endswith(IMAGE_SUFFIXES)]
    images: list[torch.Tensor] = []
    for i, rel in enumerate(files):
        try:
            px, _, _ = to_pixels(storage.read_bytes(storage.join(url, rel)), spec)
            images.append(torch.from_numpy(px if px.flags.writeable else px.copy()))
        except (DecodeError, OSError) as e:
            skipped.append(f"{rel}: {e}")
        if images and (len(images) == batch_size or i == len(files) - 1):
            n = len(images)
            yield {"image": torch.stack(images), "label": torch.full((n,), -1), "pred": torch.full((n,), -1),
                   "logits": torch.zeros(n, 0), "has_logits": torch.zeros(n, dtype=torch.bool)}  # fmt: skip
            images = []


def image_folder(url: str, manifest: str | None) -> bool:
    """Whether --data is a plain folder of images (no manifest.json, some image files)."""
    if manifest or storage.scheme(url) in ("pipe", "http", "https") or any(c in url for c in "{*?["):
        return False
    if not storage.isdir(url) or storage.isfile(storage.join(url, "manifest.json")):
        return False
    return any(rel.lower().endswith(IMAGE_SUFFIXES) for rel, _, _ in storage.find(url))


def load_run(run: str) -> LoadedModel:
    """The student of a run directory (or a student.pt), on any storage; a missing run is one line."""
    run = storage.target(run, "RUN")
    if not storage.exists(run):
        raise UserError(f"run not found: {storage.redact(run)}; give a run directory written by 'distill train' "
                        "(or its student.pt)")  # fmt: skip
    if storage.isdir(run) and not storage.isfile(storage.join(run, "student.pt")):
        raise UserError(f"{storage.redact(run)} holds no student.pt: the run has not finished (continue it with "
                        "'distill train ... --resume')")  # fmt: skip
    return load(run)


def run_folder(run: str) -> str:
    """Where a run's results go: the run directory, or the folder of a student.pt given directly."""
    run = storage.target(run, "RUN")
    return run if storage.isdir(run) else storage.parent(run)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run's student.pt on a data set; writes RUN/eval/NAME.json (+ confusion png) and the index."""
    from distill.online import OnlineTeacher

    student = load_run(cfg.run)
    dev = resolve_device(cfg.device)
    model = student.model.to(dev).to(memory_format=torch.channels_last)
    teacher = OnlineTeacher(cfg.teacher, dev, len(student.classes)) if cfg.teacher else None
    if teacher is not None and teacher.spec.classes != student.classes:
        print(f"note: --teacher {storage.redact(cfg.teacher)} names its classes otherwise than the student; they are "
              "compared by position", file=sys.stderr)  # fmt: skip
        teacher.spec.classes = student.classes
    shown = storage.redact(cfg.data)
    if image_folder(cfg.data, cfg.manifest):
        if teacher is None:
            raise UserError(f"{shown} is a folder of images without labels: give --teacher SPEC to label them on the "
                            "fly (agreement), or export labelled shards with 'curate export'")  # fmt: skip
        skipped: list[str] = []
        tally = Tally(student.classes, None, student.classes)
        res = measure(model, image_batches(cfg.data, student.input, cfg.batch_size, skipped), dev, student.input,
                      tally, teacher)  # fmt: skip
        if skipped:
            res["skipped_files"] = len(skipped)
            print(f"note: {len(skipped)} files of {shown} did not decode and were skipped (e.g. {skipped[0]})",
                  file=sys.stderr)  # fmt: skip
        data_classes = None
    else:
        shards = open_shards(cfg.data, cfg.manifest, need_classes=False)
        data_classes = shards.classes or None
        labelled = bool(shards.manifest.get("labels")) and bool(data_classes)
        common = [c for c in (data_classes or []) if c in student.classes]
        if labelled and not common:
            raise UserError(f"the labels of {shown} ({', '.join((data_classes or [])[:5])}…) name none of the "
                            f"student's classes ({', '.join(student.classes[:5])}…)")  # fmt: skip
        soft = shards.soft_labels != "none"
        if not (labelled or soft or teacher):
            raise UserError(f"{shown} holds neither true labels nor teacher soft labels: give --teacher SPEC to label "
                            "it on the fly")  # fmt: skip
        tally = Tally(student.classes, data_classes, teacher.spec.classes if teacher else data_classes)
        batches = loader(shards, cfg.batch_size, train=False, workers=cfg.workers, spec=student.input)
        res = measure(model, batches, dev, student.input, tally, teacher)
    if "accuracy" not in res and "agreement" not in res:
        raise UserError(f"{shown}: nothing to evaluate against (no sample with a true label in the student's classes "
                        "or a teacher label)")  # fmt: skip
    res["data"] = shown
    res["teacher"] = storage.redact(cfg.teacher) if cfg.teacher else ("soft labels in the data" if
                                                                      "agreement" in res else None)  # fmt: skip
    if "note" in res:
        print(f"note: {res['note']}", file=sys.stderr)
    return save_result(run_folder(cfg.run), res, cfg.data, cfg.name)


def data_name(data: str) -> str:
    """A short file name for a data set: its folder's name (the folder of a pattern of tars)."""
    text = storage.redact(data).strip().rstrip("/")
    if text.startswith("pipe:"):
        text = text.split()[-1] if text.split() else "pipe"
    if any(c in storage.name(text) for c in "{*?[") or storage.name(text).endswith(".tar"):
        text = storage.parent(text)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", storage.name(text)).strip("-.") or "data"
    return name[:80]


def save_result(run: str, res: dict[str, Any], data: str, name: str | None = None,
                classes: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write one result as RUN/eval/NAME.json (+ NAME-confusion.png) and refresh RUN/eval.json, the index of
    every result in the run. A NAME already used by other data gets a short hash of the data appended."""
    shown = storage.redact(data)
    name = name or data_name(data)
    folder = storage.join(run, "eval")
    path = storage.join(folder, f"{name}.json")
    if not res.get("name") and storage.isfile(path):
        earlier = storage.read_json(path, "evaluation result")
        if isinstance(earlier, dict) and earlier.get("data") != shown:
            name = f"{name}-{hashlib.blake2b(shown.encode(), digest_size=3).hexdigest()}"
            path = storage.join(folder, f"{name}.json")
    res = {"name": name, **{k: v for k, v in res.items() if k != "name"}, "data": shown, "file": f"eval/{name}.json"}
    storage.write_json(path, res, tag="eval")
    if "confusion" in res:
        buf = io.BytesIO()
        plot_confusion(np.array(res["confusion"]), res.get("classes_evaluated") or classes or [], buf)
        storage.write_bytes(storage.join(folder, f"{name}-confusion.png"), buf.getvalue(), tag="eval")
    index: dict[str, Any] = {}
    for rel, _, _ in storage.find(folder):
        if "/" in rel or not rel.endswith(".json") or rel.startswith("."):
            continue
        try:
            one = storage.read_json(storage.join(folder, rel), "evaluation result")
        except UserError:
            continue
        if isinstance(one, dict):
            index[rel[: -len(".json")]] = {k: v for k, v in one.items() if not isinstance(v, (dict, list))}
    storage.write_json(storage.join(run, "eval.json"), {"latest": name, "results": index}, tag="eval")
    return res


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path | io.BytesIO) -> None:
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
    fig.savefig(path, dpi=110, format="png")
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

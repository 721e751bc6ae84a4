"""The pictures of `curate report` (matplotlib, PNG beside report.html): score histograms, class histograms,
ROC curves, the selection's composition, and thumbnail grids (only the shown samples are re-read)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from curate.sources import parse_source, read_keys  # noqa: E402
from kdcore.errors import UserError  # noqa: E402
from kdcore.view import DecodeError, InputSpec, to_pixels  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def histograms(path: Path, hists: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]) -> str:
    """Per score, the share of each source's samples per bin (score -> (edges, source -> counts))."""
    fig, axes = plt.subplots(1, max(1, len(hists)), figsize=(5 * max(1, len(hists)), 3.4), squeeze=False)
    for ax, (score, (edges, per)) in zip(axes[0], hists.items(), strict=False):
        for src, h in per.items():
            ax.stairs(h / max(1, h.sum()), edges, label=src, linewidth=1.6)
        ax.set_title(f"{score} (higher = more related)", fontsize=10)
        ax.set_ylabel("share of the source")
    axes[0][0].legend(fontsize=8, frameon=False)
    return _save(fig, path)


def class_bars(path: Path, hist: dict[str, np.ndarray], classes: list[str], title: str, entropy) -> str:
    """Predicted-class histograms per source, labelled with the class names (up to 30 classes)."""
    n = len(hist)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, (src, h) in zip(axes.flat, hist.items(), strict=False):
        ax.bar(range(len(h)), h / max(1, h.sum()), color="#4c72b0")
        ax.set_title(f"{src}: H/log C = {entropy(h):.2f}", fontsize=9)
        ax.set_xticks(range(len(h)), [c[:14] for c in classes], rotation=90, fontsize=6.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def roc_curves(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> str:
    """ROC curves (task sources positive) of every score: score -> (fpr, tpr, auroc)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for score, (fpr, tpr, auc) in sorted(curves.items(), key=lambda kv: -kv[1][2]):
        ax.plot(fpr, tpr, label=f"{score} ({auc:.3f})", linewidth=1.4)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (other sources)")
    ax.set_ylabel("true positive rate (task sources)")
    ax.set_title("ROC of each score (AUROC)", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _save(fig, path)


def selection_bars(path: Path, composition: list[dict], total: np.ndarray, classes: list[str], entropy) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(len(composition))
    pool = np.array([c["pool"] for c in composition], float)
    sel = np.array([c["selected"] for c in composition], float)
    a.bar(x - 0.2, pool / pool.sum(), 0.4, label="pool")
    a.bar(x + 0.2, sel / max(1, sel.sum()), 0.4, label="selection")
    a.set_xticks(x, [c["source"] for c in composition], rotation=30, fontsize=8)
    a.set_title("composition by source (share)", fontsize=10)
    a.legend(frameon=False, fontsize=8)
    b.bar(range(len(classes)), total / max(1, total.sum()), color="#dd8452")
    b.axhline(1 / len(classes), color="grey", linestyle=":", linewidth=1)
    b.set_title(f"selection: predicted class (H/log C = {entropy(total):.2f})", fontsize=10)
    if len(classes) <= 30:
        b.set_xticks(range(len(classes)), [c[:14] for c in classes], rotation=90, fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ thumbnails


def pixels(meta: dict[str, Any], items: list[dict]) -> dict[tuple[str, str, str], np.ndarray]:
    """(source, unit, key) -> the teacher's view of the sample, for the given rows (only these are re-read).
    A source that moved away since scoring gives no pixels; the rest of the report stands."""
    spec = InputSpec.from_dict(meta["input"])
    wanted: dict[str, dict[str, set[str]]] = {}
    for r in items:
        wanted.setdefault(r["source"], {}).setdefault(r["unit"], set()).add(r["key"])
    out = {}
    for src_name, units in wanted.items():
        try:
            source = parse_source(meta["sources"][src_name]["spec"])
            for unit, sample in read_keys(source, units):
                try:
                    out[(src_name, unit, sample.key)] = to_pixels(sample.data, spec)[0]
                except DecodeError:
                    continue
        except (UserError, OSError, ValueError, KeyError):
            continue
    return out


def thumbnail(path: Path, img: np.ndarray | None, side: int = 96) -> str | None:
    """One sample's thumbnail (C×H×W uint8, the teacher's view) as a side×side PNG, for an HTML caption under
    it; None when its pixels could not be re-read."""
    if img is None:
        return None
    from PIL import Image

    arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(arr))
    im.resize((side, side), Image.NEAREST if max(im.size) < side else Image.BILINEAR).save(path)
    return path.name


def grid(path: Path, rows: list[tuple[str, list[dict]]], px: dict, title: str) -> str:
    """A grid of thumbnails: one row per (label, samples); each captioned with its sample id, the teacher's
    class and the score."""
    cols = max([len(items) for _, items in rows] + [1])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.35 * cols + 0.8, 1.75 * len(rows) + 0.4), squeeze=False)
    for i, (label, items) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(items):
                continue
            r = items[j]
            img = px.get((r["source"], r["unit"], r["key"]))
            if img is not None:
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                          cmap="gray" if img.shape[0] == 1 else None, interpolation="nearest")  # fmt: skip
            sid = r["sample_id"] if len(r["sample_id"]) <= 22 else "…" + r["sample_id"][-21:]
            score = "-" if r["score"] is None else f"{r['score']:.2f}"
            ax.set_title(f"{sid}\n{r['class'][:18]}\n{score}", fontsize=5.5)
        axes[i][0].text(-0.12, 0.5, label, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)

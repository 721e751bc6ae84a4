"""Run files: metrics.jsonl (one JSON object per line), curves.png, config.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kdcore import storage


def write_json(path: Path, obj: Any) -> None:
    storage.write_json(str(path), obj, tag="train")


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def plot_curves(metrics: Path, out: Path) -> None:
    """Loss, learning rate and evaluation accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_title("training loss")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="#dd8452")
    axes[1].set_title("learning rate")
    if ev:
        axes[2].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], marker="o", label="accuracy")
        if any("agreement" in r for r in ev):
            axes[2].plot([r["step"] for r in ev if "agreement" in r], [r["agreement"] for r in ev if "agreement" in r],
                         marker="s", label="agreement with teacher")  # fmt: skip
        axes[2].legend(frameon=False, fontsize=8)
    axes[2].set_title("evaluation")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

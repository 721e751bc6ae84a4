"""Shared fixtures: a tiny teacher trained here, in seconds, on scikit-learn's digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.generated import _digits
from curate.score import ScoreConfig, score
from distill import models
from distill.train import FitConfig, fit_arrays, to_input

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPEC = models.InputSpec(8, 1, (0.25,), (0.35,))


def train_digits_teacher(path: Path, name: str = "cnn-tiny", steps: int = 150) -> Path:
    x, y = _digits()
    model, factory, kwargs = models.build(name, 10, DIGITS_SPEC)
    torch.manual_seed(0)
    fit_arrays(model, to_input(x[:1500], DIGITS_SPEC), torch.from_numpy(y[:1500]), FitConfig(steps=steps))
    models.save_checkpoint(path, model, factory, kwargs, [str(i) for i in range(10)], DIGITS_SPEC)
    return path


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BatchNorm CNN trained on digits[:1500] (8×8 grayscale), saved as a distill checkpoint."""
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def mlp_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher without BatchNorm."""
    return train_digits_teacher(tmp_path_factory.mktemp("mlp") / "mlp.pt", name="mlp", steps=60)


def run_cli(*args: str, timeout: int = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run a console entry (e.g. 'curate', 'score', ...) as a real subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n1 n2)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


@pytest.fixture(scope="session")
def pool(teacher, tmp_path_factory):
    """digits[1500:] (held out from the teacher) against noise, dead leaves and glyphs."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    cfg = ScoreConfig(
        teacher=str(teacher),
        sources=[
            "digits=builtin:digits?start=1500&unit=100",
            "noise=synthetic:noise?n=300&unit=128",
            "leaves=synthetic:dead-leaves?n=200",
            "glyphs=synthetic:glyphs?n=200",
        ],
        pool=str(root),
        batch_size=64,
        show_progress=False,
    )
    result = score(cfg)
    assert result.rows == 297 + 300 + 200 + 200
    return root

"""Batch augmentation: every view is what it claims to be, and mixed labels follow the mixed images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.augment import AugmentConfig, augment, cutmix, mixup, randaugment, random_crop, random_flip
from distill.losses import LossConfig, combine


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_random_crop_is_a_window_of_the_padded_image(batch):
    out = random_crop(batch, 2, torch.Generator().manual_seed(1))
    padded = F.pad(batch, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(batch)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])]  # fmt: skip
        assert hits, f"sample {i} is not a window of its own padded image"
        offsets.add(hits[0])
    assert len(offsets) > 3  # offsets differ per sample


def test_flip_per_sample(batch):
    out = random_flip(batch, torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[i], batch[i].flip(-1)) for i in range(len(batch))]
    kept = [torch.equal(out[i], batch[i]) for i in range(len(batch))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0 < sum(flipped) < len(batch)


def test_mixup_and_cutmix_say_how_they_mixed(batch):
    torch.manual_seed(0)
    mixed, mix = mixup(batch, 0.4)
    assert torch.allclose(mixed, mix.lam * batch + (1 - mix.lam) * batch[mix.perm])
    cut, mix = cutmix(batch, 1.0)
    own = (cut == batch).all(1).float().mean().item()  # share of pixels still the sample's own
    other = (cut == batch[mix.perm]).all(1) & (cut != batch).all(1)
    assert own + other.float().mean().item() == pytest.approx(1.0)
    assert mix.lam == pytest.approx(own, abs=1e-6)


def test_randaugment_keeps_shape_and_range(batch):
    torch.manual_seed(0)
    out = randaugment(batch, groups=4)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, batch)


def test_randaugment_draws_one_op_sequence_per_group():
    """16 copies of one image in 4 groups: equal within a group (one draw), different across groups."""
    torch.manual_seed(4)
    one = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = randaugment(one.expand(16, -1, -1, -1).contiguous(), groups=4)
    groups = out.view(4, 4, 3, 16, 16)
    assert all(torch.equal(g[0], g[i]) for g in groups for i in range(4))
    assert len({tuple(g[0].flatten().tolist()) for g in groups}) > 1


def test_augment_pipeline_options(batch):
    x, mix = augment(batch, AugmentConfig())
    assert mix is None and torch.equal(x, batch)
    torch.manual_seed(3)
    x, mix = augment(batch, AugmentConfig(crop=1, flip=True, mixup=0.2, cutmix=0.2))
    assert mix is not None and x.shape == batch.shape


def test_mixed_true_labels_follow_the_mix():
    """Supervised with mixup: the loss is λ·CE(own label) + (1−λ)·CE(the partner's label); unlabelled
    samples (-1), or samples mixed with one, do not count."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, -1, 1])
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    mix = type("Mix", (), {"perm": perm, "lam": 0.3})()
    got = combine(LossConfig("ce", labels="true"), student, None, labels, mix=mix)
    logp = F.log_softmax(student, 1).numpy()
    rows = [i for i in range(6) if labels[i] >= 0 and labels[perm[i]] >= 0]
    want = np.mean([-(0.3 * logp[i, labels[i]] + 0.7 * logp[i, labels[perm[i]]]) for i in rows])
    assert rows == [0, 1, 2, 3] and float(got) == pytest.approx(want, rel=1e-5)

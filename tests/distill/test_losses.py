"""Each loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import LossConfig, combine, drop_classes, kd


def softmax(v: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


S = [1.0, 2.0, 0.5]
T = [3.0, 0.0, 1.0]


def hand_kd(s: list[float], t: list[float], temp: float) -> float:
    ps, pt = softmax(s, temp), softmax(t, temp)
    return temp * temp * sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True) if q > 0)


def hand_ce(s: list[float], target: int) -> float:
    return -math.log(softmax(s)[target])


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_is_t_squared_kl(temp):
    got = kd(torch.tensor([S]), torch.tensor([T]), temp).item()
    assert got == pytest.approx(hand_kd(S, T, temp), rel=1e-5)
    assert kd(torch.tensor([T]), torch.tensor([T]), temp).item() == pytest.approx(0.0, abs=1e-6)


def test_ce_on_teacher_argmax_and_on_true_labels():
    s, t = torch.tensor([S]), torch.tensor([T])
    assert combine(LossConfig("ce"), s, t).item() == pytest.approx(hand_ce(S, 0), rel=1e-5)
    true = torch.tensor([2])
    assert combine(LossConfig("ce", labels="true"), s, t, true).item() == pytest.approx(hand_ce(S, 2), rel=1e-5)
    assert combine(LossConfig("ce", labels="true"), s, None, true).item() == pytest.approx(hand_ce(S, 2), rel=1e-5)


def test_kd_plus_ce_mixes_with_alpha():
    got = combine(LossConfig("kd+ce", temperature=2.0, alpha=0.3), torch.tensor([S]), torch.tensor([T])).item()
    assert got == pytest.approx(0.3 * hand_kd(S, T, 2.0) + 0.7 * hand_ce(S, 0), rel=1e-5)


def test_class_dropping_renormalises_over_the_top_k():
    dropped = drop_classes(torch.tensor([T]), 2)
    assert dropped[0, 1].item() == float("-inf") and dropped[0, 0].item() == 3.0
    got = combine(LossConfig("kd", temperature=1.0, topk_classes=2), torch.tensor([S]), torch.tensor([T])).item()
    # the teacher keeps classes 0 and 2, renormalised; class 1 gets probability 0
    pt = softmax([3.0, 1.0])
    ps = softmax(S)
    assert got == pytest.approx(pt[0] * math.log(pt[0] / ps[0]) + pt[1] * math.log(pt[1] / ps[2]), rel=1e-5)


def test_per_sample_weights():
    s = torch.tensor([S, T])
    t = torch.tensor([T, S])
    w = torch.tensor([3.0, 1.0])
    got = combine(LossConfig("kd", temperature=1.0), s, t, weights=w).item()
    assert got == pytest.approx((3 * hand_kd(S, T, 1.0) + hand_kd(T, S, 1.0)) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        combine(LossConfig("nope"), s, t)

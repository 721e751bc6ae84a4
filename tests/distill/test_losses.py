"""Each loss against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.losses import LossConfig, combine, drop_classes, feature_l2, kd, projection, rkd_angle, rkd_distance


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


def test_feature_l2_against_hand_computation():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)
    proj = projection(4, 2, spatial=False)
    w = proj.weight.detach().numpy()
    want = ((s.numpy() @ w.T - t.numpy()) ** 2).mean(1)
    assert np.allclose(feature_l2(s, t, proj).detach().numpy(), want, atol=1e-6)
    # maps: a 1×1 conv, and the larger map average-pooled to the smaller one
    sm, tm = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 2, 2, generator=gen)
    conv = projection(3, 5, spatial=True)
    pooled = torch.nn.functional.avg_pool2d(conv(sm), 2)
    want = ((pooled - tm) ** 2).flatten(1).mean(1)
    assert torch.allclose(feature_l2(sm, tm, conv), want, atol=1e-6)


def _smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.where(d < 1, 0.5 * d**2, d - 0.5).mean())


def test_rkd_distance_against_hand_computation():
    s = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # pairwise distances 3, 4, 5
    t = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # 1, 1, √2

    def normed(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    want = _smooth_l1(normed(s), normed(t))
    got = rkd_distance(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert float(got) == pytest.approx(want, rel=1e-5) and want > 0
    assert float(rkd_distance(torch.tensor(s) * 7, torch.tensor(s))) == pytest.approx(0, abs=1e-6)  # scale-free


def test_rkd_angle_against_hand_computation():
    gen = np.random.default_rng(0)
    s, t = gen.normal(size=(4, 3)), gen.normal(size=(4, 5))

    def cosines(e):
        out = []
        for j in range(4):
            for i in range(4):
                for k in range(4):
                    a, b = e[i] - e[j], e[k] - e[j]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    out.append(0.0 if na == 0 or nb == 0 else a @ b / (na * nb))
        return np.array(out)

    want = _smooth_l1(cosines(s), cosines(t))
    got = rkd_angle(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert float(got) == pytest.approx(want, rel=1e-4) and want > 0
    rot = np.linalg.qr(gen.normal(size=(3, 3)))[0]  # angles survive a rotation and a scale
    assert float(rkd_angle(torch.tensor(s @ rot * 3.0), torch.tensor(s))) == pytest.approx(0, abs=1e-6)

"""Each score against a hand computation on a tiny model with known weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curate.teacher import ScoringModel, logit_scores, odin_score


def test_logit_scores_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    s = logit_scores(z)
    e = [math.exp(2), 1.0, math.exp(-1)]
    p = [v / sum(e) for v in e]
    assert s["pred"].tolist() == [0, 0]
    assert s["confidence"][0].item() == pytest.approx(p[0], rel=1e-6)
    assert s["margin"][0].item() == pytest.approx(p[0] - p[1], rel=1e-6)
    assert s["max_logit"][0].item() == 2.0
    assert s["energy"][0].item() == pytest.approx(math.log(sum(e)), rel=1e-6)
    h = -sum(q * math.log(q) for q in p) / math.log(3)
    assert s["entropy"][0].item() == pytest.approx(-h, rel=1e-6)
    # uniform logits: the least related point there is
    assert s["entropy"][1].item() == pytest.approx(-1.0, rel=1e-6)
    assert s["confidence"][1].item() == pytest.approx(1 / 3, rel=1e-6)
    assert s["margin"][1].item() == pytest.approx(0.0, abs=1e-7)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.fc(self.bn(x))


def tiny() -> Tiny:
    m = Tiny()
    m.bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    m.bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    m.bn.eps = 0.0
    m.bn.weight.data.fill_(1.0)
    m.bn.bias.data.fill_(0.0)
    m.fc.weight.data = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    return m.eval()


def test_hook_scores_by_hand():
    model = tiny()
    x = torch.tensor([[3.0, 1.0]])
    with torch.inference_mode():
        out = ScoringModel(model)(x)
    # BN: z = ((3-1)/2, (1+1)/1) = (1, 2); bn input per-sample mean is x itself (1-d)
    assert out.hook_scores["bn_score"].item() == pytest.approx(-math.sqrt((1 + 4) / 2))
    h = torch.tensor([1.0, 2.0])  # BN output = input of the final linear
    assert out.embedding[0].tolist() == pytest.approx(h.tolist())
    assert out.hook_scores["feat_norm"].item() == pytest.approx(math.sqrt(5))
    logits = [3 * 1 + 4 * 2, 1.0]
    assert out.logits[0].tolist() == pytest.approx(logits)
    # pred = class 0, w = (3, 4): projection h·w/|w| = 11/5
    assert out.hook_scores["proj_score"].item() == pytest.approx(11 / 5)


def test_bn_score_grows_with_deviation_from_running_stats():
    model = tiny()
    near = torch.tensor([[1.0, -1.0]])
    far = torch.tensor([[9.0, 5.0]])
    with torch.inference_mode():
        s = ScoringModel(model)
        assert s(near).hook_scores["bn_score"].item() == pytest.approx(0.0)
        assert s(far).hook_scores["bn_score"].item() < -3


def test_named_embedding_layer_and_no_bn_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    s = ScoringModel(model, embed_layer="1")
    with torch.inference_mode():
        out = s(torch.ones(5, 1, 2, 2))
    assert out.embedding.shape == (5, 3) and "bn_score" not in out.hook_scores and not s.has_bn
    assert out.hook_scores["feat_norm"].shape == (5,)
    with pytest.raises(ValueError, match="no module 'nope'"):
        ScoringModel(model, embed_layer="nope")


def test_odin_perturbation_raises_the_tempered_confidence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(6, 1, 2, 4)
    plain = torch.softmax(model(x) / 1000.0, 1).max(1).values
    odin = odin_score(model, x, temperature=1000.0, eps=0.01)
    assert (odin >= plain - 1e-7).all() and (odin > plain).any()


def test_span_score_and_bn_layers_by_hand():
    """span_score = ||P_W h|| / ||h||, P_W the projection on the span of the classifier's rows; bn_layers holds
    one RMS z per BatchNorm layer and bn_score is minus their mean."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False)).eval()
    model[0].eps = 0.0
    model[0].running_var.fill_(1.0)
    model[1].weight.data = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # rows span the first two axes
    x = torch.tensor([[3.0, 4.0, 12.0]])
    with torch.inference_mode():
        s = ScoringModel(model)
        out = s(x)
    assert out.hook_scores["span_score"].item() == pytest.approx(5 / 13)
    assert out.bn_layers.shape == (1, 1)
    assert out.bn_layers[0, 0].item() == pytest.approx(math.sqrt((9 + 16 + 144) / 3))
    assert out.hook_scores["bn_score"].item() == pytest.approx(-out.bn_layers.mean().item())
    # as many classes as features: the classifier sees all of h, so there is no span score (a null column)
    square = nn.Sequential(nn.Flatten(), nn.Linear(3, 3)).eval()
    with torch.inference_mode():
        assert "span_score" not in ScoringModel(square)(x).hook_scores

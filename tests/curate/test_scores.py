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


def test_bn_z_and_auto_against_hand_computed_values(tmp_path):
    """bn_z = -(sum over layers of bn_layers[l] / sd_l) / L, sd_l the layer's population standard deviation over
    the pool; auto = (3 rank(bn_z) + rank(span_score) + rank(energy)) / 5 with percent ranks. Checked by DuckDB on
    a hand-made table against numpy."""
    import duckdb
    import numpy as np

    from curate.scores import bn_z_sql, derived_sql

    layers = np.array([[1.0, 10.0], [2.0, 30.0], [4.0, 20.0], [3.0, 60.0]])
    span = np.array([0.1, 0.4, 0.3, 0.2])
    energy = np.array([5.0, 1.0, 2.0, 3.0])
    con = duckdb.connect()
    con.execute("CREATE TABLE s (bn_layers FLOAT[2], span_score FLOAT, energy FLOAT, bn_score FLOAT, i INT)")
    for i in range(4):
        con.execute("INSERT INTO s VALUES (?, ?, ?, ?, ?)", [layers[i].tolist(), span[i], energy[i],
                                                            -layers[i].mean(), i])  # fmt: skip
    z = con.execute(f"SELECT {bn_z_sql(2)} FROM s ORDER BY i").fetchnumpy()
    want = -(layers / layers.std(0)).sum(1) / 2
    assert list(z.values())[0] == pytest.approx(want, rel=1e-4)
    con.execute(f"CREATE VIEW t AS SELECT *, {bn_z_sql(2)} AS bn_z FROM s")
    auto = derived_sql("auto", {"bn_score", "span_score", "energy"}, bn_layers=2)
    got = con.execute(f"SELECT {auto} FROM t ORDER BY i").fetchnumpy()

    def prank(x):
        return np.argsort(np.argsort(x)) / (len(x) - 1)

    expect = (3 * prank(want) + prank(span) + prank(energy)) / 5
    assert list(got.values())[0] == pytest.approx(expect, abs=1e-6)
    assert derived_sql("auto", {"span_score", "energy"}) == (
        "((1 * percent_rank() OVER (ORDER BY span_score NULLS FIRST) + 1 * percent_rank() OVER (ORDER BY energy "
        "NULLS FIRST)) / 2)::FLOAT"
    )  # no BatchNorm: the other two, equally


def test_two_component_split_recovers_a_planted_mixture():
    import numpy as np

    from curate.scores import two_component_split

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 3000), rng.normal(6, 1, 1000)])
    split = two_component_split(x)
    assert split.means == pytest.approx((0, 6), abs=0.1) and split.sds == pytest.approx((1, 1), abs=0.1)
    assert split.share_high == pytest.approx(0.25, abs=0.02)
    # the threshold is where the fitted weighted densities cross (3 + ln(3)/6 for the planted ones)
    (m0, m1), (s0, s1), w1 = split.means, split.sds, split.share_high
    grid = np.linspace(m0, m1, 100_001)
    dens = [w / s * np.exp(-0.5 * ((grid - m) / s) ** 2) for w, m, s in ((1 - w1, m0, s0), (w1, m1, s1))]
    assert split.threshold == pytest.approx(grid[np.argmax(dens[1] >= dens[0])], abs=(m1 - m0) / 500)
    assert split.threshold == pytest.approx(3 + np.log(3) / 6, abs=0.1)
    assert split.separation == pytest.approx(np.sqrt(2) * 6 / np.sqrt(2), abs=0.2) and split.verdict == "clean"
    assert two_component_split(np.ones(50)) is None

"""The registry of relatedness scores (design §5): the pool's columns, the forward pass (curate/teacher.py),
export's per-sample json, the report and `curate select --score` all derive from SCORES, so a new score
is one entry here plus its computation in curate/teacher.py. No torch here: `curate sql` stays light.

Every score is stored so that **higher means more related to the teacher's task**. The definitions
below are written verbatim into pool.json. All are sample-free: they need no in-distribution sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIRECTION = "higher means more related to the teacher's task"


@dataclass(frozen=True)
class Score:
    name: str
    definition: str
    origin: str  # logits | hooks | odin: where the value comes from in the forward pass
    optional: bool = False  # computed only when asked for (--odin)


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("confidence", "max softmax probability, max_k p_k", "logits"),
        Score("margin", "difference of the two largest softmax probabilities, p_(1) - p_(2)", "logits"),
        Score("entropy", "negative normalised entropy of the softmax, -H(p)/log C, in [-1, 0]", "logits"),
        Score("energy", "negative free energy, logsumexp_k z_k", "logits"),
        Score("max_logit", "largest logit, max_k z_k", "logits"),
        Score(
            "bn_score",
            "negative mean over BatchNorm layers of the RMS over channels of z_c = (m_c - "
            "running_mean_c) / sqrt(running_var_c + eps), m_c the per-sample spatial mean of the layer's input; "
            "null without BatchNorm",
            "hooks",
        ),  # fmt: skip
        Score("feat_norm", "L2 norm of the embedding fed to the final linear layer, ||h||", "hooks"),
        Score(
            "proj_score",
            "projection of that embedding on the predicted class's weight vector, h·w_pred / ||w_pred||",
            "hooks",
        ),  # fmt: skip
        Score(
            "span_score",
            "share of the embedding's norm inside the span of the final layer's class weight vectors, ||P_W h|| / ||h||"
            " (sample-free; null when the classes span the whole feature space)",
            "hooks",
        ),
        Score(
            "odin",
            "ODIN: max softmax at temperature T after one input step of size eps against the gradient "
            "of the log max softmax (only with --odin)",
            "odin",
            optional=True,
        ),  # fmt: skip
    )
}


def score_names(odin: bool = False) -> list[str]:
    """The score columns a pool holds, in registry order."""
    return [s.name for s in SCORES.values() if not s.optional or (s.name == "odin" and odin)]


@dataclass(frozen=True)
class Derived:
    """A score computed over the pool when it is queried (a column of the `samples` view), from stored ones."""

    name: str
    definition: str
    parts: tuple[str, ...]
    weights: tuple[float, ...] = ()


DERIVED: dict[str, Derived] = {
    "bn_z": Derived(
        "bn_z",
        "negative sum over BatchNorm layers of the layer's deviation (bn_layers) divided by its standard deviation "
        "over the pool: each layer counts by how much it varies here, so the first layers, whose deviations are "
        "small and rank plain noise as normal, no longer weigh as much as the deep ones; bn_score where the pool "
        "stores no bn_layers",
        ("bn_layers",),
    ),
    "auto": Derived(
        "auto",
        "weighted mean percentile rank in the pool of bn_z (weight 3), span_score (1) and energy (1), those the "
        "teacher has: BatchNorm statistics, the classifier's span and the logits fail on different pools, so their "
        "ranks are fused, with the BatchNorm one, the best worst case alone, leading; the default, chosen by its "
        "worst case over the teacher/pool pairs of benchmarks/relatedness.py; with reference images (select "
        "--reference), averaged with the rank of ref_score",
        ("bn_z", "span_score", "energy"),
        (3.0, 1.0, 1.0),
    ),
}


def bn_z_sql(layers: int) -> str:
    """bn_z over `layers` stored BatchNorm deviations: sum of bn_layers[l] / sd_l, negated (ranks ignore the
    constant the per-layer means would add); window aggregates, one pass over the pool."""
    terms = " + ".join(f"bn_layers[{i}] / (stddev_pop(bn_layers[{i}]) OVER () + 1e-6)" for i in range(1, layers + 1))
    return f"(-({terms}) / {layers})::FLOAT"


def derived_parts(name: str, available: set[str], bn_layers: int = 0) -> list[tuple[str, float]]:
    """The (part, weight) pairs of a rank-fused derived score that the pool holds."""
    d = DERIVED[name]
    have = set(available) | ({"bn_z"} if "bn_score" in available or bn_layers else set())
    return [(p, w) for p, w in zip(d.parts, d.weights or (1.0,) * len(d.parts), strict=True) if p in have]


def derived_sql(name: str, available: set[str], reference: bool = False, bn_layers: int = 0) -> str | None:
    """The SQL (window functions over the pool) of a derived score, from the parts the pool holds. `bn_layers`:
    how many BatchNorm layers the pool stores per sample (0: none, bn_z falls back to bn_score). With
    `reference` (a `ref_score` column from reference images, `curate select --reference`), the reference score's
    rank takes half the weight: a few images of the task outweigh what the teacher alone can tell."""
    if name == "bn_z":
        if bn_layers:
            return bn_z_sql(bn_layers)
        return "bn_score" if "bn_score" in available else None
    parts = derived_parts(name, available, bn_layers)
    if not parts:
        return None
    total = sum(w for _, w in parts)
    ranks = " + ".join(f"{w:g} * percent_rank() OVER (ORDER BY {p} NULLS FIRST)" for p, w in parts)
    fused = f"({ranks}) / {total:g}"
    if reference:
        fused = f"(({fused}) + percent_rank() OVER (ORDER BY ref_score NULLS FIRST)) / 2"
    return f"({fused})::FLOAT"


FIT_ROWS = 50_000  # the two-component fit reads at most this many scores (a deterministic sample)


@dataclass(frozen=True)
class Split:
    """A two-component Gaussian mixture fitted to a score's distribution over the pool: the "related" component
    is the one with the higher mean; `threshold` is where a sample becomes more likely to belong to it."""

    threshold: float
    separation: float  # Ashman's D = sqrt(2)|mu_hi - mu_lo| / sqrt(sd_hi^2 + sd_lo^2); above 2: cleanly split
    share_high: float  # the related component's weight
    means: tuple[float, float]
    sds: tuple[float, float]

    @property
    def verdict(self) -> str:
        if self.separation >= 2:
            return "clean"
        if self.separation >= 1.2:
            return "partial"
        return "weak"


def two_component_split(x: np.ndarray, iters: int = 200) -> Split | None:
    """Fit N(mu_lo, sd_lo) + N(mu_hi, sd_hi) to `x` by EM (started at the quartiles; deterministic) and return
    the split; None with fewer than 8 distinct finite values."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) > FIT_ROWS:  # the fit needs the shape, not every row
        x = np.random.default_rng(0).choice(x, FIT_ROWS, replace=False)
    if len(np.unique(x[:100_000])) < 8:
        return None
    spread = float(x.std()) or 1.0
    mu = np.percentile(x, [25, 75]).astype(np.float64)
    sd = np.full(2, spread / 2)
    w = np.array([0.5, 0.5])
    floor = spread * 1e-3
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        logp -= logp.max(1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-12
        new = (r * x[:, None]).sum(0) / nk
        sd = np.maximum(np.sqrt((r * (x[:, None] - new) ** 2).sum(0) / nk), floor)
        w = nk / len(x)
        done = np.allclose(new, mu, atol=spread * 1e-6)
        mu = new
        if done:
            break
    lo, hi = (0, 1) if mu[0] <= mu[1] else (1, 0)
    grid = np.linspace(mu[lo], mu[hi], 512)
    dens = [w[k] / sd[k] * np.exp(-0.5 * ((grid - mu[k]) / sd[k]) ** 2) for k in (lo, hi)]
    above = np.flatnonzero(dens[1] >= dens[0])
    threshold = float(grid[above[0]]) if len(above) else float((mu[lo] + mu[hi]) / 2)
    d = float(np.sqrt(2) * abs(mu[hi] - mu[lo]) / np.sqrt(sd[hi] ** 2 + sd[lo] ** 2))
    return Split(threshold, d, float(w[hi]), (float(mu[lo]), float(mu[hi])), (float(sd[lo]), float(sd[hi])))


def related_split(x: np.ndarray, levels: int = 3) -> Split | None:
    """The split the default selection takes its candidates from: the two-component fit, fitted again to the upper
    side while that side holds more than half of the samples (at most `levels` fits). A crawl's unrelated data is
    several populations, and the first fit may set only the most unlike one apart (rendered text, say) and call
    the rest related; a task is rarely the majority of a pool it is searched in."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    best = None
    for _ in range(levels):
        split = two_component_split(x)
        if split is None:
            break
        best = split
        upper = x[x >= split.threshold]
        if len(upper) <= len(x) / 2:
            break
        x = upper
    return best

"""The registry of relatedness scores (design §5): the pool's columns, the forward pass (curate/teacher.py),
export's per-sample json, the report and `curate select --score` all derive from SCORES, so a new score
is one entry here plus its computation in curate/teacher.py. No torch here: `curate sql` stays light.

Every score is stored so that **higher means more related to the teacher's task**. The definitions
below are written verbatim into pool.json. All are sample-free: they need no in-distribution sample.
"""

from __future__ import annotations

from dataclasses import dataclass

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


DERIVED: dict[str, Derived] = {
    "auto": Derived(
        "auto",
        "mean percentile rank in the pool of bn_score, span_score and energy (those the teacher has): BatchNorm "
        "statistics, the classifier's span and the logits fail on different pools, so their ranks are fused; the "
        "default, chosen by its worst case over the teacher/pool pairs of benchmarks/relatedness.py; with reference "
        "images (select --reference), averaged with the rank of ref_score",
        ("bn_score", "span_score", "energy"),
    ),
}


def derived_sql(name: str, available: set[str], reference: bool = False) -> str | None:
    """The SQL (window functions over the pool) of a derived score, from the parts the pool holds. With
    `reference` (a `ref_score` column from reference images, `curate select --reference`), the reference score's
    rank takes half the weight: a few images of the task outweigh what the teacher alone can tell."""
    parts = [p for p in DERIVED[name].parts if p in available]
    if not parts:
        return None
    ranks = " + ".join(f"percent_rank() OVER (ORDER BY {p} NULLS FIRST)" for p in parts)
    fused = f"({ranks}) / {len(parts)}"
    if reference:
        fused = f"(({fused}) + percent_rank() OVER (ORDER BY ref_score NULLS FIRST)) / 2"
    return f"({fused})::FLOAT"

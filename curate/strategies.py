"""Selection strategies: one registry (STRATEGIES), each strategy a function of the filtered candidates.

    threshold       score >= --threshold, or the top --fraction by score
    top-per-class   the --per-class K best by score within each predicted class (one DuckDB window query)
    weighted        draw --n with probability ∝ softmax(score/τ) (or score^γ), with or without replacement
                    (Begon & Geurts 2022: preferential sampling by relatedness)
    balanced        --n in total, predicted classes equalised (water-filling when a class is short)
    random          --n drawn uniformly without replacement (the blind-distillation baseline)
    near            kNN expansion from reference images through the pool's FAISS index, restricted to the
                    filtered uids; score = cosine similarity to the k-th nearest reference (deep kNN)
    diverse         k-means on the embeddings, equal quotas per cluster, best by score within a cluster

A strategy gets a Context (the config, a DuckDB connection with the pool's views, the SQL filter, a seeded
generator) and returns the picked uids. Strategies that draw at random see the candidates sorted by uid,
so a seed means the same selection on any machine. A new strategy is one function and one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcore.errors import UserError


@dataclass
class Picked:
    uid: np.ndarray
    score: np.ndarray  # what ranked each pick (for near: its cosine to the k-th nearest reference)
    weight: np.ndarray | None = None  # the trainer's loss multiplier (times drawn), else 1
    prob: np.ndarray | None = None  # sampling probability of a weighted draw
    short: dict[int, int] = field(default_factory=dict)  # class -> candidates, for classes short of K
    candidates: int | None = None  # the filtered samples with a score, when the strategy counted them


@dataclass
class Context:
    cfg: Any  # SelectConfig
    con: Any  # duckdb connection with the pool's views
    pool: Any
    meta: dict[str, Any]
    where: str  # "WHERE (...)" or ""
    rng: np.random.Generator
    _cands: dict[str, np.ndarray] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.meta["classes"])

    def candidates(self, ordered: bool, with_score: bool = True) -> dict[str, np.ndarray]:
        """uid, pred, score (float64) of the filtered samples with a non-null score, by uid when ordered."""
        if self._cands is None:
            score = f"({self.cfg.score})::DOUBLE" if with_score else "0.0::DOUBLE"
            t = self.con.sql(f"SELECT uid, pred, {score} AS score FROM samples {self.where}").to_arrow_table()
            uid = t.column("uid").to_numpy()
            order = np.argsort(uid, kind="stable") if ordered else slice(None)
            cols = {"uid": uid[order], "pred": t.column("pred").to_numpy()[order].astype(np.int64),
                    "score": t.column("score").to_numpy(zero_copy_only=False)[order].astype(np.float64)}  # fmt: skip
            if len(cols["uid"]) == 0:
                raise UserError("the filter leaves no samples" if self.where else "the pool has no samples")
            bad = np.isnan(cols["score"])
            if bad.all():
                raise UserError(f"--score {self.cfg.score} is null for every sample (e.g. bn_score of a teacher "
                                "without BatchNorm)")  # fmt: skip
            if bad.any():
                cols = {k: v[~bad] for k, v in cols.items()}
            self._cands = cols
        return self._cands


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[Context], Picked]
    needs: tuple[str, ...] = ()  # config fields that must be given
    ordered: bool = False  # draws at random (candidates sorted by uid)
    scored: bool = True  # ranks by --score (near makes its own)

    def check(self, cfg: Any) -> None:
        for f in self.needs:
            if getattr(cfg, f) is None:
                raise UserError(f"--strategy {self.name} needs --{f.replace('_', '-')}")
        if self.name == "threshold" and (cfg.threshold is None) == (cfg.fraction is None):
            raise UserError("--strategy threshold needs exactly one of --threshold T or --fraction F")
        if self.name == "threshold" and cfg.fraction is not None and not 0 < cfg.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {cfg.fraction}")
        if self.name == "near" and not cfg.references:
            raise UserError("--strategy near needs --reference NAME=SPEC (images of the target task)")
        if cfg.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {cfg.temperature}")


# ------------------------------------------------------------------------------------------ strategies


def _threshold(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=False)
    if ctx.cfg.threshold is not None:
        idx = np.flatnonzero(c["score"] >= ctx.cfg.threshold)
    else:
        k = math.ceil(ctx.cfg.fraction * len(c["score"]))
        idx = np.lexsort((c["uid"], -c["score"]))[:k]
    return Picked(c["uid"][idx], c["score"][idx])


def _top_per_class(ctx: Context) -> Picked:
    """One DuckDB window query: the K best per predicted class (ties: lower uid); one aggregate for each
    class's size (two windows in one query cost more than the two queries)."""
    k = int(ctx.cfg.per_class)
    score = f"({ctx.cfg.score})::DOUBLE"
    where = f"{ctx.where} AND {score} IS NOT NULL" if ctx.where else f"WHERE {score} IS NOT NULL"
    t = ctx.con.sql(
        f"SELECT uid, {score} AS score FROM samples {where} "
        f"QUALIFY row_number() OVER (PARTITION BY pred ORDER BY {score} DESC, uid) <= {k}"
    ).to_arrow_table()
    if t.num_rows == 0:
        raise UserError("the filter leaves no samples with a score" if ctx.where else "the pool has no samples")
    available = dict(ctx.con.execute(f"SELECT pred, count(*) FROM samples {where} GROUP BY pred").fetchall())
    short = {c: int(available.get(c, 0)) for c in range(ctx.n_classes) if available.get(c, 0) < k}
    picked = Picked(t.column("uid").to_numpy(), t.column("score").to_numpy().astype(np.float64), short=short)
    picked.candidates = sum(available.values())
    return picked


def top_per_class(pred: np.ndarray, score: np.ndarray, k: int, uid: np.ndarray) -> np.ndarray:
    """Reference numpy form of top-per-class (indices), for checks: a partition per class."""
    picked = []
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        picked.append(members[np.lexsort((uid[members], -score[members]))[:k]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def draw_probabilities(score: np.ndarray, temperature: float = 1.0, gamma: float | None = None) -> np.ndarray:
    """p ∝ softmax(score / temperature), or p ∝ score ** gamma."""
    if gamma is not None:
        if (score < 0).any():
            raise UserError("--gamma needs non-negative scores; use --temperature (softmax) for signed scores")
        w = np.power(score, gamma, dtype=np.float64)
    else:
        z = score / temperature
        w = np.exp(z - z.max())
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise UserError("the weights of the draw sum to zero; lower --gamma or raise --temperature")
    return w / total


def weighted_draw(p: np.ndarray, n: int, replace: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(unique indices, times drawn). Without replacement: Efraimidis–Spirakis keys u^(1/p), top n."""
    if replace:
        counts = rng.multinomial(n, p)
        idx = np.flatnonzero(counts)
        return idx, counts[idx].astype(np.float32)
    positive = int((p > 0).sum())
    if n > positive:
        raise UserError(f"cannot draw {n:,} without replacement from {positive:,} samples of non-zero weight")
    with np.errstate(divide="ignore"):
        keys = np.log(rng.random(len(p))) / p  # log u / p: larger is better, -inf where p == 0
    idx = np.argpartition(-keys, n - 1)[:n] if n < len(p) else np.arange(len(p))
    return np.sort(idx), np.ones(n, np.float32)


def _weighted(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True)
    p = draw_probabilities(c["score"], ctx.cfg.temperature, ctx.cfg.gamma)
    idx, weight = weighted_draw(p, ctx.cfg.n, ctx.cfg.replace, ctx.rng)
    return Picked(c["uid"][idx], c["score"][idx], weight, p[idx])


def water_fill(available: np.ndarray, n: int) -> np.ndarray:
    """Quotas summing to min(n, available.sum()), as equal as possible, never above `available`."""
    quota = np.zeros_like(available)
    left = min(n, int(available.sum()))
    open_ = available > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        room = available - quota
        add = np.where(open_, np.minimum(room, share), 0)
        if add.sum() > left:  # hand out the last few one by one, lowest class first
            cum = np.cumsum(add)
            add = np.where(cum <= left, add, np.maximum(0, left - (cum - add)))
        quota += add
        left -= int(add.sum())
        open_ = quota < available
    return quota


def _quota_pick(groups: np.ndarray, n_groups: int, n: int, within: np.ndarray) -> np.ndarray:
    """Indices taking water-filled quotas per group, the first by `within` (ascending) inside a group."""
    quota = water_fill(np.bincount(groups, minlength=n_groups), n)
    order = np.lexsort((within, groups))
    g = groups[order]
    rank = np.arange(len(g)) - np.searchsorted(g, g, side="left")
    return np.sort(order[rank < quota[g]])


def _balanced(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True)
    idx = _quota_pick(
        c["pred"], max(ctx.n_classes, int(c["pred"].max()) + 1), ctx.cfg.n, ctx.rng.random(len(c["pred"]))
    )
    return Picked(c["uid"][idx], c["score"][idx])


def _random(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True, with_score=False)
    idx = np.sort(ctx.rng.choice(len(c["uid"]), min(ctx.cfg.n, len(c["uid"])), replace=False))
    return Picked(c["uid"][idx], c["score"][idx])


def _near(ctx: Context) -> Picked:
    from curate.select import embed_references, near

    c = ctx.candidates(ordered=True, with_score=False)
    refs = embed_references(ctx.meta, ctx.cfg.references)
    uid, score = near(ctx.pool, ctx.con, refs, c["uid"], ctx.cfg.n, ctx.cfg.k, restrict=bool(ctx.where),
                      nprobe=ctx.cfg.nprobe)  # fmt: skip
    return Picked(uid, score)


def _diverse(ctx: Context) -> Picked:
    from curate.select import cluster

    c = ctx.candidates(ordered=True)
    assign, clusters = cluster(ctx.con, c["uid"], ctx.where, ctx.cfg.clusters, ctx.cfg.seed)
    idx = _quota_pick(assign, clusters, ctx.cfg.n, np.lexsort((np.arange(len(assign)), -c["score"])).argsort())
    return Picked(c["uid"][idx], c["score"][idx])


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("threshold", _threshold),
        Strategy("top-per-class", _top_per_class, needs=("per_class",)),
        Strategy("weighted", _weighted, needs=("n",), ordered=True),
        Strategy("balanced", _balanced, needs=("n",), ordered=True),
        Strategy("random", _random, needs=("n",), ordered=True, scored=False),
        Strategy("near", _near, needs=("n",), ordered=True, scored=False),
        Strategy("diverse", _diverse, needs=("n",), ordered=True),
    )
}

"""Selection strategies: one registry (STRATEGIES), each strategy a function of the filtered candidates.

    threshold       score >= --threshold, or the top --fraction by score
    top-per-class   the --per-class K best by score within each predicted class (one DuckDB window query)
    weighted        draw --n with probability ∝ softmax(score/τ) (or score^γ), with or without replacement
                    (Begon & Geurts 2022: preferential sampling by relatedness)
    balanced        --n in total, predicted classes equalised (water-filling when a class is short)
    related         the default: each class's best n / classes first (none with many classes); then --n by
                    score among the samples that look related (above the threshold of a two-component fit of the
                    score's distribution, refitted while above holds most), the best first, each predicted class
                    held to 4x its share of them per tier; then the rest by score
    random          --n drawn uniformly without replacement (the blind-distillation baseline)
    near            kNN expansion from reference images through the pool's FAISS index, restricted to the
                    filtered uids; score = cosine similarity to the k-th nearest reference (deep kNN)
    diverse         k-means on the embeddings, equal quotas per cluster, best by score within a cluster

A strategy gets a Context (the config, a DuckDB connection with the pool's views, the SQL filter, a seeded
generator) and returns the picked uids. Strategies that draw at random see the candidates sorted by uid,
so a seed means the same selection on any machine. A new strategy is one function and one entry.
"""

from __future__ import annotations

import dataclasses
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
    info: dict[str, Any] = field(default_factory=dict)  # what the strategy decided (selection.json)


@dataclass
class Context:
    cfg: Any  # SelectConfig
    con: Any  # duckdb connection with the pool's views
    pool: Any
    meta: dict[str, Any]
    where: str  # "WHERE (...)" or ""
    rng: np.random.Generator
    neighbours: Any = None  # select.py's near / cluster / embed_references: strategies never import select
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
    takes: tuple[str, ...] = ()  # further options of OPTIONS it uses; any other one given is refused

    def check(self, cfg: Any) -> None:
        for f in self.needs:
            if getattr(cfg, f) is None:
                raise UserError(f"--strategy {self.name} needs --{f.replace('_', '-')}")
        used = self.needs + self.takes
        for f in dataclasses.fields(cfg):
            if f.name in OPTIONS and f.name not in used and getattr(cfg, f.name) != f.default:
                takes = ", ".join(f"--{u.replace('_', '-')}" for u in used) or "none of them"
                raise UserError(f"--{f.name.replace('_', '-')} is not used by --strategy {self.name} (it takes "
                                f"{takes}); drop it or choose the strategy that uses it")  # fmt: skip
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


SPREAD = 4  # a class may take this many times its proportional share before the next tier opens


def related_caps(pred: np.ndarray, score: np.ndarray, threshold: float, n: int) -> dict[int, float]:
    """Per predicted class, its cap per tier: SPREAD x its share of the n picks in proportion to its
    related-looking samples (score >= threshold), SPREAD * n * m_c / M."""
    classes, counts = np.unique(pred[score >= threshold], return_counts=True)
    total = max(1, int(counts.sum()))
    return {int(c): SPREAD * n * int(k) / total for c, k in zip(classes, counts, strict=True)}


FLOOR = 1  # every class of the teacher first gets its best n / (FLOOR x classes) picks, when that is 1 or more
# (1: a few-class teacher's selection is balanced; measured against 2 and 4 in docs/benchmarks.md)


def related_floor(n: int, classes: int) -> int:
    """The picks every predicted class gets first: n / (FLOOR x the teacher's classes), rounded down: its share.
    A few-class teacher's selection then holds every class (a student learns a class the score ranks low from its own
    samples); with many classes and n far below, it is 0 and the picks go by score."""
    return n // (FLOOR * max(1, classes))


def related_order(pred: np.ndarray, score: np.ndarray, uid: np.ndarray, threshold: float, n: int,
                  floor: int = 0) -> np.ndarray:  # fmt: skip
    """Reference numpy form of the related strategy (indices of the picks, best first). First each class's best
    `floor` (related_floor); then related-looking samples in tiers: the j-th best of class c (j = 1, 2, ...) is in
    tier ceil(j / cap_c), so a class with a cap of 3 fills tier 1 with its best 3 and a class with a cap of 0.25
    enters at tier 4; by score inside a tier. Then the rest, by score."""
    caps = related_caps(pred, score, threshold, n)
    order = np.lexsort((uid, -score, pred))
    p = pred[order]
    rank = np.arange(len(p)) - np.searchsorted(p, p, side="left") + 1
    j = np.empty(len(p), np.int64)
    j[order] = rank
    cap = np.array([caps.get(int(c), 1.0) for c in pred])
    below = score < threshold
    tier = np.where(below, 0, np.ceil(j / cap - 1e-9))
    first = j <= floor
    return np.lexsort((uid, -score, tier, below, ~first))[:n]


def _related(ctx: Context) -> Picked:
    """The default recipe in DuckDB: the candidates once into a temporary table, the two-component fit on a
    deterministic sample of their scores, then one window query for the tiers."""
    from curate.scores import FIT_ROWS, related_split

    n = int(ctx.cfg.n)
    score = f"({ctx.cfg.score})::DOUBLE"
    where = f"{ctx.where} AND {score} IS NOT NULL" if ctx.where else f"WHERE {score} IS NOT NULL"
    con = ctx.con
    con.execute(f"CREATE OR REPLACE TEMP TABLE _cand AS SELECT uid, pred, {score} AS score FROM samples {where}")
    total = int(con.execute("SELECT count(*) FROM _cand").fetchall()[0][0])
    if total == 0:
        raise UserError("the filter leaves no samples with a score" if ctx.where else "the pool has no samples")
    step = max(1, math.ceil(total / FIT_ROWS))
    sample = con.execute(f"SELECT score FROM _cand WHERE hash(uid) % {step} = 0").fetchnumpy()["score"]
    split = related_split(np.asarray(sample, np.float64))
    threshold = split.threshold if split is not None else float("-inf")
    lit = repr(threshold) if np.isfinite(threshold) else "'-infinity'::DOUBLE"
    counts = con.execute(f"SELECT pred, count(*) FROM _cand WHERE score >= {lit} GROUP BY pred").fetchall()
    related = sum(k for _, k in counts)
    caps = {int(c): SPREAD * n * k / max(1, related) for c, k in counts}
    con.register("_caps", {"pred": np.array(list(caps), np.int64), "cap": np.array(list(caps.values()), np.float64)})
    floor = related_floor(n, len(ctx.meta["classes"]))
    t = con.sql(
        f"SELECT uid, score FROM (SELECT uid, score, below, j <= {floor} AS first, CASE WHEN below THEN 0 ELSE "
        f"ceil(j / cap - 1e-9) END AS tier FROM (SELECT c.uid, c.score, c.score < {lit} AS below, "
        "row_number() OVER (PARTITION BY c.pred ORDER BY c.score DESC, c.uid) AS j, coalesce(k.cap, 1.0) AS cap "
        f"FROM _cand c LEFT JOIN _caps k ON k.pred = c.pred)) ORDER BY first DESC, below, tier, score DESC, uid "
        f"LIMIT {n}"
    ).to_arrow_table()
    con.unregister("_caps")
    con.execute("DROP TABLE _cand")
    picked = Picked(t.column("uid").to_numpy(), t.column("score").to_numpy().astype(np.float64), candidates=total)
    picked.info = {"related": {
        "threshold": None if split is None else round(threshold, 6),
        "looks_related": related, "classes": len(caps), "filled_from_rest": max(0, min(n, total) - related),
        "floor_per_class": floor,
        "separation": None if split is None else round(split.separation, 3),
        "split": "none" if split is None else split.verdict,
        "rule": "candidates above the threshold of a two-component fit of the score (fitted again to the upper "
                "side while it holds more than half); the j-th best of a class "
                f"in tier ceil(j / cap), cap = {SPREAD} x n x the class's part of the related-looking "
                f"samples; first, each class's best n / ({FLOOR} x classes)"}}  # fmt: skip
    return picked


def _random(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True, with_score=False)
    idx = np.sort(ctx.rng.choice(len(c["uid"]), min(ctx.cfg.n, len(c["uid"])), replace=False))
    return Picked(c["uid"][idx], c["score"][idx])


def _near(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True, with_score=False)
    refs = ctx.neighbours.embed_references(ctx.meta, ctx.cfg.references)
    uid, score = ctx.neighbours.near(ctx.pool, ctx.con, refs, c["uid"], ctx.cfg.n, ctx.cfg.k, restrict=bool(ctx.where),
                      nprobe=ctx.cfg.nprobe)  # fmt: skip
    return Picked(uid, score)


def _diverse(ctx: Context) -> Picked:
    c = ctx.candidates(ordered=True)
    assign, clusters = ctx.neighbours.cluster(ctx.con, c["uid"], ctx.where, ctx.cfg.clusters, ctx.cfg.seed)
    idx = _quota_pick(assign, clusters, ctx.cfg.n, np.lexsort((np.arange(len(assign)), -c["score"])).argsort())
    return Picked(c["uid"][idx], c["score"][idx])


OPTIONS = ("n", "per_class", "threshold", "fraction", "temperature", "gamma", "replace", "k", "nprobe", "clusters")
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("related", _related, needs=("n",)),
        Strategy("threshold", _threshold, takes=("threshold", "fraction")),
        Strategy("top-per-class", _top_per_class, needs=("per_class",)),
        Strategy("weighted", _weighted, needs=("n",), ordered=True, takes=("temperature", "gamma", "replace")),
        Strategy("balanced", _balanced, needs=("n",), ordered=True),
        Strategy("random", _random, needs=("n",), ordered=True, scored=False),
        Strategy("near", _near, needs=("n",), ordered=True, scored=False, takes=("k", "nprobe")),
        Strategy("diverse", _diverse, needs=("n",), ordered=True, takes=("clusters",)),
    )
}

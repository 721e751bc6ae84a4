"""`curate report`: the page a data engineer opens to decide what to distill from.

Everything is aggregated in DuckDB (counts, binned histograms, class histograms, ROC curves from binned
score counts: streaming, exact to the bin); only the thumbnails re-read images, and only the few they show.
Plots are matplotlib PNGs beside report.html (curate/report_plots.py).

Sources "of the task" are the labelled sources whose classes are the teacher's classes (or those named
with --task-source); where there are any, the report measures how well each score separates them from
the rest (AUROC and ROC curves, positive = of the task, the OpenOOD convention) and the precision of the
selection. With many classes, class histograms become tables of each source's most predicted classes.
"""

from __future__ import annotations

import html
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from curate import report_plots as plots
from curate.config import ReportConfig
from curate.pool import Pool
from curate.query import connect
from curate.scores import DERIVED, FIT_ROWS, SCORES, two_component_split
from curate.select import rel_entropy
from curate.sqlcheck import expression
from kdcore import storage
from kdcore.errors import UserError

HIST_SCORES = ("auto", "confidence", "energy", "bn_score")
BINS, ROC_BINS = 40, 400
MAX_BARS = 30  # more classes than this: tables of the most predicted classes instead of bars


@dataclass
class ReportResult:
    html: str
    sources: list[dict[str, Any]]
    auroc: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] | None = None
    images: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def report(cfg: ReportConfig) -> ReportResult:
    t0 = time.perf_counter()
    cfg.pool, cfg.out = storage.target(cfg.pool, "--pool"), storage.target(cfg.out, "--out")
    pool = Pool(cfg.pool)
    meta = pool.meta()
    if storage.inside(cfg.out, pool.root):
        raise UserError(f"--out {cfg.out} is inside the pool; reports live beside it")
    if storage.isfile(cfg.out):
        raise UserError(f"--out {cfg.out} is a file; give a directory")
    con = connect(cfg.pool, cfg.selection)
    if not con.execute("SELECT count(*) FROM samples").fetchall()[0][0]:
        raise UserError(f"pool {storage.redact(pool.root)} holds no samples (see its errors with curate sql "
                        "\"SELECT * FROM errors\"); there is nothing to report")  # fmt: skip
    classes = meta["classes"]
    available = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    expression(cfg.score, "--score", con)
    try:
        con.execute(f"SELECT ({cfg.score}) FROM samples LIMIT 0").fetchall()
    except duckdb.Error as err:
        raise UserError(f"--score {cfg.score!r}: {str(err).strip().splitlines()[0]}") from None
    scores = [s for s in [*SCORES, *DERIVED] if s in available and _non_null(con, s)]
    task = _task_sources(meta, cfg.task_sources)
    local = Path(cfg.out) if storage.is_local(cfg.out) else Path(tempfile.mkdtemp(prefix="kdcurate-report-"))
    local.mkdir(parents=True, exist_ok=True)

    auto = "avg(auto)" if "auto" in scores else "NULL"
    rows = con.execute(f"SELECT source, count(*), {auto}, avg(confidence), avg(energy), avg(bn_score) FROM samples "
                       "GROUP BY source ORDER BY 1").fetchall()  # fmt: skip
    errors = dict(con.execute("SELECT source, count(*) FROM errors GROUP BY source").fetchall())
    hist = _class_hist(con, "samples", len(classes))
    sources = [{"source": s, "rows": n, "errors": int(errors.get(s, 0)), "auto": a, "confidence": c, "energy": e,
                "bn_score": b, "rel_entropy": rel_entropy(hist[s]), "task": s in task,
                "top_classes": _top_classes(hist[s], classes)} for s, n, a, c, e, b in rows]  # fmt: skip
    images = [plots.histograms(local / "scores.png", _histograms(con, [s for s in HIST_SCORES if s in scores]))]
    if len(classes) <= MAX_BARS:
        images.append(plots.class_bars(local / "classes.png", hist, classes, "predicted class per source",
                                       rel_entropy))  # fmt: skip
    auroc, curves = {}, {}
    if task and len(task) < len(hist):
        auroc = _auroc(con, scores, task)
        curves = {s: c for s in auroc if (c := _roc(con, s, task)) is not None}
        images.append(plots.roc_curves(local / "roc.png", {s: (f, t, auroc[s]) for s, (f, t) in curves.items()}))
    warnings = _synthetic_above(con, meta, cfg.score, task) + _weak_separation(con, cfg.score, task, auroc)
    px_rows = _thumbnail_rows(con, cfg.score, cfg.thumbs, classes)
    sel_info, sel_rows = None, []
    if cfg.selection:
        sel_info = _selection_summary(con, classes, task, scores)
        total = sum(_class_hist(con, "selection", len(classes)).values(), np.zeros(len(classes)))
        images.append(plots.selection_bars(local / "selection.png", sel_info["composition"], total, classes,
                                           rel_entropy))  # fmt: skip
        sel_rows = _selection_thumbnail_rows(con, classes, max(1, min(cfg.thumbs, 8)))
    thumbs = []
    if cfg.thumbs:
        px = plots.pixels(meta, [r for _, items in px_rows + sel_rows for r in items])
        for src in sorted({r["source"] for _, items in px_rows for r in items}):
            mine = [(label.split(" ", 1)[1], items) for label, items in px_rows if label.split(" ", 1)[0] == src]
            thumbs.append(plots.grid(local / f"thumbs-{src}.png", mine, px,
                                     f"{src}: most and least related by {cfg.score}"))  # fmt: skip
        if sel_rows:
            thumbs.append(plots.grid(local / "thumbs-selection.png", sel_rows, px,
                                     "the selection, by predicted class (best first)"))  # fmt: skip
    images += thumbs
    trust = _trust(con, [cfg.score] + [s for s in GALLERY_SCORES if s in scores and s != cfg.score])
    galleries = _galleries(con, meta, local, [s for s in GALLERY_SCORES if s in scores], min(cfg.thumbs, 6),
                           classes) if cfg.thumbs else {}  # fmt: skip
    page = _html(meta, pool, sources, auroc, task, thumbs, sel_info, images, cfg.score, classes, warnings,
                 time.perf_counter() - t0, trust, galleries)  # fmt: skip
    (local / "report.html").write_text(page)
    storage.write_json(str(local / "report.json"), {"sources": sources, "auroc": auroc, "selection": sel_info,
                                                    "warnings": warnings, "trust": trust})  # fmt: skip
    if not storage.is_local(cfg.out):
        for p in local.iterdir():
            storage.write_bytes(storage.join(cfg.out, p.name), p.read_bytes(), tag="report")
        shutil.rmtree(local, ignore_errors=True)
    return ReportResult(storage.join(cfg.out, "report.html"), sources, auroc, sel_info,
                        [storage.join(cfg.out, i) for i in images], warnings)  # fmt: skip


# ------------------------------------------------------------------------------------------ numbers


def _task_sources(meta: dict[str, Any], named: list[str] | None) -> set[str]:
    if named:
        unknown = set(named) - set(meta["sources"])
        if unknown:
            raise UserError(f"--task-source {sorted(unknown)[0]!r} is not a source of the pool")
        return set(named)
    return {name for name, s in meta["sources"].items() if s.get("classes") and s["classes"] == meta["classes"]}


def _synthetic_above(con, meta: dict[str, Any], score: str, task: set[str]) -> list[str]:
    """Warnings for each synthetic source (noise, dead leaves, shaders, glyphs: unrelated by construction) whose
    median `score` is above the median of the task's sources (or of the real sources when no task is known):
    the score then does not measure relatedness for this teacher."""
    synthetic = {n for n, s in meta["sources"].items() if s.get("kind") == "synthetic"}
    medians = dict(con.execute(f"SELECT source, median(({score})::DOUBLE) FROM samples GROUP BY source").fetchall())
    reference = [medians[s] for s in (task or set(medians) - synthetic) if medians.get(s) is not None]
    if not synthetic or not reference:
        return []
    bar = float(np.median(reference))
    return [f"{score} ranks the synthetic source {s} above the {'task' if task else 'other'} sources (median "
            f"{medians[s]:.3g} against {bar:.3g}): it does not measure relatedness for this teacher; "
            + ("give a few task images (curate select --reference)" if score == "auto" else
               "rank by another score (see the AUROC table) or use --score auto")
            for s in sorted(synthetic) if medians.get(s) is not None and medians[s] > bar]  # fmt: skip


WEAK_AUROC = 0.8  # below it, a selection by the score is mostly unrelated on the benchmark's pairs


def _weak_separation(con, score: str, task: set[str], auroc: dict[str, float]) -> list[str]:
    """A warning when the task sources are known and the ranking score hardly separates them from the rest (a
    domain-shifted task: the teacher's scores prefer other real data). Reference images are the remedy."""
    if not auroc:
        return []
    value = auroc[score] if score in auroc else _auroc(con, [score], task).get(score)
    if value is None or value >= WEAK_AUROC:
        return []
    best = max(auroc, key=lambda k: auroc[k])
    return [
        f"{score} separates the task sources from the rest with AUROC {value:.2f} only (best score here: {best} "
        f"{auroc[best]:.2f}); a selection by it will be mostly unrelated: give a few task images with curate "
        "select --reference NAME=SPEC (with --strategy near when the task is domain-shifted)"
    ]


def _non_null(con, col: str) -> bool:
    return con.execute(f"SELECT count({col}) > 0 FROM samples").fetchall()[0][0]


def _class_hist(con, view: str, n_classes: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for source, pred, n in con.execute(f"SELECT source, pred, count(*) FROM {view} GROUP BY ALL").fetchall():
        out.setdefault(source, np.zeros(n_classes, np.int64))[int(pred)] = n
    return dict(sorted(out.items()))


def _top_classes(h: np.ndarray, classes: list[str], k: int = 5) -> list[tuple[str, float]]:
    order = np.argsort(-h, kind="stable")[:k]
    return [(classes[i], round(float(h[i] / max(1, h.sum())), 4)) for i in order if h[i]]


def _histograms(con, scores: list[str]) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    out = {}
    for s in scores:
        lo, hi = con.execute(f"SELECT min({s}), max({s}) FROM samples").fetchall()[0]
        width = (hi - lo) / BINS if hi > lo else 1.0
        per: dict[str, np.ndarray] = {}
        for src, b, n in con.execute(
            f"SELECT source, least({BINS - 1}, floor(({s} - {lo}) / {width}))::INT AS b, count(*) FROM samples "
            f"WHERE {s} IS NOT NULL GROUP BY ALL ORDER BY 1"
        ).fetchall():
            per.setdefault(src, np.zeros(BINS))[b] = n
        out[s] = (lo + width * np.arange(BINS + 1), per)
    return out


def _auroc(con, scores: list[str], task: set[str]) -> dict[str, float]:
    """AUROC of each score, positive = a source of the task, from average ranks in DuckDB (ties count half)."""
    names = ", ".join(f"'{t}'" for t in sorted(task))
    res = {}
    for s in scores:
        rank_sum, n1, n0 = con.execute(
            f"WITH r AS (SELECT source IN ({names}) AS pos, avg(rk) OVER (PARTITION BY v) AS rk FROM "
            f"(SELECT source, ({s}) AS v, rank() OVER (ORDER BY ({s})) + (count(*) OVER (PARTITION BY ({s})) - 1) "
            f"/ 2.0 AS rk FROM samples WHERE ({s}) IS NOT NULL)) "
            "SELECT sum(rk) FILTER (WHERE pos), count(*) FILTER (WHERE pos), count(*) FILTER (WHERE NOT pos) FROM r"
        ).fetchall()[0]
        if n1 and n0:
            res[s] = round((float(rank_sum) - n1 * (n1 + 1) / 2) / (n1 * n0), 4)
    return res


def _roc(con, s: str, task: set[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The ROC curve of one score (positive = a task source) from counts per score bin, in DuckDB."""
    names = ", ".join(f"'{t}'" for t in sorted(task))
    lo, hi = con.execute(f"SELECT min({s}), max({s}) FROM samples").fetchall()[0]
    if lo is None:
        return None
    width = (hi - lo) / ROC_BINS if hi > lo else 1.0
    rows = con.execute(
        f"SELECT least({ROC_BINS - 1}, floor(({s} - {lo}) / {width}))::INT AS b, count(*) FILTER (WHERE source IN "
        f"({names})), count(*) FILTER (WHERE source NOT IN ({names})) FROM samples WHERE {s} IS NOT NULL GROUP BY b"
    ).fetchall()
    pos, neg = np.zeros(ROC_BINS), np.zeros(ROC_BINS)
    for b, p, n in rows:
        pos[b], neg[b] = p, n
    if not pos.sum() or not neg.sum():
        return None
    pos, neg = pos[::-1] / pos.sum(), neg[::-1] / neg.sum()  # from the highest scores down
    return np.concatenate([[0], np.cumsum(neg)]), np.concatenate([[0], np.cumsum(pos)])


def _selection_summary(con, classes: list[str], task: set[str], scores: list[str]) -> dict[str, Any]:
    n_sel, n_pool = con.execute("SELECT (SELECT count(*) FROM selection), (SELECT count(*) FROM samples)").fetchall()[0]
    comp = con.execute(
        "SELECT p.source, p.n, coalesce(s.n, 0) FROM (SELECT source, count(*) n FROM samples GROUP BY 1) p "
        "LEFT JOIN (SELECT source, count(*) n FROM selection GROUP BY 1) s USING (source) ORDER BY 1"
    ).fetchall()
    total = sum(_class_hist(con, "selection", len(classes)).values(), np.zeros(len(classes)))
    info: dict[str, Any] = {"rows": n_sel, "pool_rows": n_pool, "rel_entropy": rel_entropy(total),
                            "composition": [{"source": s, "pool": p, "selected": k} for s, p, k in comp]}  # fmt: skip
    if task:
        names = ", ".join(f"'{t}'" for t in sorted(task))
        info["precision"] = con.execute(f"SELECT avg((source IN ({names}))::INT) FROM selection").fetchall()[0][0]
        info["teacher_label_accuracy"] = con.execute(
            f"SELECT avg((pred = label)::INT) FROM selection WHERE source IN ({names}) AND label IS NOT NULL"
        ).fetchall()[0][0]
        info["share_of_task_in_pool"] = con.execute(f"SELECT avg((source IN ({names}))::INT) FROM samples").fetchall()[
            0
        ][0]
        # what the same number of samples would give, taken as the top by each score
        info["precision_top_n_by_score"] = {
            s: con.execute(f"SELECT avg((source IN ({names}))::INT) FROM (SELECT source FROM samples WHERE {s} IS NOT "
                           f"NULL ORDER BY {s} DESC, uid LIMIT {int(n_sel)})").fetchall()[0][0]
            for s in scores
        }  # fmt: skip
    return info


def _rows(con, query: str, classes: list[str]) -> list[dict]:
    cur = con.execute(query)
    names = [d[0] for d in cur.description]
    out = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    for r in out:
        r["class"] = classes[int(r["pred"])]
    return out


def _thumbnail_rows(con, score: str, k: int, classes: list[str]) -> list[tuple[str, list[dict]]]:
    """Per source, 'SOURCE most' and 'SOURCE least': the k most and least related samples by `score`."""
    if k <= 0:
        return []
    pick = ("SELECT source, unit, key, sample_id, pred, ({s})::DOUBLE AS score, {top} AS top FROM samples QUALIFY "
            "row_number() OVER (PARTITION BY source ORDER BY ({s}) {order} NULLS LAST, uid) <= {k}")  # fmt: skip
    rows = _rows(con, f"SELECT * FROM ({pick.format(s=score, top='true', order='DESC', k=k)} UNION ALL "
                      f"{pick.format(s=score, top='false', order='ASC', k=k)}) ORDER BY source, top DESC, score DESC",
                 classes)  # fmt: skip
    out = []
    for src in sorted({r["source"] for r in rows}):
        for top, label in ((True, "most"), (False, "least")):
            out.append((f"{src} {label}", [r for r in rows if r["source"] == src and r["top"] == top]))
    return out


def _selection_thumbnail_rows(con, classes: list[str], k: int, n_classes: int = 8) -> list[tuple[str, list[dict]]]:
    """The selection's most selected classes (up to n_classes), their k best samples by the selection's score."""
    rows = _rows(con, f"""
        WITH c AS (SELECT pred, count(*) n FROM selection GROUP BY pred ORDER BY n DESC, pred LIMIT {n_classes})
        SELECT s.source, s.unit, s.key, s.sample_id, x.pred, x.score::DOUBLE AS score FROM selection x
        JOIN samples s ON s.uid = x.uid JOIN c ON c.pred = x.pred
        QUALIFY row_number() OVER (PARTITION BY x.pred ORDER BY x.score DESC, x.uid) <= {k}
        ORDER BY x.pred, score DESC""", classes)  # fmt: skip
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r)
    return [(name[:16], items) for name, items in by_class.items()]


# ------------------------------------------------------------------------------------------ without task sources


GALLERY_SCORES = ("auto_knn", "auto", "bn_score", "span_score", "energy", "confidence")


def _trust(con, scores: list[str]) -> dict[str, dict[str, Any]]:
    """How cleanly each score splits the pool: a two-component Gaussian mixture fitted to its distribution (on
    a deterministic sample of at most FIT_ROWS rows); Ashman's D >= 2 is a clean split, below 1.2 a weak one."""
    total = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
    step = max(1, -(-int(total) // FIT_ROWS))
    out = {}
    for s in scores:
        x = con.execute(f"SELECT ({s})::DOUBLE AS x FROM samples WHERE ({s}) IS NOT NULL AND hash(uid) % {step} = 0"
                        ).fetchnumpy()["x"]  # fmt: skip
        split = two_component_split(np.asarray(x, np.float64))
        if split is None:
            continue
        above = float((np.asarray(x) >= split.threshold).mean())
        out[s] = {"separation": round(split.separation, 3), "verdict": split.verdict,
                  "threshold": round(split.threshold, 6), "share_related": round(above, 4)}  # fmt: skip
    return out


def _galleries(con, meta: dict[str, Any], local: Path, scores: list[str], k: int, classes: list[str]
               ) -> dict[str, list[tuple[str, list[dict]]]]:  # fmt: skip
    """Per score, the k samples it ranks highest, the k around its median and the k it ranks lowest over the
    whole pool, each saved as one thumbnail PNG (its file name under 'file') for an HTML caption."""
    if k <= 0 or not scores:
        return {}
    cols = "source, unit, key, sample_id, pred, uid"
    rows: dict[str, list[tuple[str, list[dict]]]] = {}
    for s in scores:
        v = f"({s})::DOUBLE"
        q = {
            "top": f"SELECT {cols}, {v} AS score FROM samples WHERE {v} IS NOT NULL ORDER BY {v} DESC, uid LIMIT {k}",
            "middle": f"SELECT {cols}, {v} AS score FROM samples WHERE {v} IS NOT NULL ORDER BY abs({v} - (SELECT "
                      f"median({v}) FROM samples)), uid LIMIT {k}",
            "bottom": f"SELECT {cols}, {v} AS score FROM samples WHERE {v} IS NOT NULL ORDER BY {v}, uid LIMIT {k}",
        }  # fmt: skip
        rows[s] = [(where, _rows(con, sql, classes)) for where, sql in q.items()]
    px = plots.pixels(meta, [r for per in rows.values() for _, items in per for r in items])
    for s, per in rows.items():
        for where, items in per:
            for i, r in enumerate(items):
                img = px.get((r["source"], r["unit"], r["key"]))
                r["file"] = plots.thumbnail(local / f"g-{s}-{where}-{i}.png", img)
    return rows


def _gallery_html(score: str, per: list[tuple[str, list[dict]]]) -> str:
    e = html.escape
    out = [f"<h3>{e(score)}</h3>"]
    for where, items in per:
        figs = []
        for r in items:
            img = f"<img class=g src='{e(r['file'])}' alt='{e(r['sample_id'])}'>" if r.get("file") else \
                "<div class=missing>no pixels</div>"  # fmt: skip
            figs.append(f"<figure>{img}<figcaption>{e(r['sample_id'])}<br>{e(r['class'])}<br>{e(score)} "
                        f"{r['score']:.3g}</figcaption></figure>")  # fmt: skip
        out.append(f"<div class=gal><div class=where>{e(where)}</div>{''.join(figs)}</div>")
    return "".join(out)


# ------------------------------------------------------------------------------------------ page


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape("-" if v is None else str(v))

    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _html(meta, pool, sources, auroc, task, thumbs, sel, images, score, classes, warnings, seconds, trust=None,
          galleries=None) -> str:  # fmt: skip
    e = html.escape
    teacher = meta["teacher"]
    parts = [
        f"<h1>kdcurate report: {e(storage.redact(pool.root))}</h1>",
        *(f"<p class=warn>warning: {e(w)}</p>" for w in warnings),
        f"<p class=meta>teacher <code>{e(teacher['spec'])}</code> ({len(classes)} classes, sha256 "
        f"{e(teacher['sha256'][:12])}…) · input {meta['input']['size']}px × {meta['input']['channels']} ch · "
        f"{sum(s['rows'] for s in sources):,} samples · {sum(s['errors'] for s in sources):,} errors</p>",
        "<h2>Sources</h2>",
        _table(["source", "samples", "errors", "mean auto", "mean confidence", "mean energy", "mean bn_score",
                "H/log C", "of the task"],
               [[s["source"], s["rows"], s["errors"], s["auto"], s["confidence"], s["energy"], s["bn_score"],
                 s["rel_entropy"], "yes" if s["task"] else ""] for s in sources]),
        "<p class=note>auto: the weighted mean percentile rank in the pool of bn_z (3), span_score and energy "
        "(those the teacher gives), 0 to 1; a source of related data sits high.</p>",
        "<p class=note>H/log C: relative entropy of the teacher's predicted-class histogram; near 1 = the teacher "
        "sees every class in this source (Frank &amp; Davis 2025).</p>",
        "<h2>Score distributions</h2><img src='scores.png' alt='score histograms'>",
        "<h2>Predicted classes</h2>",
    ]  # fmt: skip
    if len(classes) <= 30:
        parts.append("<img src='classes.png' alt='predicted-class histograms'>")
    parts.append(
        _table(
            ["source", "most predicted classes (share of the source)"],
            [[s["source"], ", ".join(f"{c} {p:.1%}" for c, p in s["top_classes"])] for s in sources],
        )
    )
    if auroc:
        best = max(auroc, key=auroc.get)
        parts += [
            f"<h2>How well each score finds the task</h2><p class=note>AUROC, positive = sources of the task "
            f"({e(', '.join(sorted(task)))}), every other source negative; 0.5 = no better than chance. "
            f"Best here: <b>{e(best)}</b> ({auroc[best]:.3f}).</p>",
            _table(["score", "AUROC"], sorted(([k, v] for k, v in auroc.items()), key=lambda r: -r[1])),
            "<img src='roc.png' alt='ROC curves'>",
        ]
    if trust:
        mine = trust.get(score)
        head = (f"<b>{e(score)}</b> splits this pool {mine['verdict']}ly (separation D = {mine['separation']:.2f}; "
                f"{mine['share_related']:.1%} of the samples fall on its related side)" if mine else
                f"<b>{e(score)}</b> shows no two populations in this pool")  # fmt: skip
        parts += [
            "<h2>How far to trust the ranking</h2>",
            f"<p>{head}. A two-component mixture fitted to each score's distribution over the pool: D (Ashman's, "
            "the distance of the two means in units of their spread) of 2 or more is a clean split, below 1.2 a weak "
            "one. A clean split says the score sees two populations, not which one is the task: check the "
            "galleries below. The default selection (<code>curate select POOL --n N --out SEL</code>) takes its "
            "candidates from the related side of this split.</p>",
            _table(["score", "separation D", "split", "share on the related side"],
                   [[k, v["separation"], v["verdict"], v["share_related"]] for k, v in trust.items()]),
        ]  # fmt: skip
    if not auroc:
        parts.append(
            "<p class=note>No source is known to be of the task, so nothing here measures how well a score finds "
            "it. Name the sources that are with <code>curate report --task-source NAME</code> to get each score's "
            "AUROC and ROC curve, or give a few images of the task with <code>curate select --reference "
            "NAME=SPEC</code> (they calibrate the score; with <code>--strategy near</code> they seed the search).</p>"
        )  # fmt: skip
    if galleries:
        parts.append("<h2>What each score ranks top, middle and bottom</h2><p class=note>Over the whole pool, in the "
                     "teacher's view; under each image: sample id, the teacher's class, the score.</p>")  # fmt: skip
        parts += [_gallery_html(s, per) for s, per in galleries.items()]
    if sel:
        parts += ["<h2>Selection</h2>", f"<p>{sel['rows']:,} of {sel['pool_rows']:,} samples selected; "
                  f"predicted-class H/log C = {sel['rel_entropy']:.3f}.</p>"]  # fmt: skip
        if "precision" in sel:
            acc = "-" if sel["teacher_label_accuracy"] is None else f"{100 * sel['teacher_label_accuracy']:.1f}%"
            parts.append(f"<p>Precision (share of the selection from the task's sources): <b>{sel['precision']:.3f}"
                         f"</b> against {sel['share_of_task_in_pool']:.3f} in the pool; the teacher's class agrees "
                         f"with the true label on {acc} of the selected task samples.</p>")  # fmt: skip
            parts.append(_table(["score", f"precision of the top {sel['rows']:,} by it"],
                                sorted(([k, v] for k, v in sel["precision_top_n_by_score"].items()),
                                       key=lambda r: -(r[1] or 0))))  # fmt: skip
        parts.append(_table(["source", "in pool", "selected", "share selected"],
                            [[c["source"], c["pool"], c["selected"], c["selected"] / max(1, c["pool"])]
                             for c in sel["composition"]]))  # fmt: skip
        parts.append("<img src='selection.png' alt='selection composition'>")
    if thumbs:
        parts.append(f"<h2>Thumbnails</h2><p class=note>In the teacher's view; captions: sample id, the teacher's "
                     f"class, the score ({e(score)}; for the selection, the score that selected it).</p>")  # fmt: skip
        parts += [f"<img class=thumbs src='{e(t)}' alt='{e(t)}'>" for t in thumbs]
    parts.append(f"<p class=meta>made in {seconds:.1f} s by curate report · {time.strftime('%Y-%m-%d %H:%M')}</p>")
    style = (
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1150px;color:#222;padding:0 16px}"
        "h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}"
        "table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;border-bottom:1px solid #eee;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f6f6f6}"
        "img{max-width:100%;display:block;margin:8px 0}.meta,.note{color:#666;font-size:12.5px}"
        "code{background:#f3f3f3;padding:1px 4px}.warn{background:#fff3cd;border:1px solid #e0c36b;padding:6px 10px}"
        ".gal{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;margin:4px 0}.gal figure{margin:0;width:"
        "112px}.gal img{width:96px;height:96px;margin:0;image-rendering:pixelated}.gal figcaption{font-size:12px;"
        "line-height:1.3;word-break:break-all}.where{width:60px;font-size:12px;color:#666;align-self:center}"
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kdcurate report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")  # fmt: skip

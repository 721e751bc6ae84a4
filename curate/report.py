"""`curate report`: the page a data engineer opens to decide what to distill from.

Everything is aggregated in DuckDB (counts, histograms, class histograms: streaming, exact); only the
thumbnails re-read images, and only the few they show. Plots are matplotlib PNGs beside report.html.

Sources "of the task" are the labelled sources whose classes are the teacher's classes (or those named
with --task-source); where there are any, the report measures how well each score separates them from
the rest (AUROC, positive = of the task, the OpenOOD convention) and the precision of the selection.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from curate.config import ReportConfig  # noqa: E402
from curate.pool import Pool  # noqa: E402
from curate.query import connect  # noqa: E402
from curate.scores import SCORES  # noqa: E402
from curate.select import rel_entropy  # noqa: E402
from curate.sources import parse_source, read_keys  # noqa: E402
from kdcore import storage  # noqa: E402
from kdcore.errors import UserError  # noqa: E402
from kdcore.view import DecodeError, InputSpec, to_pixels  # noqa: E402

HIST_SCORES = ("confidence", "energy", "bn_score")
BINS = 40


@dataclass
class ReportResult:
    html: str
    sources: list[dict[str, Any]]
    auroc: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] | None = None
    images: list[str] = field(default_factory=list)


def report(cfg: ReportConfig) -> ReportResult:
    t0 = time.perf_counter()
    pool_dir, out, selection, score, thumbs = cfg.pool, cfg.out, cfg.selection, cfg.score, cfg.thumbs
    task_sources = cfg.task_sources
    pool = Pool(pool_dir)
    meta = pool.meta()
    out_dir = Path(out)
    if storage.inside(out, pool.root):
        raise UserError(f"--out {out} is inside the pool; reports live beside it")
    out_dir.mkdir(parents=True, exist_ok=True)
    con = connect(pool_dir, selection)
    classes = meta["classes"]
    available = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    if score not in available:
        raise UserError(f"--score {score!r} is not a column of the pool; scores: {', '.join(SCORES)}")
    scores = [s for s in SCORES if s in available and _non_null(con, s)]
    task = _task_sources(meta, task_sources)

    # ---- per source
    rows = con.execute(
        "SELECT source, count(*), avg(confidence), avg(energy), avg(bn_score) FROM samples GROUP BY source ORDER BY 1"
    ).fetchall()
    errors = dict(con.execute("SELECT source, count(*) FROM errors GROUP BY source").fetchall())
    hist = _class_hist(con, "samples", len(classes))
    sources = [
        {
            "source": s, "rows": n, "errors": int(errors.get(s, 0)), "confidence": c, "energy": e, "bn_score": b,
            "rel_entropy": rel_entropy(hist[s]), "task": s in task,
        }
        for s, n, c, e, b in rows
    ]  # fmt: skip
    images = [_plot_histograms(con, out_dir, [s for s in HIST_SCORES if s in scores])]
    images.append(_plot_classes(out_dir / "classes.png", hist, classes, "predicted class per source"))
    auroc = _auroc(con, scores, task) if task and len(task) < len(hist) else {}
    thumb_files = _thumbnails(con, meta, out_dir, score, thumbs)
    images += thumb_files

    sel_info = None
    if selection:
        sel_info = _selection_summary(con, classes, task, scores)
        sel_hist = _class_hist(con, "selection", len(classes))
        images.append(_plot_selection(out_dir / "selection.png", sources, sel_info, sel_hist, classes))

    page = _html(meta, pool, sources, auroc, task, thumb_files, sel_info, images, score, time.perf_counter() - t0)
    path = out_dir / "report.html"
    path.write_text(page)
    storage.write_json(str(out_dir / "report.json"), {"sources": sources, "auroc": auroc, "selection": sel_info})
    return ReportResult(str(path), sources, auroc, sel_info, [str(out_dir / i) for i in images])


# ------------------------------------------------------------------------------------------ numbers


def _task_sources(meta: dict[str, Any], named: list[str] | None) -> set[str]:
    if named:
        unknown = set(named) - set(meta["sources"])
        if unknown:
            raise UserError(f"--task-source {sorted(unknown)[0]!r} is not a source of the pool")
        return set(named)
    return {name for name, s in meta["sources"].items() if s.get("classes") and s["classes"] == meta["classes"]}


def _non_null(con, col: str) -> bool:
    return con.execute(f"SELECT count({col}) > 0 FROM samples").fetchall()[0][0]


def _class_hist(con, view: str, n_classes: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for source, pred, n in con.execute(f"SELECT source, pred, count(*) FROM {view} GROUP BY ALL").fetchall():
        out.setdefault(source, np.zeros(n_classes, np.int64))[int(pred)] = n
    return dict(sorted(out.items()))


def _auroc(con, scores: list[str], task: set[str]) -> dict[str, float]:
    """AUROC of each score, positive = a source of the task, computed from average ranks in DuckDB."""
    names = ", ".join(f"'{t}'" for t in sorted(task))
    res = {}
    for s in scores:
        r = con.execute(
            f"WITH r AS (SELECT source IN ({names}) AS pos, avg(rk) OVER (PARTITION BY {s}) AS rk FROM "
            f"(SELECT source, {s}, rank() OVER (ORDER BY {s}) + (count(*) OVER (PARTITION BY {s}) - 1) / 2.0 AS rk "
            f"FROM samples WHERE {s} IS NOT NULL)) "
            "SELECT sum(rk) FILTER (WHERE pos), count(*) FILTER (WHERE pos), count(*) FILTER (WHERE NOT pos) FROM r"
        ).fetchall()[0]
        rank_sum, n1, n0 = r
        if n1 and n0:
            res[s] = round((float(rank_sum) - n1 * (n1 + 1) / 2) / (n1 * n0), 4)
    return res


def _selection_summary(con, classes: list[str], task: set[str], scores: list[str]) -> dict[str, Any]:
    n_sel, n_pool = con.execute("SELECT (SELECT count(*) FROM selection), (SELECT count(*) FROM samples)").fetchall()[0]
    comp = con.execute(
        "SELECT p.source, p.n, coalesce(s.n, 0) FROM (SELECT source, count(*) n FROM samples GROUP BY 1) p "
        "LEFT JOIN (SELECT source, count(*) n FROM selection GROUP BY 1) s USING (source) ORDER BY 1"
    ).fetchall()
    info: dict[str, Any] = {
        "rows": n_sel,
        "composition": [{"source": s, "pool": p, "selected": k} for s, p, k in comp],
        "rel_entropy": rel_entropy(sum(_class_hist(con, "selection", len(classes)).values(), np.zeros(len(classes)))),
    }
    if task:
        names = ", ".join(f"'{t}'" for t in sorted(task))
        prec = con.execute(f"SELECT avg((source IN ({names}))::INT) FROM selection").fetchall()[0][0]
        agree = con.execute(
            f"SELECT avg((pred = label)::INT) FROM selection WHERE source IN ({names}) AND label IS NOT NULL"
        ).fetchall()[0][0]
        info["precision"] = prec
        info["teacher_label_accuracy"] = agree
        share = con.execute(f"SELECT avg((source IN ({names}))::INT) FROM samples").fetchall()[0][0]
        info["share_of_task_in_pool"] = share
        # what the same number of samples would give, taken as the top by each score
        info["precision_top_n_by_score"] = {
            s: con.execute(
                f"SELECT avg((source IN ({names}))::INT) FROM (SELECT source FROM samples WHERE {s} IS NOT NULL "
                f"ORDER BY {s} DESC, uid LIMIT {int(n_sel)})"
            ).fetchall()[0][0]
            for s in scores
        }
    info["pool_rows"] = n_pool
    return info


# ------------------------------------------------------------------------------------------ plots


def _plot_histograms(con, out_dir: Path, scores: list[str]) -> str:
    fig, axes = plt.subplots(1, max(1, len(scores)), figsize=(5 * max(1, len(scores)), 3.4), squeeze=False)
    for ax, s in zip(axes[0], scores, strict=False):
        lo, hi = con.execute(f"SELECT min({s}), max({s}) FROM samples").fetchall()[0]
        width = (hi - lo) / BINS if hi > lo else 1.0
        counts = con.execute(
            f"SELECT source, least({BINS - 1}, floor(({s} - {lo}) / {width}))::INT AS b, count(*) FROM samples "
            f"WHERE {s} IS NOT NULL GROUP BY ALL ORDER BY 1"
        ).fetchall()
        per: dict[str, np.ndarray] = {}
        for src, b, n in counts:
            per.setdefault(src, np.zeros(BINS))[b] = n
        edges = lo + width * np.arange(BINS + 1)
        for src, h in per.items():
            ax.stairs(h / max(1, h.sum()), edges, label=src, linewidth=1.6)
        ax.set_title(f"{s} (higher = more related)", fontsize=10)
        ax.set_ylabel("share of the source")
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=110)
    plt.close(fig)
    return "scores.png"


def _plot_classes(path: Path, hist: dict[str, np.ndarray], classes: list[str], title: str) -> str:
    n = len(hist)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), squeeze=False)
    show = len(classes) <= 20
    for ax, (src, h) in zip(axes.flat, hist.items(), strict=False):
        ax.bar(range(len(h)), h / max(1, h.sum()), color="#4c72b0")
        ax.set_title(f"{src}: H/log C = {rel_entropy(h):.2f}", fontsize=9)
        ax.set_xticks(range(len(h)) if show else [])
        if show:
            ax.set_xticklabels([c[:6] for c in classes], rotation=90, fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_selection(path: Path, sources: list[dict], info: dict, sel_hist: dict, classes: list[str]) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    comp = info["composition"]
    x = np.arange(len(comp))
    pool_share = np.array([c["pool"] for c in comp], float)
    sel_share = np.array([c["selected"] for c in comp], float)
    a.bar(x - 0.2, pool_share / pool_share.sum(), 0.4, label="pool")
    a.bar(x + 0.2, sel_share / max(1, sel_share.sum()), 0.4, label="selection")
    a.set_xticks(x, [c["source"] for c in comp], rotation=30, fontsize=8)
    a.set_title("composition by source (share)", fontsize=10)
    a.legend(frameon=False, fontsize=8)
    total = sum(sel_hist.values(), np.zeros(len(classes)))
    b.bar(range(len(classes)), total / max(1, total.sum()), color="#dd8452")
    b.axhline(1 / len(classes), color="grey", linestyle=":", linewidth=1)
    b.set_title(f"selection: predicted class (H/log C = {rel_entropy(total):.2f})", fontsize=10)
    if len(classes) <= 20:
        b.set_xticks(range(len(classes)), [c[:8] for c in classes], rotation=45, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _thumbnails(con, meta: dict[str, Any], out_dir: Path, score: str, k: int) -> list[str]:
    """Per source, the k most and k least related samples by `score`, in the teacher's view."""
    pick = (
        "SELECT source, unit, key, {s}, {top} AS top FROM samples "
        "QUALIFY row_number() OVER (PARTITION BY source ORDER BY {s} {order} NULLS LAST, uid) <= {k}"
    )  # two single-window queries, one per direction
    rows = con.execute(
        f"SELECT * FROM ({pick.format(s=score, top='true', order='DESC', k=k)} UNION ALL "
        f"{pick.format(s=score, top='false', order='ASC', k=k)}) ORDER BY source, top DESC, {score} DESC"
    ).fetchall()
    spec = InputSpec.from_dict(meta["input"])
    files = []
    by_source: dict[str, list] = {}
    for r in rows:
        by_source.setdefault(r[0], []).append(r)
    for src_name, items in by_source.items():
        try:
            source = parse_source(meta["sources"][src_name]["spec"])
            wanted: dict[str, set[str]] = {}
            for _, unit, key, _, _ in items:
                wanted.setdefault(unit, set()).add(key)
            pixels = {}
            for unit, sample in read_keys(source, wanted):
                try:
                    px = to_pixels(sample.data, spec)[0]
                except DecodeError:
                    continue
                pixels[(unit, sample.key)] = px
        except (UserError, OSError):
            continue  # the source moved away since scoring: no thumbnails, the rest of the report stands
        top = [(pixels.get((u, key)), s) for _, u, key, s, is_top in items if is_top]
        bottom = [(pixels.get((u, key)), s) for _, u, key, s, is_top in items if not is_top]
        name = f"thumbs-{src_name}.png"
        _grid(out_dir / name, top, bottom, src_name, score)
        files.append(name)
    return files


def _grid(path: Path, top: list, bottom: list, source: str, score: str) -> None:
    cols = max(len(top), len(bottom), 1)
    fig, axes = plt.subplots(2, cols, figsize=(0.95 * cols, 2.4), squeeze=False)
    for row, items, label in ((0, top, "most"), (1, bottom, "least")):
        for j in range(cols):
            ax = axes[row][j]
            ax.axis("off")
            if j < len(items) and items[j][0] is not None:
                px, s = items[j]
                img = px[0] if px.shape[0] == 1 else px.transpose(1, 2, 0)
                ax.imshow(img, cmap="gray" if px.shape[0] == 1 else None, interpolation="nearest")
                ax.set_title(f"{s:.2f}" if s is not None else "-", fontsize=6)
        axes[row][0].text(-0.15, 0.5, label, transform=axes[row][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{source}: most and least related by {score}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _html(meta, pool, sources, auroc, task, thumbs, sel, images, score, seconds) -> str:
    e = html.escape
    teacher = meta["teacher"]
    parts = [
        f"<h1>kdcurate report: {e(str(pool.root))}</h1>",
        f"<p class=meta>teacher <code>{e(teacher['spec'])}</code> ({len(meta['classes'])} classes, "
        f"sha256 {e(teacher['sha256'][:12])}…) · input {meta['input']['size']}px × {meta['input']['channels']} ch · "
        f"{sum(s['rows'] for s in sources):,} samples · {sum(s['errors'] for s in sources):,} errors</p>",
        "<h2>Sources</h2>",
        _table(
            [
                "source",
                "samples",
                "errors",
                "mean confidence",
                "mean energy",
                "mean bn_score",
                "H/log C",
                "of the task",
            ],
            [
                [
                    s["source"],
                    s["rows"],
                    s["errors"],
                    s["confidence"],
                    s["energy"],
                    s["bn_score"],
                    s["rel_entropy"],
                    "yes" if s["task"] else "",
                ]
                for s in sources
            ],
        ),  # fmt: skip
        "<p class=note>H/log C: relative entropy of the teacher's predicted-class histogram; near 1 = the teacher "
        "sees every class in this source (Frank &amp; Davis 2025).</p>",
        "<h2>Score distributions</h2><img src='scores.png' alt='score histograms'>",
        "<h2>Predicted classes</h2><img src='classes.png' alt='predicted-class histograms'>",
    ]
    if auroc:
        parts += [
            f"<h2>How well each score finds the task</h2><p class=note>AUROC, positive = sources of the task "
            f"({e(', '.join(sorted(task)))}), every other source negative; 0.5 = no better than chance.</p>",
            _table(["score", "AUROC"], sorted(([k, v] for k, v in auroc.items()), key=lambda r: -r[1])),
        ]
    if sel:
        parts += ["<h2>Selection</h2>", f"<p>{sel['rows']:,} of {sel['pool_rows']:,} samples selected; "
                  f"predicted-class H/log C = {sel['rel_entropy']:.3f}.</p>"]  # fmt: skip
        if "precision" in sel:
            parts.append(
                f"<p>Precision (share of the selection from the task's sources): <b>{sel['precision']:.3f}</b> "
                f"against {sel['share_of_task_in_pool']:.3f} in the pool; the teacher's class agrees with the true "
                f"label on {_pct(sel['teacher_label_accuracy'])} of the selected task samples.</p>"
            )
            parts.append(
                _table(
                    ["score", f"precision of the top {sel['rows']:,} by it"],
                    sorted(([k, v] for k, v in sel["precision_top_n_by_score"].items()), key=lambda r: -(r[1] or 0)),
                )
            )
        parts.append(
            _table(
                ["source", "in pool", "selected", "share selected"],
                [
                    [c["source"], c["pool"], c["selected"], c["selected"] / max(1, c["pool"])]
                    for c in sel["composition"]
                ],
            )  # fmt: skip
        )
        parts.append("<img src='selection.png' alt='selection composition'>")
    if thumbs:
        parts.append(f"<h2>Most and least related, by {e(score)}</h2>")
        parts += [f"<img class=thumbs src='{e(t)}' alt='{e(t)}'>" for t in thumbs]
    parts.append(f"<p class=meta>made in {seconds:.1f} s by curate report · {time.strftime('%Y-%m-%d %H:%M')}</p>")
    style = (
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1150px;color:#222;padding:0 16px}"
        "h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}"
        "table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;border-bottom:1px solid #eee;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f6f6f6}"
        "img{max-width:100%;display:block;margin:8px 0}.meta,.note{color:#666;font-size:12.5px}"
        "code{background:#f3f3f3;padding:1px 4px}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>kdcurate report</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"  # fmt: skip


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"

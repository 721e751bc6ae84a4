"""`curate`: the typer layer over the stage functions. Each command's options are its config's fields
(curate/config.py); the command builds the config and calls one plain function of the same name. Results go
to stdout, progress bars and warnings to stderr; with --json stdout holds one JSON object, the command's result
(kdcore.output)."""

from __future__ import annotations

from typing import Any

import typer

from curate import config
from kdcore.errors import run_app
from kdcore.options import command
from kdcore.output import console, jsonable, table

app = typer.Typer(
    help="Score unlabeled image collections with a teacher, query the pool, export distillation shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _score(cfg: config.ScoreConfig) -> dict[str, Any]:
    from curate.score import score

    res = score(cfg)
    data: dict[str, Any] = {"pool": res.pool, "engine": cfg.engine, "rows": res.rows,
                            "errors": sum(st.errors for st in res.per_source.values()), "error_rate": res.error_rate,
                            "seconds": res.seconds, "batch_size": res.batch_size, "batch_note": res.batch_note,
                            "per_source": {}, "notes": [], "warnings": []}  # fmt: skip
    for name, st in res.per_source.items():
        data["per_source"][name] = {**jsonable(st), "samples_per_second": (st.rows + st.errors) / st.seconds
                                    if st.seconds else None}  # fmt: skip
        if st.skipped:
            data["notes"].append(f"source {name}: {len(st.skipped)} entries skipped, not regular files (e.g. a "
                                 f"dangling link: {st.skipped[0]})")  # fmt: skip
    data["failed_units"] = [{"source": s, "unit": u, "reason": r} for s, u, r in res.failed_units]
    if res.failed_units:
        src, unit, reason = res.failed_units[0]
        data["warnings"].append(f"{len(res.failed_units)} unit(s) failed {cfg.retries + 1} tries and were not "
                                f"scored (first: {src}/{unit}: {reason}); see {res.pool}/errors/, rerun to try them "
                                "again")  # fmt: skip
    if res.error_rate_exceeded:
        data["error"] = (f"error rate {res.error_rate:.2%} exceeds --max-error-rate {cfg.max_error_rate:.2%}; see "
                         f"{res.pool}/errors/ ('curate sql {res.pool} \"SELECT reason, count(*) FROM errors GROUP BY "
                         "1\"')")  # fmt: skip
    return data


def _show_score(data: dict[str, Any]) -> None:
    t = table(["source", "units", "skipped", "rescored", "removed", "rows", "errors", "samples/s"],
              f"pool {data['pool']} (engine {data['engine']})")  # fmt: skip
    for name, st in data["per_source"].items():
        rate = f"{st['samples_per_second']:,.0f}" if st["samples_per_second"] is not None else "-"
        t.add_row(name, str(st["units"]), str(st["units_skipped"]), str(st["units_changed"]), str(st["units_removed"]),
                  f"{st['rows']:,}", f"{st['errors']:,}", rate)  # fmt: skip
    out = console()
    out.print(t)
    out.print(f"{data['rows']:,} rows scored in {data['seconds']:.1f} s; pool error rate {data['error_rate']:.2%}")
    out.print(f"batch size {data['batch_size']:,} ({data['batch_note']})")


command(
    app,
    config.ScoreConfig,
    _score,
    "score",
    """Run the teacher over image sources; write logits, scores and
embeddings to a pool.

A killed run resumes where it stopped: rerun the same command. A rerun also follows the sources: units
whose files changed are rescored, units that are gone are removed. A unit that fails every try is reported
(an errors/ row, no record) and tried again by the next run. --engine ray runs the same units on a Ray
cluster (one teacher actor per GPU) and writes the same pool.

\b
Examples:
  curate score --teacher runs/teacher/student.pt --pool pool/ \\
    --source 'shop=folder:/data/shop' --source 'leaves=synthetic:dead-leaves?n=10000'
  curate score --teacher 'torchvision:resnet18?weights=r18.pt&classes=@classes.txt' --pool s3://bkt/pool \\
    --source 'crawl=wds:s3://bkt/crawl/{00000..00099}.tar' --logits topk:20
""",
    show=_show_score,
)


def _compact(cfg: config.CompactConfig) -> dict[str, Any]:
    from curate.compact import compact

    return jsonable(compact(cfg))


def _show_compact(d: dict[str, Any]) -> None:
    console().print(f"{d['units_merged']:,} units ({d['rows_merged']:,} rows) merged into {len(d['written'])} file(s): "
                    f"{d['parts_before']:,} files -> {d['files_after']:,} in {d['seconds']:.1f} s")  # fmt: skip


command(
    app,
    config.CompactConfig,
    _compact,
    "compact",
    """Merge the pool's small unit parts into large Parquet files per
source (DuckDB scans open fewer files).

Safe to run on a pool that is still being scored (only complete units are merged) and to kill at any
moment: readers never see a row twice, and the next run finishes the job.

\b
Example:
  curate compact pool/ --target-rows 2000000
""",
    show=_show_compact,
)


def _index(cfg: config.IndexConfig) -> dict[str, Any]:
    from curate.index import index

    data = {**jsonable(index(cfg)), "sources": cfg.sources, "merged": not cfg.sources}
    if cfg.sources:
        data["notes"] = [f"merge the sub-indexes with 'curate index {cfg.pool} --per-source'"]
    return data


def _show_index(d: dict[str, Any]) -> None:
    size = f"{d['bytes'] / 2**20:.1f} MiB, {d['seconds']:.1f} s -> {d['path']}"
    if not d["merged"]:
        console().print(f"sub-indexes ({d['factory']}) of {', '.join(d['sources'])}: {d['rows']:,} vectors, {size}")
        return
    recall = f"{d['recall_at_10']:.3f}" if d["recall_at_10"] is not None else "-"
    console().print(f"{d['kind']} index ({d['factory']}) over {d['rows']:,} vectors of dim {d['dim']}: recall@10 "
                    f"{recall}, {size}")  # fmt: skip


command(
    app,
    config.IndexConfig,
    _index,
    "index",
    """Build a FAISS index over the pool's embeddings (ids = uids) and
measure its recall@10.

IVF-PQ is trained on a sample and filled in streamed batches: memory is the index, not the embeddings.

\b
Examples:
  curate index pool/ --memory 4GB
  curate index pool/ --per-source --sources cc0,cc1    # one machine's share; a last run merges
""",
    show=_show_index,
)


def _sql(cfg: config.SqlConfig, as_json: bool) -> dict[str, Any] | None:
    from curate.query import sql
    from kdcore import storage

    n = sql(cfg, as_json=as_json)
    if cfg.out:
        return {"out": storage.redact(cfg.out), "format": "csv" if cfg.format == "table" else cfg.format, "count": n}
    return None  # the rows are on stdout


def _show_sql(d: dict[str, Any]) -> None:
    if d.get("out"):
        console(stderr=True).print(f"{d['count']:,} rows -> {d['out']}", markup=False)


command(
    app,
    config.SqlConfig,
    _sql,
    "sql",
    """Query a pool with DuckDB, read-only. Views: samples (source is a
column), errors, selection (with --selection).

One SELECT statement; results leave only through stdout or --out. Macros: prob(logits, k),
topk_classes(logits, k), rel_entropy(list_of_counts). The column meta holds source metadata as JSON
text (e.g. json_extract_string(meta, '$.caption')). --json prints one object: {"columns": [...], "rows":
[{...}, ...], "count": N} with every row (--limit is for the table), or with --out what was written.

\b
Examples:
  curate sql pool/ 'SELECT source, count(*), avg(bn_score) FROM samples GROUP BY source'
  curate sql pool/ 'SELECT uid, sample_id FROM samples WHERE energy > 4' --format parquet --out related.parquet
  n=$(curate sql pool/ 'SELECT count(*) AS n FROM samples' --json | jq '.rows[0].n')
""",
    show=_show_sql,
    json_aware=True,
)


def _select(cfg: config.SelectConfig) -> dict[str, Any]:
    from curate.select import select

    return jsonable(select(cfg))


def _show_select(d: dict[str, Any]) -> None:
    t = table(["source", "selected"])
    for name, c in sorted(d["per_source"].items()):
        t.add_row(name, f"{c:,}")
    out = console()
    out.print(t)
    out.print(f"{d['rows']:,} of {d['candidates']:,} candidates selected -> {d['out']}", markup=False)
    counts = sorted(d["per_class"].items(), key=lambda kv: kv[1])
    shown = counts if len(counts) <= 12 else counts[:5] + [("…", None)] + counts[-3:]
    classes = ", ".join(f"{k}={v:,}" if v is not None else "…" for k, v in shown)
    h = f"{d['rel_entropy']:.3f}" if d["rel_entropy"] is not None else "-"
    out.print(f"per class ({len(counts)} classes, fewest first): {classes}; relative entropy {h}"
              + (f"; dedup removed {d['dedup_removed']:,}" if d["dedup_removed"] else ""), markup=False)  # fmt: skip
    if d["short_classes"]:
        short = sorted(d["short_classes"].items(), key=lambda kv: kv[1])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        out.print(f"{len(short)} classes short of --per-class: " + ", ".join(f"{k} ({v})" for k, v in short[:10])
                  + more, markup=False)  # fmt: skip


command(
    app,
    config.SelectConfig,
    _select,
    "select",
    """Select a subset of a pool: SQL filter -> strategy -> dedup.
Writes selection.parquet and selection.json.

\b
Examples:
  curate select pool/ --strategy top-per-class --per-class 500 --score energy --out sel/
  curate select pool/ --strategy weighted --n 20000 --temperature 0.5 --where "source <> 'noise'" --out sel/
  curate select pool/ --strategy near --reference 'task=folder:refs/' --n 5000 --out sel/
""",
    show=_show_select,
)


def _report(cfg: config.ReportConfig) -> dict[str, Any]:
    from curate.report import report

    return jsonable(report(cfg))


def _show_report(d: dict[str, Any]) -> None:
    t = table(["source", "samples", "errors", "auto", "confidence", "energy", "bn_score", "H/log C", "task"])
    for s in d["sources"]:
        scores = [_f(s.get(k)) for k in ("auto", "confidence", "energy", "bn_score", "rel_entropy")]
        t.add_row(s["source"], f"{s['rows']:,}", f"{s['errors']:,}", *scores, "yes" if s.get("task") else "")
    out = console()
    out.print(t)
    if d.get("auroc"):
        out.print("AUROC (task sources positive): " + ", ".join(f"{k} {_f(v)}" for k, v in d["auroc"].items()))
    sel = d.get("selection")
    if sel and sel.get("precision") is not None:
        out.print(f"selection: {sel['rows']:,} rows, precision {sel['precision']:.3f}")
    out.print(f"report -> {d['html']}", markup=False)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


command(
    app,
    config.ReportConfig,
    _report,
    "report",
    """Write an HTML report of a pool (and a selection): counts,
score histograms, class histograms, how well each score finds the task, thumbnails; print a summary.

\b
Example:
  curate report pool/ --selection sel/ --out report/ && chromium report/report.html
""",
    show=_show_report,
)


def _export(cfg: config.ExportConfig) -> dict[str, Any]:
    from curate.export import export

    res = export(cfg)
    data = {**jsonable(res), "manifest": f"{res.out}/manifest.json", "warnings": []}
    if res.errors:
        data["warnings"].append(f"{res.errors:,} samples could not be exported; see {res.out}/errors.parquet")
    return data


def _show_export(d: dict[str, Any]) -> None:
    rate = d["samples"] / d["seconds"] if d["seconds"] else 0
    console().print(f"{d['samples']:,} samples in {d['shards']} shards ({d['shards_skipped']} already done), "
                    f"{d['bytes'] / 2**20:.1f} MiB, {rate:,.0f} samples/s -> {d['manifest']}",
                    markup=False)  # fmt: skip


command(
    app,
    config.ExportConfig,
    _export,
    "export",
    """Write a selection (image bytes + teacher soft labels) or a
labelled source as WebDataset shards.

A killed export resumes: rerun the same command; complete shards are kept.

\b
Examples:
  curate export pool/ --selection sel/ --out shards/
  curate export pool/ --selection sel/ --out s3://bucket/shards/
  curate export --source 'test=folder:/data/test?labels=dirs' --out eval-shards/
  curate export pool/ --selection sel/ --out shards/ --image-format jpg --image-size view
""",
    show=_show_export,
)


def _synthesize(cfg: config.SynthesizeConfig) -> dict[str, Any]:
    from curate.synthesize import result_dict, synthesize

    return result_dict(synthesize(cfg))


def _show_synthesize(d: dict[str, Any]) -> None:
    hit = f"; the teacher predicts the target class for {d['target_hit']:.0%}" if d["target_hit"] is not None else ""
    console().print(f"{d['images']:,} {d['method']} images ({d['batches_run']} batches run, {d['batches_skipped']} "
                    f"already done) in {d['seconds']:.1f} s{hit} -> {d['out']}", markup=False)  # fmt: skip
    console().print(f"score them like any source: --source 'synth=folder:{d['out']}'", markup=False)


command(
    app,
    config.SynthesizeConfig,
    _synthesize,
    "synthesize",
    """Make images with the teacher itself, for pools that hold little
of its data: DeepInversion from its BatchNorm statistics, or source images
moved toward its decision boundaries. Written as PNG files; score them as a
folder: source.

A killed run resumes where it stopped: rerun the same command.

\b
Examples:
  curate synthesize --teacher runs/teacher --out synth/inv --n 5000
  curate synthesize --teacher runs/teacher --out synth/edge --method boundary \\
    --source 'crawl=folder:/data/crawl' --n 5000
  curate score --teacher runs/teacher --pool pool/ --source 'inv=folder:synth/inv' ...
""",
    show=_show_synthesize,
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

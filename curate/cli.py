"""`curate`: the typer layer over the stage functions. Each command's options are its config's fields
(curate/config.py); the command builds the config and calls one plain function of the same name. Results go
to stdout, progress bars and warnings to stderr."""

from __future__ import annotations

import sys

import typer

from curate import config
from kdcore.errors import run_app
from kdcore.options import command

app = typer.Typer(
    help="Score unlabeled image collections with a teacher, query the pool, export distillation shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _console():
    from rich.console import Console

    return Console()


def _table(title: str | None, columns: list[str]):
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def _score(cfg: config.ScoreConfig) -> None:
    from curate.score import score

    res = score(cfg)
    table = _table(f"pool {res.pool} (engine {cfg.engine})",
                   ["source", "units", "skipped", "rescored", "removed", "rows", "errors", "samples/s"])  # fmt: skip
    for name, st in res.per_source.items():
        rate = f"{(st.rows + st.errors) / st.seconds:,.0f}" if st.seconds else "-"
        table.add_row(name, str(st.units), str(st.units_skipped), str(st.units_changed), str(st.units_removed),
                      f"{st.rows:,}", f"{st.errors:,}", rate)  # fmt: skip
    out = _console()
    out.print(table)
    out.print(f"{res.rows:,} rows scored in {res.seconds:.1f} s; pool error rate {res.error_rate:.2%}")
    for name, st in res.per_source.items():
        if st.skipped:
            print(f"note: source {name}: {len(st.skipped)} entries skipped, not regular files (e.g. a dangling link: "
                  f"{st.skipped[0]})", file=sys.stderr)  # fmt: skip
    if res.failed_units:
        src, unit, reason = res.failed_units[0]
        print(f"warning: {len(res.failed_units)} unit(s) failed {cfg.retries + 1} tries and were not scored (first: "
              f"{src}/{unit}: {reason}); see {res.pool}/errors/, rerun to try them again", file=sys.stderr)  # fmt: skip
    if res.error_rate_exceeded:
        print(f"error: error rate {res.error_rate:.2%} exceeds --max-error-rate {cfg.max_error_rate:.2%}; see "
              f"{res.pool}/errors/ ('curate sql {res.pool} \"SELECT reason, count(*) FROM errors GROUP BY 1\"')",
              file=sys.stderr)  # fmt: skip
        raise typer.Exit(1)


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
)


def _compact(cfg: config.CompactConfig) -> None:
    from curate.compact import compact

    res = compact(cfg)
    _console().print(f"{res.units_merged:,} units ({res.rows_merged:,} rows) merged into {len(res.written)} file(s): "
                     f"{res.parts_before:,} files -> {res.files_after:,} in {res.seconds:.1f} s")  # fmt: skip


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
)


def _index(cfg: config.IndexConfig) -> None:
    from curate.index import index

    res = index(cfg)
    if res.recall_at_10 is None:
        _console().print(f"sub-indexes ({res.factory}) of {', '.join(cfg.sources)}: {res.rows:,} vectors, "
                         f"{res.bytes / 2**20:.1f} MiB, {res.seconds:.1f} s -> {res.path}; merge them with "
                         f"'curate index {cfg.pool} --per-source'")  # fmt: skip
        return
    _console().print(
        f"{res.kind} index ({res.factory}) over {res.rows:,} vectors of dim {res.dim}: recall@10 "
        f"{res.recall_at_10:.3f}, {res.bytes / 2**20:.1f} MiB, {res.seconds:.1f} s -> {res.path}"
    )


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
)


def _sql(cfg: config.SqlConfig) -> None:
    from curate.query import sql

    n = sql(cfg)
    if cfg.out:
        print(f"{n:,} rows -> {cfg.out}", file=sys.stderr)


command(
    app,
    config.SqlConfig,
    _sql,
    "sql",
    """Query a pool with DuckDB, read-only. Views: samples (source is a
column), errors, selection (with --selection).

One SELECT statement; results leave only through stdout or --out. Macros: prob(logits, k),
topk_classes(logits, k), rel_entropy(list_of_counts). The column meta holds source metadata as JSON
text (e.g. json_extract_string(meta, '$.caption')).

\b
Examples:
  curate sql pool/ 'SELECT source, count(*), avg(bn_score) FROM samples GROUP BY source'
  curate sql pool/ 'SELECT uid, sample_id FROM samples WHERE energy > 4' --format parquet --out related.parquet
""",
)


def _select(cfg: config.SelectConfig) -> None:
    from curate.select import select

    res = select(cfg)
    table = _table(None, ["source", "selected"])
    for name, c in sorted(res.per_source.items()):
        table.add_row(name, f"{c:,}")
    out = _console()
    out.print(table)
    out.print(f"{res.rows:,} of {res.candidates:,} candidates selected -> {res.out}")
    counts = sorted(res.per_class.items(), key=lambda kv: kv[1])
    shown = counts if len(counts) <= 12 else counts[:5] + [("…", None)] + counts[-3:]
    classes = ", ".join(f"{k}={v:,}" if v is not None else "…" for k, v in shown)
    out.print(f"per class ({len(counts)} classes, fewest first): {classes}; relative entropy {res.rel_entropy:.3f}"
              + (f"; dedup removed {res.dedup_removed:,}" if res.dedup_removed else ""), markup=False)  # fmt: skip
    if res.short_classes:
        short = sorted(res.short_classes.items(), key=lambda kv: kv[1])
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
)


def _report(cfg: config.ReportConfig) -> None:
    from curate.report import report

    res = report(cfg)
    table = _table(None, ["source", "samples", "errors", "auto", "confidence", "energy", "bn_score", "H/log C", "task"])
    for s in res.sources:
        table.add_row(s["source"], f"{s['rows']:,}", f"{s['errors']:,}", _f(s["auto"]), _f(s["confidence"]),
                      _f(s["energy"]), _f(s["bn_score"]), _f(s["rel_entropy"]), "yes" if s["task"] else "")  # fmt: skip
    out = _console()
    out.print(table)
    if res.auroc:
        out.print("AUROC (task sources positive): " + ", ".join(f"{k} {v:.3f}" for k, v in res.auroc.items()))
    if res.selection and "precision" in res.selection:
        out.print(f"selection: {res.selection['rows']:,} rows, precision {res.selection['precision']:.3f}")
    for warning in res.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out.print(f"report -> {res.html}")


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
)


def _export(cfg: config.ExportConfig) -> None:
    from curate.export import export

    res = export(cfg)
    rate = res.samples / res.seconds if res.seconds else 0
    _console().print(f"{res.samples:,} samples in {res.shards} shards ({res.shards_skipped} already done), "
                     f"{res.bytes / 2**20:.1f} MiB, {rate:,.0f} samples/s -> {res.out}/manifest.json")  # fmt: skip
    if res.errors:
        print(f"warning: {res.errors:,} samples could not be exported; see {res.out}/errors.parquet", file=sys.stderr)


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
""",
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

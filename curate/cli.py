"""`curate`: the typer layer over the stage functions. Each command calls one plain function."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from curate.errors import run_app
from distill.models import SpecError

app = typer.Typer(
    help="Score unlabeled image collections with a teacher, query the pool, export distillation shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()


@app.command()
def score(
    teacher: str = typer.Option(
        ...,
        help="torchvision:ARCH?num_classes=N&weights=PATH, torchscript:PATH, "
        "python:MODULE:FACTORY?weights=PATH, or a student.pt / run directory; "
        "add size=, channels=, mean=, std= to set the preprocessing.",
    ),
    source: list[str] = typer.Option(
        ...,
        help="NAME=KIND:LOCATION[?opt=val&...], repeatable. Kinds: folder, wds, "
        "parquet, idx, npy, synthetic, builtin. Quote specs holding ? and &.",
    ),
    pool: str = typer.Option(..., help="Pool directory (created, or resumed when it exists)."),
    batch_size: int = typer.Option(256, help="Samples per forward pass."),
    workers: int = typer.Option(-1, help="Decode worker processes; -1 picks (0 for undecoded arrays on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    logits: str = typer.Option("full", help="full, or topk:K to keep the K largest logits (many classes)."),
    embed_layer: str = typer.Option("auto", help="auto (input of the final linear) or a module name."),
    max_error_rate: float = typer.Option(0.01, help="Exit 1 when more than this share of samples failed."),
    odin: bool = typer.Option(False, help="Also compute ODIN (one extra forward+backward per batch)."),
    overwrite: bool = typer.Option(False, help="Discard an existing pool scored differently."),
    retries: int = typer.Option(2, help="Tries more for a unit whose reading fails; then it is reported."),
    engine: str = typer.Option("local", help="local (this process + DataLoader workers) or ray (kdcurate[ray])."),
    ray_address: str = typer.Option(
        None, help="With --engine ray: a running cluster (HOST:6379 or auto); default: a new local Ray instance."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run the teacher over image sources; write logits, scores and embeddings to a pool.

    A killed run resumes where it stopped: rerun the same command. A unit that fails every try is
    reported (an errors/ row, no marker) and tried again by the next run. --engine ray runs the
    same units on a Ray cluster (one teacher actor per GPU) and writes the same pool.

    \b
    Example:
      curate score --teacher runs/teacher/student.pt --pool pool/ \\
        --source 'shop=folder:/data/shop' --source 'leaves=synthetic:dead-leaves?n=10000'
    """
    from curate.score import ScoreConfig
    from curate.score import score as run

    cfg = ScoreConfig(
        teacher=teacher,
        sources=source,
        pool=pool,
        batch_size=batch_size,
        workers=workers,
        device=device,
        logits=logits,
        embed_layer=embed_layer,
        max_error_rate=max_error_rate,
        odin=odin,
        overwrite=overwrite,
        retries=retries,
        engine=engine,
        ray_address=ray_address,
        show_progress=progress,
    )
    res = run(cfg)
    table = Table(title=f"pool {res.pool} (engine {engine})")
    for col in ("source", "units", "skipped", "rows", "errors", "samples/s"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, st in res.per_source.items():
        rate = f"{(st.rows + st.errors) / st.seconds:,.0f}" if st.seconds else "-"
        table.add_row(name, str(st.units), str(st.units_skipped), f"{st.rows:,}", f"{st.errors:,}", rate)
    out.print(table)
    out.print(f"{res.rows:,} rows scored in {res.seconds:.1f} s; pool error rate {res.error_rate:.2%}")
    if res.failed_units:
        first = res.failed_units[0]
        print(
            f"warning: {len(res.failed_units)} unit(s) failed {retries + 1} tries and were not scored "
            f"(first: {first[0]}/{first[1]}: {first[2]}); see {res.pool}/errors/, rerun to try them again",
            file=sys.stderr,
        )
    if res.error_rate_exceeded:
        print(
            f"error: error rate {res.error_rate:.2%} exceeds --max-error-rate {max_error_rate:.2%}; "
            f"see {res.pool}/errors/",
            file=sys.stderr,
        )
        raise typer.Exit(1)


@app.command()
def compact(
    pool: str = typer.Argument(..., help="Pool directory."),
    target_rows: int = typer.Option(1_000_000, help="Rows per compact file (about)."),
    row_group_rows: int = typer.Option(131_072, help="Rows per Parquet row group in the compact files."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Merge the pool's small unit parts into large Parquet files per source (DuckDB scans open fewer files).

    Safe to run on a pool that is still being scored (only complete units are merged) and to kill at any
    moment: readers never see a row twice, and the next run finishes the job. Markers stay, so
    'curate score' still skips the merged units.

    \b
    Example:
      curate compact pool/ --target-rows 2000000
    """
    from curate.compact import compact as run

    res = run(pool, target_rows=target_rows, row_group_rows=row_group_rows, show_progress=progress)
    out.print(
        f"{res.units_merged:,} units ({res.rows_merged:,} rows) merged into {len(res.written)} file(s): "
        f"{res.parts_before:,} files -> {res.files_after:,} in {res.seconds:.1f} s"
    )


@app.command()
def index(
    pool: str = typer.Argument(..., help="Pool directory."),
    kind: str = typer.Option("auto", help="auto (flat when it fits, else IVF-PQ), flat, ivf-pq or hnsw."),
    memory: str = typer.Option("4GB", help="Memory budget for the index, e.g. 512MB, 4GB."),
    per_source: bool = typer.Option(
        False, help="One sub-index per source, merged; a rerun re-encodes only the sources whose files changed."
    ),
    retrain: bool = typer.Option(False, help="With --per-source: train the quantizer again (all sources re-encoded)."),
    sources: str = typer.Option(
        None,
        help="With --per-source: build only these sources' sub-indexes (comma-separated) and skip the merge, so "
        "several machines on shared storage can split the sources; a last run without --sources merges them.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Build a FAISS index over the pool's embeddings (ids = uids) and measure its recall@10.

    IVF-PQ is trained on a sample and filled in streamed batches: memory is the index, not the embeddings.
    """
    from curate.index import index as run

    names = [s.strip() for s in sources.split(",") if s.strip()] if sources is not None else None
    res = run(pool, kind=kind, memory=memory, per_source=per_source, retrain=retrain, sources=names,
              show_progress=progress)  # fmt: skip
    if res.recall_at_10 is None:
        out.print(
            f"sub-indexes ({res.factory}) of {', '.join(names or [])}: {res.rows:,} vectors, "
            f"{res.bytes / 2**20:.1f} MiB, {res.seconds:.1f} s -> {res.path}; "
            f"merge them with 'curate index {pool} --per-source'"
        )
        return
    out.print(
        f"{res.kind} index ({res.factory}) over {res.rows:,} vectors of dim {res.dim}: "
        f"recall@10 {res.recall_at_10:.3f}, {res.bytes / 2**20:.1f} MiB, {res.seconds:.1f} s -> {res.path}"
    )


@app.command()
def sql(
    pool: str = typer.Argument(..., help="Pool directory."),
    query: str = typer.Argument(..., help="SQL over the views samples, errors (and selection)."),
    format: str = typer.Option("table", help="table, csv, json (one object per line) or parquet."),
    out: str = typer.Option(None, help="Write the result to this file instead of stdout."),
    selection: str = typer.Option(None, help="A selection directory, exposed as the view 'selection'."),
    limit: int = typer.Option(50, help="Rows shown by --format table."),
) -> None:
    """Query a pool with DuckDB (read-only). Views: samples (source is a column), errors, selection.

    Macros: prob(logits, k), topk_classes(logits, k), rel_entropy(list_of_counts).

    \b
    Example:
      curate sql pool/ 'SELECT source, count(*), avg(confidence) FROM samples GROUP BY source'
    """
    from curate.query import sql as run

    n = run(pool, query, format=format, out=out, selection=selection, limit=limit)
    if out:
        out_console = Console(stderr=True)
        out_console.print(f"{n:,} rows -> {out}")


@app.command()
def select(
    pool: str = typer.Argument(..., help="Pool directory."),
    strategy: str = typer.Option(..., help="threshold, top-per-class, weighted, balanced, random, near or diverse."),
    out: str = typer.Option(..., help="Selection directory (selection.parquet + selection.json)."),
    where: str = typer.Option(None, help="SQL filter over the samples view, applied first."),
    score: str = typer.Option("confidence", help="Column or SQL expression ranking samples (higher = better)."),
    n: int = typer.Option(None, help="How many samples (weighted, balanced, near, diverse)."),
    per_class: int = typer.Option(None, help="top-per-class: K per predicted class."),
    threshold: float = typer.Option(None, help="threshold: keep score >= T."),
    fraction: float = typer.Option(None, help="threshold: keep the top fraction F by score instead."),
    temperature: float = typer.Option(1.0, help="weighted: p ∝ softmax(score / T)."),
    gamma: float = typer.Option(None, help="weighted: p ∝ score ** GAMMA instead of the softmax."),
    replace: bool = typer.Option(False, help="weighted: draw with replacement (weight = times drawn)."),
    reference: list[str] = typer.Option(None, help="near: NAME=SPEC of reference images, repeatable."),
    k: int = typer.Option(10, help="near: score = cosine similarity to the k-th nearest reference."),
    nprobe: int = typer.Option(None, help="near: IVF lists probed (default: the index's; more = slower, better)."),
    clusters: int = typer.Option(64, help="diverse: k-means clusters (equal quotas)."),
    dedup: str = typer.Option(None, help="exact (content hash) or near:COS (embedding cosine >= COS)."),
    seed: int = typer.Option(0, help="Seed of every random choice; same seed, same selection."),
) -> None:
    """Select a subset of a pool: SQL filter -> strategy -> dedup. Writes selection.parquet/.json.

    \b
    Examples:
      curate select pool/ --strategy top-per-class --per-class 500 --score energy --out sel/
      curate select pool/ --strategy weighted --n 20000 --temperature 0.5 --where "source <> 'noise'" --out sel/
      curate select pool/ --strategy near --reference 'task=folder:refs/' --n 5000 --out sel/
    """
    from curate.select import SelectConfig
    from curate.select import select as run

    res = run(
        SelectConfig(
            pool=pool, strategy=strategy, out=out, where=where, score=score, n=n, per_class=per_class,
            threshold=threshold, fraction=fraction, temperature=temperature, gamma=gamma, replace=replace,
            references=list(reference or []), k=k, nprobe=nprobe, clusters=clusters, dedup=dedup, seed=seed,
        )
    )  # fmt: skip
    table = Table()
    table.add_column("source")
    table.add_column("selected", justify="right")
    for name, c in sorted(res.per_source.items()):
        table.add_row(name, f"{c:,}")
    out_console = Console()
    out_console.print(table)
    out_console.print(f"{res.rows:,} of {res.candidates:,} candidates selected -> {res.out}")
    out_console.print(
        "per class: " + ", ".join(f"{k}={v}" for k, v in res.per_class.items())
        + f"; relative entropy {res.rel_entropy:.3f}"
        + (f"; dedup removed {res.dedup_removed:,}" if res.dedup_removed else "")
    )  # fmt: skip
    if res.short_classes:
        out_console.print(
            "classes short of --per-class: " + ", ".join(f"{k} ({v})" for k, v in res.short_classes.items())
        )


@app.command()
def report(
    pool: str = typer.Argument(..., help="Pool directory."),
    out: str = typer.Option(..., help="Report directory: report.html, PNGs beside it, report.json."),
    selection: str = typer.Option(None, help="A selection directory to describe against the pool."),
    score: str = typer.Option("confidence", help="Score ranking the thumbnails (most and least related)."),
    thumbs: int = typer.Option(12, help="Thumbnails per source and direction."),
    task_source: list[str] = typer.Option(
        None, help="Sources that belong to the teacher's task (default: labelled sources with the teacher's classes)."
    ),
) -> None:
    """Write an HTML report of a pool (and a selection): counts, score histograms, class histograms,
    how well each score finds the task, thumbnails; print a summary.

    \b
    Example:
      curate report pool/ --selection sel/ --out report/ && chromium report/report.html
    """
    from curate.report import report as run

    res = run(pool, out, selection=selection, score=score, thumbs=thumbs, task_sources=list(task_source or []))
    table = Table()
    for col in ("source", "samples", "errors", "confidence", "energy", "bn_score", "H/log C", "task"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in res.sources:
        table.add_row(
            s["source"], f"{s['rows']:,}", f"{s['errors']:,}", _f(s["confidence"]), _f(s["energy"]),
            _f(s["bn_score"]), _f(s["rel_entropy"]), "yes" if s["task"] else "",
        )  # fmt: skip
    out_console = Console()
    out_console.print(table)
    if res.auroc:
        out_console.print("AUROC (task sources positive): " + ", ".join(f"{k} {v:.3f}" for k, v in res.auroc.items()))
    if res.selection and "precision" in res.selection:
        out_console.print(f"selection: {res.selection['rows']:,} rows, precision {res.selection['precision']:.3f}")
    out_console.print(f"report -> {res.html}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


@app.command()
def export(
    pool: str = typer.Argument(None, help="Pool directory (with --selection)."),
    out: str = typer.Option(..., help="Shard directory: shard-NNNNNN.tar, manifest.json."),
    selection: str = typer.Option(None, help="Selection directory from 'curate select'."),
    source: list[str] = typer.Option(None, help="Export a labelled source instead, no teacher: NAME=KIND:LOCATION."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    soft_labels: str = typer.Option("full", help="full (float16 logits) or topk:K (the K largest, with indices)."),
    workers: int = typer.Option(-1, help="Writer processes; -1 = one per core."),
    seed: int = typer.Option(0, help="Seed of the order in which units are spread over shards."),
    overwrite: bool = typer.Option(False, help="Replace shards of a different export in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write a selection (image bytes + teacher soft labels) or a labelled source as WebDataset shards.

    A killed export resumes: rerun the same command; complete shards are kept.

    \b
    Examples:
      curate export pool/ --selection sel/ --out shards/
      curate export --source 'test=builtin:fashion-mnist?split=test' --out eval-shards/
    """
    from curate.export import ExportConfig
    from curate.export import export as run

    res = run(
        ExportConfig(out=out, pool=pool, selection=selection, sources=list(source or []) or None,
                     shard_size=shard_size, soft_labels=soft_labels, workers=workers, seed=seed,
                     overwrite=overwrite, show_progress=progress)
    )  # fmt: skip
    rate = res.samples / res.seconds if res.seconds else 0
    Console().print(
        f"{res.samples:,} samples in {res.shards} shards ({res.shards_skipped} already done), "
        f"{res.bytes / 2**20:.1f} MiB, {rate:,.0f} samples/s -> {res.out}/manifest.json"
    )
    if res.errors:
        print(f"warning: {res.errors:,} samples could not be exported; see {res.out}/errors.parquet", file=sys.stderr)


def main() -> None:
    run_app(app, SpecError)


if __name__ == "__main__":
    main()

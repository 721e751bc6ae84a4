"""The configs of the curate commands: each option declared once, with its help text.

`curate`'s CLI options and the pipeline's TOML keys are derived from these fields (kdcore.options); the
stage functions take the config. This module imports no heavy library, so `curate --help` stays fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdcore.errors import UserError
from kdcore.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from kdcore.options import option

PROGRESS = "the pipeline's own --progress"
WORK = "the job's work directory"


MAX_BATCH = 65_536  # samples per forward pass; more is a typo (a batch is held in memory whole)
MEMORY_FORMAT = "a size such as 512MB or 4GB"


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _workers(value: int) -> None:
    if value < -1:
        raise UserError(f"--workers must be -1 (pick for me), 0 (in this process) or a count, got {value}")


def _batch(value: int | None) -> None:
    _positive("batch_size", value)
    if value is not None and value > MAX_BATCH:
        raise UserError(f"--batch-size {value:,} is over {MAX_BATCH:,} samples per forward pass; give e.g. 256")


def parse_memory(text: str, what: str = "--memory") -> int:
    """'512MB', '4GB', '1.5GiB', '800K' -> bytes (binary units); a UserError unless it is a positive size."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None or not m:
        raise UserError(f"cannot read {what} {text!r}; give {MEMORY_FORMAT}")
    size = int(value * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))
    if size <= 0:
        raise UserError(f"{what} must be a positive memory budget, got {text!r}; give {MEMORY_FORMAT}")
    return size


@dataclass
class ScoreConfig:
    teacher: str = option(
        help="torchvision:ARCH?num_classes=N&weights=PATH, torchscript:PATH, python:MODULE:FACTORY?weights=PATH, or "
        "a student.pt / run directory; add size=, channels=, mean=, std= for the preprocessing, classes=@FILE "
        "for class names.",
        toml_reason="the job's [teacher] stage",
    )
    sources: list[str] = option(
        help="NAME=KIND:LOCATION[?opt=val&...], repeatable. Kinds: folder, wds, parquet, idx, npy, synthetic, "
        "builtin. Quote specs holding ? and &.",
        cli_name="source",
    )
    pool: str = option(help="Pool directory (created, or resumed when it exists).", toml_reason=WORK)
    batch_size: int | None = option(
        None, "Samples per forward pass; default: chosen from --memory and the teacher's input size (up to 256)."
    )
    memory: str = option("1GB", "Memory budget of the batches in flight; the default --batch-size follows from it.")
    workers: int = option(-1, "Decode worker processes; -1 picks (0 for undecoded arrays on CPU).")
    device: str = option("auto", "auto, cpu or cuda.")
    logits: str = option("full", "full, or topk:K to keep the K largest logits (many classes).")
    embed_layer: str = option("auto", "auto (input of the final linear) or a module name.")
    max_error_rate: float = option(0.01, "Exit 1 when more than this share of samples failed.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Images with more pixels are refused as decompression bombs.")
    max_bytes: int = option(
        DEFAULT_MAX_BYTES, "Files, tar members and Parquet cells larger than this are refused unread (bytes)."
    )
    odin: bool = option(False, "Also compute ODIN (one extra forward+backward per batch).")
    odin_temperature: float = option(1000.0, "ODIN: softmax temperature T.")
    odin_eps: float = option(0.0014, "ODIN: size of the input step.")
    retries: int = option(2, "Tries more for a unit whose reading fails; then it is reported.")
    engine: str = option("local", "local (this process + DataLoader workers) or ray (kdcurate[ray]).")
    ray_address: str | None = option(
        None, "With --engine ray: a running cluster (HOST:6379 or auto); default: a new local Ray instance."
    )
    overwrite: bool = option(
        False, "Discard an existing pool scored differently.", toml_reason="a job clears a changed stage itself"
    )
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        _batch(self.batch_size)
        parse_memory(self.memory)
        _workers(self.workers)
        _positive("retries", self.retries, allow_zero=True)
        _positive("odin_temperature", self.odin_temperature)
        _positive("odin_eps", self.odin_eps, allow_zero=True)
        _positive("max_pixels", self.max_pixels)
        _positive("max_bytes", self.max_bytes)
        if not 0 <= self.max_error_rate <= 1:
            raise UserError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.engine not in ("local", "ray"):
            raise UserError(f"unknown --engine {self.engine!r}; use local or ray")


SYNTH_METHODS = ("inversion", "boundary")


@dataclass
class SynthesizeConfig:
    teacher: str = option(help="The teacher (any teacher spec, as for curate score); it must give gradients.")
    out: str = option(help="Folder the images are written to (PNG, created; resumed when it holds a run).",
                      toml_reason=WORK)  # fmt: skip
    method: str = option(
        "inversion",
        "inversion: images grown from noise until the teacher's BatchNorm statistics match and it predicts a "
        "target class (DeepInversion; every class in turn); boundary: images of --source moved a few gradient "
        "steps toward the class the teacher ranks second.",
    )
    n: int = option(1000, "Images to write.")
    source: list[str] = option(
        [], "boundary: the images to move, NAME=KIND:LOCATION as for curate score (repeat); the first N are used."
    )
    steps: int | None = option(None, "Gradient steps per batch; default 200 (inversion) or 10 (boundary).")
    batch_size: int = option(64, "Images optimised together (inversion: the batch whose statistics must match).")
    lr: float = option(0.1, "inversion: Adam's learning rate on the pixels.")
    bn_weight: float = option(1.0, "inversion: weight of the BatchNorm-statistics loss against the class loss.")
    eps: float = option(0.06, "boundary: the most a pixel may move, as a share of its range (L-infinity).")
    seed: int = option(0, "Seed of the noise, the jitter and the target classes (each batch its own).")
    device: str = option("auto", "auto, cpu or cuda.")
    overwrite: bool = option(False, "Start again in a folder that holds another run's images.")
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        if self.method not in SYNTH_METHODS:
            raise UserError(f"unknown --method {self.method!r}; use {' or '.join(SYNTH_METHODS)}")
        _positive("n", self.n)
        _batch(self.batch_size)
        _positive("steps", self.steps)
        _positive("lr", self.lr)
        _positive("bn_weight", self.bn_weight, allow_zero=True)
        if not 0 < self.eps <= 1:
            raise UserError(f"--eps must be in (0, 1] (a share of the pixel range), got {self.eps}")
        if self.method == "boundary" and not self.source:
            raise UserError("--method boundary moves existing images: give --source NAME=KIND:LOCATION")
        if self.method == "inversion" and self.source:
            raise UserError("--method inversion starts from noise and reads no --source; drop it, or use boundary")

    @property
    def step_count(self) -> int:
        return self.steps or (200 if self.method == "inversion" else 10)


@dataclass
class CompactConfig:
    pool: str = option(help="Pool directory.", positional=True)
    target_rows: int = option(1_000_000, "Rows per compact file (about).")
    row_group_rows: int = option(131_072, "Rows per Parquet row group in the compact files.")
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        _positive("target_rows", self.target_rows)
        _positive("row_group_rows", self.row_group_rows)


@dataclass
class IndexConfig:
    pool: str = option(help="Pool directory.", positional=True, toml_reason=WORK)
    kind: str = option("auto", "auto (flat when it fits, else IVF-PQ), flat, ivf-pq or hnsw.")
    memory: str = option("4GB", "Memory budget for the index, e.g. 512MB, 4GB.")
    per_source: bool = option(
        False, "One sub-index per source, merged; a rerun re-encodes only the sources whose files changed."
    )
    retrain: bool = option(False, "With --per-source: train the quantizer again (all sources re-encoded).")
    sources: list[str] = option(
        [],
        "With --per-source: build only these sources' sub-indexes (repeat, or comma-separated) and skip the merge, "
        "so several machines on shared storage can split the sources; a last run without --sources merges them.",
    )
    queries: int = option(500, "Sampled queries for the recall@10 measurement.")
    seed: int = option(0, "Seed of the training sample and of the recall queries.")
    neighbours: bool = option(
        True,
        "Also search every sample's 20 nearest neighbours and store auto_knn (auto "
        "averaged over them), the default selection's score; one more pass over the index.",
    )
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        self.sources = [s.strip() for item in self.sources for s in item.split(",") if s.strip()]
        if self.kind not in ("auto", "flat", "ivf-pq", "hnsw"):
            raise UserError(f"unknown --kind {self.kind!r}; use auto, flat, ivf-pq or hnsw")
        if self.sources and not self.per_source:
            raise UserError("--sources builds sub-indexes: add --per-source")
        _positive("queries", self.queries, allow_zero=True)
        parse_memory(self.memory)


@dataclass
class SqlConfig:
    pool: str = option(help="Pool directory.", positional=True)
    query: str = option(help="SQL over the views samples, errors (and selection).", positional=True)
    format: str = option("table", "table, csv, json (one object per line) or parquet.")
    out: str | None = option(None, "Write the result to this file instead of stdout.")
    selection: str | None = option(None, "A selection directory, exposed as the view 'selection'.")
    limit: int = option(50, "Rows shown by --format table.")

    def __post_init__(self) -> None:
        if self.format not in ("table", "csv", "json", "parquet"):
            raise UserError(f"--format must be one of table, csv, json, parquet, got {self.format!r}")
        if self.format == "parquet" and not self.out:
            raise UserError("--format parquet needs --out FILE")
        if not self.query.strip():
            raise UserError("the query is empty; e.g. 'SELECT source, count(*) FROM samples GROUP BY source'")
        _positive("limit", self.limit)


@dataclass
class SelectConfig:
    pool: str = option(help="Pool directory.", positional=True, toml_reason=WORK)
    out: str = option(help="Selection directory (selection.parquet + selection.json).", toml_reason=WORK)
    strategy: str = option("related", "related (the default: --n by score among the samples that look related, "
                           "each predicted class capped at its share of them), threshold, top-per-class, weighted, "
                           "balanced, random, near or diverse.")  # fmt: skip
    where: str | None = option(None, "SQL filter over the samples view (one boolean expression), applied first.")
    score: str = option(
        "auto_knn",
        "Column or SQL expression ranking samples (higher = better). auto: the weighted rank of bn_z (3), "
        "span_score and energy; auto_knn (the default): auto averaged over each sample's 20 nearest neighbours "
        "(stored by curate index; auto without an index), the best worst case over teachers and pools.",
    )
    n: int | None = option(None, "How many samples (related, weighted, balanced, random, near, diverse).")
    per_class: int | None = option(None, "top-per-class: K per predicted class.")
    threshold: float | None = option(None, "threshold: keep score >= T.")
    fraction: float | None = option(None, "threshold: keep the top fraction F by score instead.")
    temperature: float = option(1.0, "weighted: p ∝ softmax(score / T).")
    gamma: float | None = option(None, "weighted: p ∝ score ** GAMMA instead of the softmax.")
    replace: bool = option(False, "weighted: draw with replacement (weight = times drawn).")
    references: list[str] = option([], "NAME=SPEC of a few images of the task, repeatable. near: the seeds of the "
                                   "search; any other strategy: they calibrate the score (ref_score, minus the "
                                   "embedding distance to the nearest reference, takes half of auto's weight).",
                                   cli_name="reference")  # fmt: skip
    k: int = option(10, "near: score = cosine similarity to the k-th nearest reference.")
    nprobe: int | None = option(None, "near: IVF lists probed (default: the index's; more = slower, better).")
    clusters: int = option(64, "diverse: k-means clusters (equal quotas).")
    dedup: str | None = option(None, "exact (content hash) or near:COS (embedding cosine >= COS).")
    seed: int = option(0, "Seed of every random choice; same seed, same selection.")

    def __post_init__(self) -> None:
        from curate.strategies import STRATEGIES  # the registry (light: numpy only)

        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown --strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        STRATEGIES[self.strategy].check(self)
        from curate.sqlcheck import expression  # DuckDB's parser: one expression, nothing more

        if self.where is not None:
            expression(self.where, "--where")
        if STRATEGIES[self.strategy].scored:
            expression(self.score, "--score")
        for name in ("n", "per_class", "k", "clusters"):
            _positive(name, getattr(self, name))
        if self.gamma is not None and not self.gamma > 0:
            raise UserError(f"--gamma must be > 0 (p ∝ score ** GAMMA; {self.gamma} would not prefer the higher "
                            "scores); use --strategy random for a uniform draw")  # fmt: skip


@dataclass
class ReportConfig:
    pool: str = option(help="Pool directory.", positional=True, toml_reason=WORK)
    out: str = option(help="Report directory: report.html, PNGs beside it, report.json.", toml_reason=WORK)
    selection: str | None = option(
        None, "A selection directory to describe against the pool.", toml_reason="the job's [select] stage"
    )
    score: str = option("auto", "Score ranking the thumbnails (most and least related); auto: see curate select.")
    thumbs: int = option(12, "Thumbnails per source and direction.")
    task_sources: list[str] = option(
        [],
        "Sources that belong to the teacher's task (default: labelled sources with the teacher's classes).",
        cli_name="task_source",
    )

    def __post_init__(self) -> None:
        _positive("thumbs", self.thumbs, allow_zero=True)


@dataclass
class ExportConfig:
    out: str = option(help="Shard directory: shard-NNNNNN.tar, manifest.json.", toml_reason=WORK)
    pool: str | None = option(None, "Pool directory (with --selection).", positional=True, toml_reason=WORK)
    selection: str | None = option(
        None, "Selection directory from 'curate select'.", toml_reason="the job's [select] stage"
    )
    sources: list[str] = option(
        [], "Export a labelled source instead, no teacher: NAME=KIND:LOCATION (repeatable).", cli_name="source",
        toml_reason="the job's [eval] or [teacher] source",
    )  # fmt: skip
    shard_size: int = option(10_000, "Samples per shard.")
    soft_labels: str = option("full", "full (float16 logits) or topk:K (the K largest, with indices).")
    workers: int = option(-1, "Writer processes; -1 = one per core for large exports.")
    seed: int = option(0, "Seed of the order in which units are spread over shards.")
    image_format: str = option(
        "keep",
        "Image encoding in the shards: keep (the original PNG, JPEG or WebP bytes; other formats as lossless PNG), "
        "or jpg, png or webp for every sample (one image column, as Hugging Face datasets and most loaders expect).",
    )
    image_quality: int = option(95, "Quality (1-100) of jpg and webp images written by --image-format or --image-size.")
    image_size: str = option(
        "original", "original, or view: each image resized and centre-cropped to the teacher's input size."
    )
    overwrite: bool = option(
        False, "Replace shards of a different export in --out.", toml_reason="a job clears a changed stage itself"
    )
    show_progress: bool = option(True, "Show a progress bar.", cli_name="progress", toml_reason=PROGRESS)

    def __post_init__(self) -> None:
        _positive("shard_size", self.shard_size)
        _workers(self.workers)
        if self.image_format not in ("keep", "jpg", "png", "webp"):
            raise UserError(f"--image-format must be keep, jpg, png or webp, got {self.image_format!r}")
        if not 1 <= self.image_quality <= 100:
            raise UserError(f"--image-quality must be in [1, 100], got {self.image_quality}")
        if self.image_size not in ("original", "view"):
            raise UserError(f"--image-size must be original or view, got {self.image_size!r}")

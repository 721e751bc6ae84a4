"""Every benchmark script runs end to end at its smoke size (`--smoke`), so none can rot: each writes its
tables into a Markdown file of the test's own (`--doc`), never into docs/benchmarks.md. The scripts run in
two processes side by side (the machine's cores), one after the other within each, as `python SCRIPT` runs
them (runpy, `__main__`); each test waits for its own."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from curate.sources.builtin import FASHION_DIR
from tests.conftest import CLI_ENV, ROOT

BENCH = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _has_smoke(script: str) -> bool:
    """Whether a script has a --smoke option yet (what its --help would list: its argparse declares it, itself or
    through benchmarks._report.add_options), read from the source rather than paying the script's imports."""
    text = (BENCH / f"{script}.py").read_text()
    return '"--smoke"' in text or "add_options(ap)" in text


# script -> (skip reason or None, {section: [header line, row prefixes...]})
SCRIPTS: dict[str, tuple[str | None, dict[str, list[str]]]] = {
    "score_throughput": (None, {"score_throughput": [
        "| teacher | samples | bare forward /s | curate score /s | ratio | bar |", "| small CNN (cnn, w=32) | 40 |",
        "| teacher | samples | decode s | forward s | curate score s | ratio | bar |",
        "| samples | peak RSS after imports, MiB |", "| 10 |", "| 100 |"]}),
    "query": (None, {"query": [
        "| operation | seconds | peak RSS MiB | detail | bar |", "| group-by per source |", "| top-per-class |",
        "| weighted draw 1M |", "| index (flat build over 4,000) |", "| near (1k refs, filtered) |"]}),
    "export_throughput": (None, {"export": [
        "| source | samples | export samples/s | plain tarfile samples/s |",
        "| PNG folder (original bytes kept) | 200 |", "| npy records (encoded to PNG) | 200 |"]}),
    "distill_throughput": (None, {"distill-cpu": [
        "| student | loader samples/s | offline step samples/s |", "| cnn-tiny |"]}),
    "storage": ("moto or s3fs is not installed" if _missing("moto") or _missing("s3fs") else None, {"storage": [
        "| run | samples/s | peak RSS MiB |", "| score, tars and pool on local disk |",
        "| score, tars and pool on S3 API (loopback) |", "| export, pool, sources and shards on S3 API (loopback) |"]}),
    "scale": (None, {
        "scale": ["Engines: not run in a smoke run",
                  "| rows | Parquet GiB | operation | seconds |", "| 2,000 |", "| 4,000 |"],
        "scale-compact": ["| step | files | before s | after s | speed-up |", "| curate compact | 20 -> "],
        "scale-costs": ["| work | images/s | detail |", "| C | D | --logits | bytes/sample |",
                        "| 1000 | 2048 | topk:10 |"]}),
    "quality": ("Fashion-MNIST is not installed" if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()
                else None, {"quality": ["| row | data | samples | selection precision |", "| A |", "| C |", "| E |",
                                        "| score | AUROC |"]}),
    "report_render": ("no chromium to render with" if not any(shutil.which(b) for b in ("chromium", "chromium-browser",
                                                                                        "google-chrome")) else None,
                      {"report-render": ["| page | screenshot bytes |", "| report.html |"]}),
    "relatedness": (None if _has_smoke("relatedness") else "no --smoke mode yet", {"relatedness": ["| "]}),
    "curves": (None, {"curves": ["| pair | data | 10 steps | 20 steps | s at B |", "| smoke | original |",
                                 "| smoke | default + synthesized |", "| pair | teacher | B | data | at B | at 4B |"]}),
}  # fmt: skip


RUNNER = """
import json, runpy, sys, time, traceback
done = {}
for script, doc in json.loads(sys.argv[1]):
    sys.argv = [script, "--smoke", "--doc", doc]
    t0 = time.process_time()
    try:
        runpy.run_path(script, run_name="__main__")
        done[script] = "ok"
    except SystemExit as e:
        done[script] = "ok" if e.code in (None, 0) else f"exit {e.code}"
    except BaseException:
        done[script] = traceback.format_exc()[-3000:]
    print("SMOKE", json.dumps([script, done[script], round(time.process_time() - t0, 1)]), flush=True)
"""


def run_group(scripts: list[str], tmp: Path) -> dict[str, str]:
    """Run scripts one after the other in one process (the imports of torch, DuckDB, FAISS... paid once),
    each as `python SCRIPT --smoke --doc TMP/SCRIPT.md`; returns script -> 'ok' or what went wrong."""
    env = {**CLI_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two groups share the two cores
    args = [[str(BENCH / f"{s}.py"), str(tmp / f"{s}.md")] for s in scripts]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)  # fmt: skip
    status = {s: f"not run (exit {proc.returncode}): {proc.stderr[-3000:]}" for s in scripts}
    for line in proc.stdout.splitlines():
        if line.startswith("SMOKE "):
            script, result, _ = json.loads(line[6:])
            status[Path(script).stem] = result
    return status


# two groups of about equal cost (measured: quality alone is about what the rest of one group takes)
GROUPS = (
    ["quality", "query", "report_render", "curves"],
    ["storage", "scale", "relatedness", "distill_throughput", "export_throughput", "score_throughput"],
)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, dict[str, Future]]:
    """Start every runnable script's smoke run; the runs go on while the tests wait for their own."""
    tmp = tmp_path_factory.mktemp("bench")
    pool = ThreadPoolExecutor(2)
    futures: dict[str, Future] = {}
    for group in GROUPS:
        runnable = [s for s in group if SCRIPTS[s][0] is None]
        future = pool.submit(run_group, runnable, tmp)
        futures.update({s: future for s in runnable})
    yield tmp, futures
    pool.shutdown(wait=True)


def _doc_digest() -> bytes | None:
    return DOC.read_bytes() if DOC.exists() else None


DOC_BEFORE = _doc_digest()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_runs_at_its_smoke_size_and_writes_its_tables(script, smoke_runs):
    skip, sections = SCRIPTS[script]
    if skip:
        pytest.skip(skip)
    tmp, futures = smoke_runs
    status = futures[script].result()[script]
    assert status == "ok", status
    text = (tmp / f"{script}.md").read_text()
    for name, lines in sections.items():
        start, end = text.find(f"<!-- BEGIN {name} -->"), text.find(f"<!-- END {name} -->")
        assert 0 <= start < end, (name, text[:2000])
        section = text[start:end]
        assert script == "relatedness" or "smoke run" in section, section[:500]
        for line in lines:
            assert line in section, (name, line, section[:3000])


def test_smoke_runs_leave_the_benchmark_page_alone(smoke_runs):
    for future in smoke_runs[1].values():
        future.result()
    assert _doc_digest() == DOC_BEFORE


def test_every_benchmark_script_is_in_the_smoke_list():
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(SCRIPTS) and sorted(sum(GROUPS, [])) == sorted(SCRIPTS)

"""How kdcurate grows: the Ray engine against the local one, and the query stage at 10M and 50M rows.

1. Engines: the same sources and teacher scored by `curate score` (local engine) and by
   `curate score --engine ray` (a local Ray instance in a loopback-only network namespace), each a fresh
   process; rows compared (same uids and keys, largest logit difference) and wall times side by side.
2. Growth: synthetic pools in the real format (benchmarks/query.py's generator) of 10M and 50M rows;
   group-by, top-per-class, the IVF-PQ build and a filtered nearest-neighbour selection, each in its own
   process, with its peak RSS; the ratio between the sizes is the measured growth.
3. `--costs`: per-image costs (JPEG decode, a ResNet-50 forward) and pool bytes per sample.
4. `--compact`: DuckDB over a pool of many small unit parts, before and after `curate compact`.

    python benchmarks/scale.py [--sizes 10000000,50000000] [--engine-rows 60000] [--costs | --compact]
    python benchmarks/scale.py --smoke [--doc PATH]   (growth, compaction and costs at a tiny size; no engines)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402
from benchmarks.query import make_pool, op  # noqa: E402

WORK = ROOT / "work" / "bench" / "scale"
# one budget for every size, so each build gets the same factory (IVF4096,PQ32x8) and the times compare
INDEX_MEMORY = "4GB"
OPS = ["group-by per source", "top-per-class", "index", "near (1k refs, filtered, nprobe 32)"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engines(rows: int, work: Path = WORK, kinds: tuple[str, ...] = ("local", "ray")) -> tuple[list[list], str]:
    import numpy as np
    import pyarrow.dataset as ds

    from curate.sources.builtin import FASHION_DIR
    from kdcore import models

    work.mkdir(parents=True, exist_ok=True)
    spec = models.InputSpec(28, 1, (0.286,), (0.353,))
    model, factory, kwargs = models.build("cnn-small", 10, spec)
    teacher = work / "teacher.pt"
    models.save_checkpoint(teacher, model.eval(), factory, kwargs, [str(i) for i in range(10)], spec)
    half = rows // 2
    first = (
        f"fm=builtin:fashion-mnist?split=train&stop={half}&unit=2000"
        if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
        else f"mnist=builtin:mnist?stop={min(half, 5000)}&unit=1000"
    )
    sources = [first, f"shaders=synthetic:shaders?n={half}&size=28&unit=2000"]
    out: dict[str, dict] = {}
    for engine in kinds:
        pool = work / f"pool-{engine}"
        shutil.rmtree(pool, ignore_errors=True)
        cmd = [sys.executable, "-m", "curate", "score", "--teacher", str(teacher), "--pool", str(pool),
               "--batch-size", "256", "--no-progress", "--engine", engine]  # fmt: skip
        for s in sources:
            cmd += ["--source", s]
        if engine == "ray":  # Ray binds the interface address: keep it on loopback
            cmd = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + " ".join(f"'{c}'" for c in cmd)]
        log(f"engine {engine}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        wall = time.perf_counter() - t0
        from curate.pool import Pool

        files = [str(f) for f in Pool(pool).sample_files()]
        t = ds.dataset(files, format="parquet").to_table(columns=["uid", "key", "logits"])
        t = t.sort_by("uid")
        out[engine] = {"wall": wall, "table": t}
    a, b = out["local"]["table"], out[kinds[-1]]["table"]
    same = a.column("uid").equals(b.column("uid")) and a.column("key").equals(b.column("key"))
    la = np.stack(a.column("logits").to_numpy(zero_copy_only=False))
    lb = np.stack(b.column("logits").to_numpy(zero_copy_only=False))
    diff = float(np.abs(la - lb).max())
    n = a.num_rows
    local_wall = out["local"]["wall"]
    result = []
    for engine in kinds:
        wall = out[engine]["wall"]
        result.append([engine, f"{n:,}", f"{wall:.1f}", f"{n / wall:,.0f}", f"{local_wall / wall:.2f}x"])
    note = (
        f"Sources: {', '.join(s.split('?')[0] for s in sources)}; teacher `cnn-small` (28×28). "
        f"Rows identical: {'yes' if same else 'NO'} ({n:,} rows, same uids and keys); largest logit "
        f"difference {diff:.1e} (float summation order)."
    )
    return result, note


def growth(sizes: list[int], work: Path | None = None) -> list[list]:
    """Each operation in its own process; with `work` (a smoke run) the pools go there, operations run in this
    process and the index is flat."""
    rows = []
    base: dict[str, float] = {}
    for n in sizes:
        pool = (work or ROOT / "work" / "bench") / ("query-pool" if n == 10_000_000 else f"scale-pool-{n}")
        log(f"pool of {n:,} rows")
        make_pool(pool, n, unit=250_000 if work is None else 500)
        disk = sum(p.stat().st_size for p in (pool / "samples").rglob("*.parquet"))
        for name in OPS:
            what = f"index ({'flat' if work else 'IVF-PQ'} build over {n:,})" if name == "index" else name
            if name.startswith("near") and not (pool / "index" / "embeddings.faiss").exists():
                continue
            log(f"{n:,}: {what}")
            if work is not None:
                r = op(what, str(pool), str(work / "sel"), n, INDEX_MEMORY)
            else:
                cmd = [sys.executable, str(ROOT / "benchmarks" / "query.py"), "--op", what, "--pool", str(pool),
                       "--rows", str(n), "--memory", INDEX_MEMORY]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            growth_note = ""
            if n == sizes[0]:
                base[name] = r["seconds"]
            else:
                growth_note = f"{r['seconds'] / base[name]:.1f}x time for {n / sizes[0]:.0f}x rows"
            rows.append([f"{n:,}", f"{disk / 2**30:.1f}", name, f"{r['seconds']:.1f}", f"{r['rss_mib']:,.0f}",
                         r["detail"], growth_note])  # fmt: skip
            log(str(rows[-1]))
    return rows


def unit_costs(n: int = 400, batch: int = 32) -> list[list]:
    """Per-image costs at ImageNet size, the basis of docs/scaling.md's estimates: JPEG decode + resize
    on one core (the photos scikit-learn ships, 640×427, re-encoded at quality 90) and ResNet-50 forward
    at 224 on this machine's cores (channels_last, float32)."""
    import io

    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from kdcore.models import InputSpec
    from kdcore.view import to_pixels

    blobs = []
    for a in load_sample_images().images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    spec = InputSpec(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t0 = time.perf_counter()
    for i in range(n):
        to_pixels(blobs[i % 2], spec, 64_000_000)
    decode = n / (time.perf_counter() - t0)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(3):
            model(x)
    forward = 3 * batch / (time.perf_counter() - t0)
    flops = 2 * 4.09e9  # ResNet-50 at 224: 4.09 GMAC per image
    kib = np.mean([len(b) for b in blobs]) / 1024
    threads = torch.get_num_threads()
    return [
        ["JPEG 640×427 -> 224×224 decode + resize (Pillow), 1 core", f"{decode:,.0f}", f"{kib:.0f} KiB/image"],
        [f"ResNet-50 forward at 224, {threads} threads, float32", f"{forward:,.1f}",
         f"{forward * flops / 1e9:,.0f} GFLOP/s achieved"],
    ]  # fmt: skip


def row_bytes(rows: int = 20_000) -> list[list]:
    """Pool bytes per sample for teacher shapes past this machine's: zstd Parquet in the pool's own schema,
    filled with values distributed like a teacher's (normal logits, ReLU-like embeddings with zeros); float
    mantissas barely compress, so the size follows C, D and the --logits mode."""
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.pool import sample_schema

    rng = np.random.default_rng(0)
    out = []
    for c, d, logits in [(10, 64, "full"), (1000, 512, "full"), (1000, 2048, "full"), (1000, 2048, "topk:10"),
                         (1000, 512, "topk:10")]:  # fmt: skip
        schema = sample_schema(c, d, logits, with_odin=False)
        cols = {}
        for f in schema:
            t = f.type
            if f.name == "uid":
                cols[f.name] = pa.array(np.arange(rows, dtype=np.int64) + 2**40)
            elif f.name in ("sample_id", "key"):
                cols[f.name] = pa.array([f"n{i:09d}" for i in range(rows)])
            elif f.name == "unit":
                cols[f.name] = pa.array([f"imagenet/shard-{i // 10_000:05d}" for i in range(rows)])
            elif f.name == "content_hash":
                cols[f.name] = pa.array([rng.bytes(16).hex() for _ in range(rows)])
            elif pa.types.is_fixed_size_list(t):
                w = t.list_size
                if f.name == "topk_idx":
                    v = rng.integers(0, c, (rows, w)).astype(np.int32)
                elif f.name == "embedding":
                    v = np.maximum(rng.normal(0.2, 0.5, (rows, w)), 0).astype(np.float32)
                else:
                    v = (rng.normal(size=(rows, w)) * 3).astype(np.float32)
                cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), w)
            elif pa.types.is_string(t):  # meta: source metadata, absent for most sources
                cols[f.name] = pa.nulls(rows, t)
            elif pa.types.is_floating(t):
                cols[f.name] = pa.array(rng.normal(size=rows).astype(np.float32))
            else:
                cols[f.name] = pa.array(rng.integers(0, min(c, 500), rows), type=t)
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(pa.table(cols, schema=schema), f"{tmp}/part.parquet", compression="zstd")
            size = Path(f"{tmp}/part.parquet").stat().st_size
        per = size / rows
        out.append([str(c), str(d), logits, f"{per:,.0f}", f"{per * 1e8 / 1e12:,.2f}", f"{per * 1e9 / 1e12:,.1f}"])
    return out


def compaction(rows: int, unit: int, work: Path | None = None) -> list[list]:
    """The same DuckDB queries over a pool of many small unit parts, before and after `curate compact`,
    each in a fresh process (the connection opens the files it lists; in this one with `work`, a smoke run)."""
    pool = (work or ROOT / "work" / "bench") / "compact-pool"
    log(f"pool of {rows:,} rows in units of {unit}")
    make_pool(pool, rows, unit=unit)
    queries = {
        "count(*)": "SELECT count(*) FROM samples",
        "group-by per source": "SELECT source, count(*), avg(energy) FROM samples GROUP BY source",
        "top-10 per class": "SELECT count(*) FROM (SELECT uid FROM samples "
        "QUALIFY row_number() OVER (PARTITION BY pred ORDER BY energy DESC) <= 10)",
    }
    code = (
        "import sys, time, json; t0 = time.perf_counter(); from curate.query import connect; "
        "con = connect(sys.argv[1]); con.execute('SET enable_progress_bar = false'); t1 = time.perf_counter(); "
        "con.execute(sys.argv[2]).fetchall(); print('timing', json.dumps([t1 - t0, time.perf_counter() - t1]))"
    )

    def timed(sql: str) -> float:
        if work is not None:
            from curate.query import connect

            t0 = time.perf_counter()
            connect(str(pool)).execute(sql).fetchall()
            return time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-c", code, str(pool), sql], capture_output=True, text=True,
                             cwd=ROOT, check=True)  # fmt: skip
        line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("timing "))
        return sum(json.loads(line.removeprefix("timing ")))

    from curate.compact import compact
    from curate.config import CompactConfig
    from curate.pool import Pool

    before = {name: timed(q) for name, q in queries.items()}
    files_before = len(Pool(pool).sample_files())
    log(f"{files_before:,} files; compacting")
    res = compact(CompactConfig(str(pool), show_progress=False))
    after = {name: timed(q) for name, q in queries.items()}
    rows_out = [["curate compact", f"{files_before:,} -> {res.files_after:,} files", f"{res.seconds:.1f}", "", ""]]
    for name in queries:
        rows_out.append([name, "", f"{before[name]:.2f}", f"{after[name]:.2f}", f"{before[name] / after[name]:.1f}x"])
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000000,50000000")
    ap.add_argument("--engine-rows", type=int, default=60_000)
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--costs", action="store_true", help="only the per-image cost table (section scale-costs)")
    ap.add_argument("--compact", action="store_true", help="only the many-small-units table (section scale-compact)")
    ap.add_argument("--compact-rows", type=int, default=2_000_000)
    ap.add_argument("--compact-unit", type=int, default=40)
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:  # growth, compaction and costs at a tiny size in a temporary folder
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="kdcurate-bench-")
        work = Path(tmp.name)
        args.compact_rows, args.compact_unit = 800, 40
        write_section("scale-compact", compact_section(args, work), args.doc)
        write_section("scale-costs", costs_section(smoke=True), args.doc)
        note = "Engines: not run in a smoke run (each is a fresh `curate score` process; Ray's start alone is long)."
        write_section("scale", scale_section(args, [], note, growth([2000, 4000], work)), args.doc)
        return
    if args.compact:
        write_section("scale-compact", compact_section(args), args.doc)
        return
    if args.costs:
        write_section("scale-costs", costs_section(), args.doc)
        return
    eng, note = engines(args.engine_rows)
    grow = None if args.skip_growth else growth([int(s) for s in args.sizes.split(",")])
    write_section("scale", scale_section(args, eng, note, grow), args.doc)


def compact_section(args: argparse.Namespace, work: Path | None = None) -> str:
    units = args.compact_rows // args.compact_unit
    measured = compaction(args.compact_rows, args.compact_unit, work)
    return "\n".join([
            f"## Scale: DuckDB over many small units, before and after `curate compact`{' ' + SMOKE if work else ''}",
            "",
            f"`python benchmarks/scale.py --compact` on {machine()}: a pool of {args.compact_rows:,} rows in "
            f"~{units:,} units of {args.compact_unit} rows (benchmarks/query.py's generator), each query in a fresh "
            "process through `curate.query.connect` (seconds include opening the pool).",
            "",
            table(["step", "files", "before s", "after s", "speed-up"], measured),
        ])  # fmt: skip


def costs_section(smoke: bool = False) -> str:
    return "\n".join([
            f"## Scale: per-image costs at ImageNet size{' ' + SMOKE if smoke else ''}",
            "",
            f"`python benchmarks/scale.py --costs` on {machine()}. The basis of the estimates in docs/scaling.md.",
            "",
            table(["work", "images/s", "detail"], unit_costs(8, 2) if smoke else unit_costs()),
            "",
            "Pool bytes per sample for larger teachers: zstd Parquet in the pool's schema (`curate.pool."
            "sample_schema`), 20,000 rows of teacher-like values; float columns barely compress, so size follows "
            "C (classes), D (embedding) and `--logits`.",
            "",
            table(["C", "D", "--logits", "bytes/sample", "TB per 100M", "TB per 1B"],
                  row_bytes(200 if smoke else 20_000)),
        ])  # fmt: skip


def scale_section(args: argparse.Namespace, eng: list[list], note: str, grow: list[list] | None) -> str:
    body = [
        f"## Scale: the Ray engine, and the query stage at 10M and 50M rows{' ' + SMOKE if args.smoke else ''}",
        "",
        f"`python benchmarks/scale.py` on {machine()}.",
        "",
        "Engines: the same sources and teacher through `curate score` (local: this process, DataLoader) and "
        "`curate score --engine ray` (a local Ray instance with the machine's cores: CPU decode tasks, one "
        "teacher actor), each a fresh process, wall time including start-up. " + note,
        "",
        table(["engine", "rows", "wall s", "rows/s", "speed vs local"], eng),
    ]
    if grow is not None:
        body += [
            "",
            "Growth: synthetic pools in the real format (benchmarks/query.py's generator: 4 sources, C=10, D=64, "
            "units of 250k rows), each operation in its own process with its peak RSS. The IVF-PQ build trains on "
            f"a sample and streams the vectors in, under one `--memory` budget ({INDEX_MEMORY}) at every size so the "
            "factory is the same; the recall it reports is measured against exact search.",
            "",
            table(["rows", "Parquet GiB", "operation", "seconds", "peak RSS MiB", "detail", "growth"], grow),
        ]
    return "\n".join(body)


if __name__ == "__main__":
    main()

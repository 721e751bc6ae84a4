"""The cost of the storage layer: `curate score` and `curate export` from and to an S3 API server on this
machine (moto, loopback) against the local disk, the same data in the same run; and the peak memory of
scoring a source of tars larger than the memory budget, read as streams.

    python benchmarks/storage.py [--images 1500] [--side 2048] [--smoke] [--doc PATH]

Data: `--images` JPEG photos of `--side` pixels (crops of scikit-learn's sample photos, ~0.5 MB each), in
3 tars, so one tar is far larger than the budget below; the teacher is the small CNN at 32 px (JPEG draft
decoding keeps decode cheap, so storage is what the comparison measures).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402


def photos(n: int, side: int, distinct: int = 48) -> list[bytes]:
    """n JPEG files: `distinct` different crops, repeated (what is measured is bytes moved and decoded)."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, distinct)):
        base = imgs[i % len(imgs)]
        h, w = base.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = Image.fromarray(base[y : y + s, x : x + s]).resize((side, side), Image.BILINEAR)
        noise = rng.integers(0, 8, (side, side, 3), dtype=np.uint8)  # keeps JPEG sizes realistic
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def timed(cmd: list[str], env: dict, in_process: bool = False) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of one CLI run, measured by /usr/bin/time; `in_process` (a smoke run):
    the same command through the CLI's app in this process (RSS: this process's peak so far)."""
    t0 = time.perf_counter()
    if in_process:
        import resource

        import typer

        from curate.cli import app

        typer.main.get_command(app).main(args=cmd[1:], standalone_mode=False)
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, ""
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", *cmd], capture_output=True, text=True,
                          env=env, cwd=ROOT)  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--side", type=int, default=2048)
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:
        args.images, args.side = 12, 64
    import s3fs
    import webdataset as wds

    from kdcore import models

    work = Path(tempfile.mkdtemp(prefix="kdcurate-storage-"))
    data = photos(args.images, args.side)
    tars = work / "tars"
    tars.mkdir()
    per = -(-len(data) // 3)
    for t in range(3):
        with wds.TarWriter(str(tars / f"{t:05d}.tar")) as w:
            for i, d in enumerate(data[t * per : (t + 1) * per]):
                w.write({"__key__": f"{i:06d}", "jpg": d})
    tar_mib = [p.stat().st_size / 2**20 for p in sorted(tars.glob("*.tar"))]
    print(f"{len(data)} photos, tars of {', '.join(f'{m:.0f}' for m in tar_mib)} MiB", flush=True)

    spec = models.InputSpec(32, 3, (0.5,), (0.25,))
    model, factory, kwargs = models.build("cnn", 10, spec)
    models.save_checkpoint(work / "teacher.pt", model, factory, kwargs, [str(i) for i in range(10)], spec)

    with socket.socket() as sock:  # a free port on loopback for the S3 API server
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS")})
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(tars) + "/", "bench/tars/", recursive=True)
        rows = []
        base_cmd = ["curate", "score", "--teacher", str(work / "teacher.pt"), "--batch-size", "128", "--no-progress"]
        idle = timed(["curate", "score", "--teacher", str(work / "teacher.pt"), "--pool", str(work / "idle"),
                      "--source", "n=synthetic:noise?n=10&size=32", "--no-progress"], env, args.smoke)  # fmt: skip
        results = {}
        for where, src, pool in [("local disk", f"t=wds:{tars}/{{00000..00002}}.tar", str(work / "pool-local")),
                                 ("S3 API (loopback)", "t=wds:s3://bench/tars/{00000..00002}.tar",
                                  "s3://bench/pool")]:  # fmt: skip
            sec, rss, _ = timed([*base_cmd, "--pool", pool, "--source", src], env, args.smoke)
            results[where] = (sec, rss)
            rows.append([f"score, tars and pool on {where}", f"{len(data) / sec:,.0f}", f"{rss:,.0f}"])
            print(rows[-1], flush=True)
        sel_args = ["--strategy", "threshold", "--threshold", "-1e9"]
        timed(["curate", "select", str(work / "pool-local"), *sel_args, "--out", str(work / "sel")], env, args.smoke)
        timed(["curate", "select", "s3://bench/pool", *sel_args, "--out", "s3://bench/sel"], env, args.smoke)
        for where, pool, sel, out in [
            ("local disk", str(work / "pool-local"), str(work / "sel"), str(work / "out")),
            ("S3 API (loopback)", "s3://bench/pool", "s3://bench/sel", "s3://bench/out"),
        ]:
            sec, rss, _ = timed(["curate", "export", pool, "--selection", sel, "--out", out, "--shard-size", "500",
                                 "--workers", "1", "--no-progress"], env, args.smoke)  # fmt: skip
            results[f"export {where}"] = (sec, rss)
            rows.append([f"export, pool, sources and shards on {where}", f"{len(data) / sec:,.0f}", f"{rss:,.0f}"])
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    score_ratio = results["S3 API (loopback)"][0] / results["local disk"][0]
    export_ratio = results["export S3 API (loopback)"][0] / results["export local disk"][0]
    extra = max(results["S3 API (loopback)"][1], results["local disk"][1]) - idle[1]
    body = (
        f"## Storage: S3 API against the local disk{' ' + SMOKE if args.smoke else ''}\n\n"
        f"Machine: {machine()}.\n\n"
        f"`python benchmarks/storage.py --images {args.images} --side {args.side}`: {len(data):,} JPEG photos of "
        f"{args.side} px in 3 tars of {', '.join(f'{m:.0f}' for m in tar_mib)} MiB, scored by a small CNN at 32 px "
        "(JPEG draft decoding), the same data from the local disk and from an S3 API server on this machine (moto on "
        "loopback: the cost of the storage layer, not of a network). Samples/s over the whole command, peak RSS "
        "of the command's process.\n\n"
        + table(["run", "samples/s", "peak RSS MiB"], rows)
        + f"\n\n- S3 / local time: score {score_ratio:.2f}x, export {export_ratio:.2f}x.\n"
        f"- Peak RSS while scoring tars of up to {max(tar_mib):.0f} MiB: {extra:,.0f} MiB above a run that scores 10 "
        f"images ({idle[1]:,.0f} MiB): tars are streamed, never held whole in memory or copied to local disk.\n"
    )
    write_section("storage", body, args.doc)


if __name__ == "__main__":
    main()

"""Export throughput against plain `tarfile` writing the same members, side by side in one run.

Two pools of 28×28 images, scored by a small CNN teacher:
  (a) a folder of PNG files: export keeps the original bytes;
  (b) an array source (Fashion-MNIST IDX, or digits when it is missing): export encodes each record as PNG.
Baseline: one process reading the same image bytes (file reads / PNG encodes), building the same members
(logits.npy, json, cls) and writing them with tarfile. Bars: export >= 0.8 x baseline; >= 5,000 samples/s.

    python benchmarks/export_throughput.py [--n 50000] [--smoke] [--doc PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402
from curate.config import ExportConfig, ScoreConfig, SelectConfig  # noqa: E402
from curate.export import export  # noqa: E402
from curate.query import connect  # noqa: E402
from curate.score import score  # noqa: E402
from curate.select import select  # noqa: E402
from curate.sources import read_idx  # noqa: E402
from curate.sources.builtin import FASHION_DIR  # noqa: E402
from kdcore import models  # noqa: E402
from kdcore.models import zoo  # noqa: E402
from kdcore.view import InputSpec  # noqa: E402


def images(n: int, fashion: bool = True) -> tuple[np.ndarray, str]:
    path = Path(FASHION_DIR) / "train-images-idx3-ubyte.gz"
    if fashion and path.exists():
        return read_idx(str(path))[:n], f"idx:{path}?labels={Path(FASHION_DIR) / 'train-labels-idx1-ubyte.gz'}"
    from curate.sources.builtin import digits

    x = digits()[0]
    x = np.repeat(x, -(-n // len(x)), 0)[:n]
    return np.stack([np.asarray(Image.fromarray(a).resize((28, 28))) for a in x]), ""


def baseline(pool: str, sel: str, out: Path, reader) -> float:
    """Plain tarfile: the same members, one process."""
    rows = (
        connect(pool, sel)
        .execute(
            "SELECT s.uid, s.sample_id, s.source, s.key, s.pred, s.label, s.logits, s.confidence, s.energy "
            "FROM samples s JOIN selection USING (uid)"
        )
        .fetchall()
    )
    t0 = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for uid, sid, source, key, pred, label, logits, conf, energy in rows:
            k = f"{uid & 0xFFFFFFFFFFFFFFFF:016x}"
            buf = io.BytesIO()
            np.save(buf, np.asarray(logits, np.float16))
            members = {
                "png": reader(key),
                "logits.npy": buf.getvalue(),
                "json": json.dumps(
                    {
                        "uid": uid,
                        "sample_id": sid,
                        "source": source,
                        "pred": pred,
                        "scores": {"confidence": conf, "energy": energy},
                    }
                ).encode(),  # fmt: skip
            }
            if label is not None:
                members["cls"] = str(label).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:  # 200 digits, upscaled, as the array case too
        args.n = 200
    x, idx_spec = images(args.n, fashion=not args.smoke)
    if idx_spec:  # the IDX case exports all 60,000 records; the folder holds the same images
        x = read_idx(idx_spec.split(":", 1)[1].split("?")[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = InputSpec(28, 1, (0.286,), (0.353,))
        import torch

        torch.manual_seed(0)
        model, factory, kwargs = zoo.build("cnn-small", 10, spec)
        models.save_checkpoint(tmp / "t.pt", model, factory, kwargs, [str(i) for i in range(10)], spec)
        folder = tmp / "png"
        folder.mkdir()
        for i, a in enumerate(x):
            Image.fromarray(a).save(folder / f"{i:06d}.png")
        cases = {"PNG folder (original bytes kept)": f"png=folder:{folder}"}
        if idx_spec:
            cases["IDX records (encoded to PNG)"] = f"fm={idx_spec}"
        else:
            np.save(tmp / "x.npy", x)
            cases["npy records (encoded to PNG)"] = f"arr=npy:{tmp / 'x.npy'}"
        for label, src in cases.items():
            pool = tmp / f"pool-{len(rows)}"
            score(ScoreConfig(teacher=str(tmp / "t.pt"), sources=[src], pool=str(pool), show_progress=False))
            sel = tmp / f"sel-{len(rows)}"
            select(SelectConfig(pool=str(pool), out=str(sel), strategy="threshold", threshold=-1e9))
            if "folder" in label:

                def reader(key: str) -> bytes:
                    return (folder / key).read_bytes()
            else:

                def reader(key: str) -> bytes:
                    buf = io.BytesIO()
                    Image.fromarray(x[int(key)]).save(buf, format="PNG", compress_level=1)
                    return buf.getvalue()

            base = baseline(str(pool), str(sel), tmp / "plain.tar", reader)
            res = export(ExportConfig(out=str(tmp / f"shards-{len(rows)}"), pool=str(pool), selection=str(sel),
                                      shard_size=5000, show_progress=False))  # fmt: skip
            rate = res.samples / res.seconds
            rows.append([label, f"{res.samples:,}", f"{rate:,.0f}", f"{base:,.0f}", f"{rate / base:.2f}",
                         "pass" if rate >= 5000 else "FAIL", f"{res.bytes / res.samples:,.0f}"])  # fmt: skip
            print(rows[-1], flush=True)
    body = (
        f"## Export throughput{' ' + SMOKE if args.smoke else ''}\n\nMachine: {machine()}.\n\n"
        "`python benchmarks/export_throughput.py` "
        "(all 60,000 Fashion-MNIST train images when installed): "
        "`curate export` end to end (selection join in DuckDB, shard plan, re-reading each unit, "
        f"{os.cpu_count()} writer processes, sha256 of every shard) against one process writing the same members "
        "with `tarfile` from bytes already at hand. Bars: ratio >= 0.8, >= 5,000 samples/s.\n\n"
        + table(
            [
                "source",
                "samples",
                "export samples/s",
                "plain tarfile samples/s",
                "ratio",
                ">= 5,000/s",
                "shard bytes/sample",
            ],
            rows,
        )  # fmt: skip
    )
    write_section("export", body, args.doc)


if __name__ == "__main__":
    main()

"""Distillation throughput, side by side in one run.

(a) the loader must not starve the step: loader samples/s (decode in workers, nothing else) against the
    student's step rate on batches already in memory, and the real training rate (`distill train`);
(b) offline soft labels (read from the shards) against an online teacher run on the same batches
    (bar >= 1.5x).
Shards: 28×28 PNGs with teacher logits, exported from a pool scored by a CNN teacher (width 32).

    python benchmarks/distill_throughput.py [--n 20000] [--device auto] [--smoke] [--doc PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402
from curate.export import ExportConfig, export  # noqa: E402
from curate.score import ScoreConfig, score  # noqa: E402
from curate.select import SelectConfig, select  # noqa: E402
from distill.data import loader, open_shards  # noqa: E402
from distill.losses import LossConfig, combine  # noqa: E402
from distill.train import TrainConfig, train  # noqa: E402
from kdcore import models  # noqa: E402

BATCH = 256


def make_shards(tmp: Path, n: int) -> tuple[Path, Path]:
    spec = models.InputSpec(28, 1, (0.286,), (0.353,))
    torch.manual_seed(0)
    teacher, factory, kwargs = models.build("cnn", 10, spec)
    models.save_checkpoint(tmp / "teacher.pt", teacher, factory, kwargs, [str(i) for i in range(10)], spec)
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    score(ScoreConfig(teacher=str(tmp / "teacher.pt"), sources=[f"x=npy:{tmp / 'x.npy'}"], pool=str(tmp / "pool"),
                      show_progress=False))  # fmt: skip
    select(SelectConfig(pool=str(tmp / "pool"), out=str(tmp / "sel"), strategy="threshold", threshold=-1e9))
    export(ExportConfig(out=str(tmp / "shards"), pool=str(tmp / "pool"), selection=str(tmp / "sel"), shard_size=2000,
                        show_progress=False))  # fmt: skip
    return tmp / "shards", tmp / "teacher.pt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:  # 256 samples, 4 steps of 32, loading in this process
        args.n, args.steps, args.workers = 256, 4, 0
    log_every = 1 if args.smoke else 25
    batch = 32 if args.smoke else BATCH
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shard_dir, teacher_path = make_shards(tmp, args.n)
        shards = open_shards(str(shard_dir))
        spec = shards.input

        # (a1) loader alone
        it = loader(shards, batch, train=True, workers=args.workers, shuffle_buffer=2000)
        next(it)
        t0, seen = time.perf_counter(), 0
        for _ in range(args.steps):
            seen += len(next(it)["image"])
        loader_rate = seen / (time.perf_counter() - t0)
        del it
        batches = [b for _, b in zip(range(8), loader(shards, batch, train=True, workers=0), strict=False)]

        mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        teacher = models.load(str(teacher_path)).model.to(device).to(memory_format=torch.channels_last).eval()
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

        def step_rate(student_name: str, online: bool) -> float:
            torch.manual_seed(0)
            student = models.build(student_name, 10, spec)[0].to(device).to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
            cfg = LossConfig("kd")

            def one(b):
                x = b["image"].to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
                x = x.contiguous(memory_format=torch.channels_last)
                if online:
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                        t = teacher(x).float()
                    t = t.clone()
                else:
                    t = b["logits"].to(device, non_blocking=True)
                with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
                    out = student(x)
                loss = combine(cfg, out.float(), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for b in batches[:3]:
                one(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                one(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return args.steps * batch / (time.perf_counter() - t0)

        for student in ("cnn-tiny",) if args.smoke else ("cnn-tiny", "cnn-small"):
            offline = step_rate(student, online=False)
            online = step_rate(student, online=True)
            run = train(TrainConfig(shards=str(shard_dir), out=str(tmp / f"run-{student}"), student=student,
                                    steps=args.steps, batch_size=batch, workers=args.workers, device=str(device),
                                    show_progress=False, checkpoint_every=10**9, log_every=log_every))  # fmt: skip
            windows = [json.loads(line) for line in (Path(run.out) / "metrics.jsonl").read_text().splitlines()]
            real = float(np.median([w["samples_per_s"] for w in windows[1:]]))  # steady state: after the first window
            bound = 1 / (1 / loader_rate + 1 / offline)  # both on the same cores, one after the other
            rows.append([student, f"{loader_rate:,.0f}", f"{offline:,.0f}", f"{loader_rate / offline:.2f}",
                         f"{real:,.0f}", f"{real / bound:.2f}", f"{online:,.0f}", f"{offline / online:.2f}",
                         "pass" if offline / online >= 1.5 else "FAIL"])  # fmt: skip
            print(rows[-1], flush=True)
    body = (
        f"## Distill throughput ({device.type}){' ' + SMOKE if args.smoke else ''}\n\nMachine: {machine()}.\n\n"
        f"`python benchmarks/distill_throughput.py --device {device.type}`: batch {batch}, teacher `cnn` "
        f"(width 32), 28×28 PNG shards with float16 logits, {args.workers} loader workers. Loader = decode + "
        "collate alone; step = forward + KD loss + backward + AdamW on batches already in memory; `distill train` "
        "= the real loop, steady state (median of 25-step windows after the first), loader workers and the step "
        "sharing the same cores; on a CPU the bound for that is 1/(1/loader + 1/step), and the column after it is "
        "the share of that bound reached. Online = the same step plus the teacher's forward on "
        "the batch (inference mode). Bars: loader/step >= 1 (no starvation), offline/online >= 1.5.\n\n"
        + table(
            [
                "student",
                "loader samples/s",
                "offline step samples/s",
                "loader / step",
                "distill train samples/s",
                "of the shared-core bound",
                "online-teacher step samples/s",
                "offline / online",
                "bar",
            ],
            rows,
        )  # fmt: skip
    )
    write_section(f"distill-{device.type}", body, args.doc)


if __name__ == "__main__":
    main()

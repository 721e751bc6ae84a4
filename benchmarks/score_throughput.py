"""Score-stage throughput against its floors, measured side by side in one run.

(a) a source that needs no decoding (npy): end-to-end `curate score` throughput / bare teacher forward
    on the same batches (bar >= 0.8);
(b) a folder of PNGs: end-to-end time / (bare decode + bare forward) of the same samples (bar <= 1.25;
    on 2 CPU cores decode and forward share the cores, so the sum is the floor);
(c) a real teacher, EfficientNet-Lite0 with its ImageNet weights at 224 px, over a folder of JPEG photo crops:
    the scoring forward (hooks for bn_score, span/proj/feat_norm and the embedding) against the bare forward
    (bar >= 0.9), and `curate score` against bare decode + bare forward (needs the `imagenet` extra);
plus where the time goes (cProfile), the pool's bytes per sample, and peak memory at 1× and 10× the
sample count (units stream, so it must stay flat). Writes its tables into docs/benchmarks.md.

    python benchmarks/score_throughput.py [--quick | --smoke] [--doc PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402
from curate.config import ScoreConfig  # noqa: E402
from curate.score import score  # noqa: E402
from curate.sources.synthetic import dead_leaves, glyphs  # noqa: E402
from kdcore import models  # noqa: E402
from kdcore.models import zoo  # noqa: E402
from kdcore.view import InputSpec, to_pixels  # noqa: E402

BATCH = 256


def make_teacher(path: Path, name: str, size: int, channels: int) -> InputSpec:
    spec = InputSpec(size, channels, (0.5,) * channels, (0.5,) * channels)
    model, factory, kwargs = zoo.build(name, 10, spec)
    models.save_checkpoint(path, model, factory, kwargs, [str(i) for i in range(10)], spec)
    return spec


def make_images(n: int, size: int, channels: int) -> np.ndarray:
    make = glyphs if channels == 1 else dead_leaves
    return np.stack([make(np.random.default_rng([7, i]), size) for i in range(n)])


def bare_forward(teacher: Path | str, pixels: np.ndarray, spec: InputSpec, batch: int = BATCH) -> float:
    """Seconds for the teacher's forward alone over pre-normalised batches (channels_last, inference_mode)."""
    model = models.load(str(teacher)).model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(pixels if pixels.ndim == 4 else pixels[:, None])
    if x.shape[-1] == spec.channels and x.shape[1] != spec.channels:
        x = x.permute(0, 3, 1, 2)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    batches = [
        ((x[i : i + BATCH].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        for i in range(0, len(x), batch)
    ]
    with torch.inference_mode():
        model(batches[0])
        t = time.perf_counter()
        for b in batches:
            model(b)
        return time.perf_counter() - t


def run_score(teacher: Path | str, source: str, pool: Path, workers: int = -1, batch: int = BATCH) -> float:
    t = time.perf_counter()
    score(ScoreConfig(teacher=str(teacher), sources=[source], pool=str(pool), batch_size=batch, workers=workers,
                      show_progress=False))  # fmt: skip
    return time.perf_counter() - t


def profile_shares(teacher: Path, source: str, pool: Path) -> dict[str, float]:
    """Share of time per part, from cProfile of an in-process run (workers=0: decoding in-process too)."""
    prof = cProfile.Profile()
    prof.enable()
    run_score(teacher, source, pool, workers=0)
    prof.disable()
    stats = pstats.Stats(prof).stats
    cum: dict[str, float] = {}
    for (file, _, func), (_, _, _, ct, _) in stats.items():
        cum[f"{Path(file).name}:{func}"] = cum.get(f"{Path(file).name}:{func}", 0.0) + ct
    total = cum.get("score.py:score", 1e-9)
    decode = cum.get("view.py:to_pixels", 0.0)
    read = cum.get("files.py:read", 0.0)
    hooks = cum.get("teacher.py:_bn_hook", 0.0) + cum.get("teacher.py:_capture_feat", 0.0)
    fwd = cum.get("teacher.py:__call__", 0.0) - hooks
    logit = cum.get("teacher.py:logit_scores", 0.0)
    write = cum.get("scoring.py:write_unit", 0.0)
    parts = {"read files": max(0.0, read), "decode": decode, "forward": fwd, "hook scores (BN, features)": hooks,
             "logit scores": logit, "Arrow + Parquet write": write}  # fmt: skip
    parts["other (loader, copies, setup)"] = max(0.0, total - sum(parts.values()))
    return {k: v / total for k, v in parts.items()}


IMAGENET = ("python:pipelines.teachers:efficientnet_lite0?size=224&channels=3&mean=0.485,0.456,0.406"
            "&std=0.229,0.224,0.225&classes=imagenet")  # fmt: skip


def hooked_forward(teacher: str, pixels: np.ndarray, spec: InputSpec, batch: int) -> tuple[float, float]:
    """(bare forward s, scoring forward s): the same batches through the bare model and through ScoringModel
    (forward hooks for bn_score, bn_layers, the feature scores and the embedding), interleaved, best of 3."""
    from curate.teacher import ScoringModel, logit_scores

    model = models.load(teacher).model.to(memory_format=torch.channels_last)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    x = torch.from_numpy(pixels)
    batches = [((x[i : i + batch].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(x), batch)]  # fmt: skip
    bare, hooked = [], []
    with torch.inference_mode():
        model(batches[0])
        for _ in range(3):
            t = time.perf_counter()
            for b in batches:
                model(b)
            bare.append(time.perf_counter() - t)
            scorer = ScoringModel(model)
            t = time.perf_counter()
            for b in batches:
                logit_scores(scorer(b).logits)
            hooked.append(time.perf_counter() - t)
            scorer.close()
    return min(bare), min(hooked)


def real_teacher(tmp: Path, n: int) -> list[list]:
    """EfficientNet-Lite0 (ImageNet weights) at 224 px over n JPEG crops of the sample photos."""
    from PIL import Image

    from curate.sources.builtin import photo_crop

    try:
        spec = models.load(IMAGENET).input
    except Exception as e:  # noqa: BLE001 - the optional extra is missing
        print(f"real teacher skipped: {e}", flush=True)
        return []
    folder = tmp / "photos-jpeg"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(photo_crop(np.random.default_rng([3, i]), 320, "all")).save(folder / f"{i:05d}.jpg", quality=90)
    files = sorted(folder.iterdir())
    t = time.perf_counter()
    decoded = np.stack([to_pixels(f.read_bytes(), spec)[0] for f in files])
    dec = time.perf_counter() - t
    bare, hooked = hooked_forward(IMAGENET, decoded, spec, 32)
    e2e = run_score(IMAGENET, f"x=folder:{folder}", tmp / "pool-real", batch=32)
    return [["EfficientNet-Lite0, 224 px, JPEG", n, f"{n / bare:.1f}", f"{n / hooked:.1f}", f"{bare / hooked:.2f}",
             f"{dec:.1f}", f"{bare:.1f}", f"{e2e:.1f}", f"{e2e / (dec + bare):.2f}"]]  # fmt: skip


PEAK_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from curate.config import ScoreConfig
from curate.score import score
def hwm():  # this process's peak RSS in KiB (VmHWM starts afresh at exec; ru_maxrss keeps the parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
score(ScoreConfig(teacher={teacher!r}, sources=[{source!r}], pool={pool!r}, batch_size=256, show_progress=False,
                  workers=0))
print(base, hwm())
"""


def peak_rss_mib(teacher: Path, source: str, pool: Path, fresh: bool = True) -> tuple[float, float]:
    """(peak RSS after imports, peak RSS after scoring) of a fresh process, MiB (in this one unless `fresh`)."""
    code = PEAK_SCRIPT.format(root=str(ROOT), teacher=str(teacher), source=source, pool=str(pool))
    if not fresh:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(code, {"__name__": "peak"})  # noqa: S102 - our own script, as the fresh process would run it
        out = buf.getvalue()
    else:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    base, peak = out.split()[-2:]
    return int(base) / 1024, int(peak) / 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run; numbers are noisier)")
    add_options(ap)
    args = ap.parse_args()
    scale = 0.002 if args.smoke else (0.2 if args.quick else 1.0)
    cases = [("small CNN (cnn, w=32)", "cnn", 28, 1, int(20000 * scale)),
             ("resnet18 (CIFAR stem)", "resnet18", 32, 3, int(1536 * scale))][: 1 if args.smoke else 2]  # fmt: skip
    rows_a, rows_b, profiles, sizes = [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, name, size, ch, n in cases:
            teacher = tmp / f"{name}.pt"
            spec = make_teacher(teacher, name, size, ch)
            imgs = make_images(n, size, ch)
            np.save(tmp / f"{name}.npy", imgs)
            folder = tmp / f"{name}-png"
            folder.mkdir()
            from PIL import Image

            for i, im in enumerate(imgs):
                Image.fromarray(im).save(folder / f"{i:06d}.png")

            # (a) no decoding
            fwd = bare_forward(teacher, imgs, spec)
            e2e = run_score(teacher, f"x=npy:{tmp / f'{name}.npy'}", tmp / f"pool-npy-{name}")
            rows_a.append([label, n, f"{n / fwd:,.0f}", f"{n / e2e:,.0f}", f"{fwd / e2e:.2f}", "≥ 0.8"])
            sizes.append([label, f"{dir_bytes(tmp / f'pool-npy-{name}' / 'samples') / n:,.0f}"])

            # (b) encoded PNGs
            files = sorted(folder.iterdir())
            t = time.perf_counter()
            decoded = np.stack([to_pixels(f.read_bytes(), spec)[0] for f in files])
            dec = time.perf_counter() - t
            fwd = bare_forward(teacher, decoded, spec)
            e2e = run_score(teacher, f"x=folder:{folder}", tmp / f"pool-png-{name}")
            rows_b.append([label, n, f"{dec:.2f}", f"{fwd:.2f}", f"{e2e:.2f}", f"{e2e / (dec + fwd):.2f}", "≤ 1.25"])
            profiles[label] = profile_shares(teacher, f"x=folder:{folder}", tmp / f"pool-prof-{name}")
            print(label, rows_a[-1], rows_b[-1], flush=True)

        rows_c = [] if args.smoke else real_teacher(tmp, int(320 * scale))
        print(rows_c, flush=True)

        # memory at 1× and 10× the sample count
        teacher = tmp / "cnn.pt"
        n1 = int(5000 * scale)
        mem = [peak_rss_mib(teacher, f"s=synthetic:glyphs?n={n}&size=28", tmp / f"pool-mem-{n}", not args.smoke)
               for n in (n1, 10 * n1)]  # fmt: skip

    parts = list(next(iter(profiles.values())))
    body = "\n\n".join(
        [
            f"## Score throughput (`benchmarks/score_throughput.py`){' ' + SMOKE if args.smoke else ''}",
            f"Machine: {machine()}. Batch size {BATCH}; teachers untrained (throughput does not depend on the "
            "weights); decode workers picked by `--workers -1` (0 for npy on CPU, 1 for PNGs on 2 cores).",
            "(a) Source that needs no decoding (npy, uint8): end-to-end `curate score` vs bare teacher forward on the "
            "same batches.",
            table(["teacher", "samples", "bare forward /s", "curate score /s", "ratio", "bar"], rows_a),
            "(b) Folder of PNGs: end-to-end time vs bare Pillow decode + bare forward of the same samples (seconds).",
            table(["teacher", "samples", "decode s", "forward s", "curate score s", "ratio", "bar"], rows_b),
            "(c) A real teacher: EfficientNet-Lite0 with its ImageNet weights (`pipelines/teachers.py`) at 224 px over "
            "JPEG crops (320 px) of the sample photos, batch 32. Scoring forward = the same batches through the "
            "forward hooks that give bn_score, bn_layers, feat_norm, proj_score, span_score and the embedding, plus "
            "the logit scores (bar ≥ 0.9× the bare forward); then `curate score` end to end against bare decode + "
            "bare forward of the same files (seconds).",
            table(
                [
                    "teacher",
                    "samples",
                    "bare forward /s",
                    "scoring forward /s",
                    "ratio (bar ≥ 0.9)",
                    "decode s",
                    "forward s",
                    "curate score s",
                    "ratio",
                ],
                rows_c,
            )
            if rows_c
            else f"(skipped: {'a smoke run' if args.smoke else 'no `imagenet` extra'})",
            "Where the time goes (cProfile of an in-process run over the PNG folder, decoding in-process):",
            table(["part", *profiles], [[p, *[f"{profiles[k][p]:.0%}" for k in profiles]] for p in parts]),
            table(["teacher", "pool bytes / sample (zstd Parquet, full logits + embedding)"], sizes),
            "Peak RSS of a fresh `curate score` process (small CNN, glyphs); the import of torch, FAISS and "
            "DuckDB sets the floor:",
            table(
                ["samples", "peak RSS after imports, MiB", "peak RSS after scoring, MiB", "added by scoring"],
                [
                    [f"{n:,}", f"{b:.0f}", f"{p:.0f}", f"{p - b:.0f}"]
                    for n, (b, p) in zip((n1, 10 * n1), mem, strict=True)
                ],
            ),
            f"Growth from {n1:,} to {10 * n1:,} samples: {mem[1][1] / mem[0][1]:.2f}× — units stream, "
            "memory stays flat in the pool size.",
        ]
    )
    write_section("score_throughput", body, args.doc)
    print(body)
    print(json.dumps({"peak_mib": mem}))


if __name__ == "__main__":
    main()

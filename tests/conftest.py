"""Shared fixtures: a tiny teacher trained here, in seconds, on scikit-learn's digits."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curate.config import ScoreConfig
from curate.score import score
from curate.sources.builtin import digits as load_digits
from distill.train import FitConfig, fit_arrays, to_input
from kdcore import models
from tests.cli_server import Server

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPEC = models.InputSpec(8, 1, (0.25,), (0.35,))


def train_digits_teacher(
    path: Path, name: str = "cnn-tiny", steps: int = 200, seed: int = 0, outlier_exposure: bool = True
) -> Path:
    """Train on digits[:1500]. With outlier exposure (Hendrycks et al. 2019) every step also pushes the
    softmax on a batch of uniform noise towards uniform, so the teacher is unsure on noise; without it
    a ReLU network is typically *confidently* wrong there (Hein et al. 2019)."""
    x, y = load_digits()
    torch.manual_seed(seed)
    model, factory, kwargs = models.build(name, 10, DIGITS_SPEC)
    xt, yt = to_input(x[:1500], DIGITS_SPEC), torch.from_numpy(y[:1500])
    if not outlier_exposure:
        fit_arrays(model, xt, yt, FitConfig(steps=steps, seed=seed))
    else:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (128,), generator=gen)
            noise = to_input(torch.randint(0, 256, (64, 8, 8), generator=gen, dtype=torch.uint8).numpy(), DIGITS_SPEC)
            out = model(torch.cat([xt[idx], noise]))
            loss = F.cross_entropy(out[:128], yt[idx]) - 0.5 * F.log_softmax(out[128:], 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        # the noise batches moved the BatchNorm running statistics: recompute them on the digits alone
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        with torch.no_grad():
            for i in range(0, len(xt), 250):
                model(xt[i : i + 250])
        for m in bns:
            m.momentum = 0.1
        model.eval()
    models.save_checkpoint(path, model, factory, kwargs, [str(i) for i in range(10)], DIGITS_SPEC)
    return path


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BatchNorm CNN trained on digits[:1500] (8×8 grayscale), saved as a distill checkpoint."""
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def mlp_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher without BatchNorm."""
    return train_digits_teacher(tmp_path_factory.mktemp("mlp") / "mlp.pt", name="mlp", steps=60, outlier_exposure=False)


@pytest.fixture(scope="session")
def plain_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BatchNorm CNN trained on digits alone (no outlier exposure)."""
    return train_digits_teacher(tmp_path_factory.mktemp("plain") / "plain.pt", outlier_exposure=False)


CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


_SERVER = Server(ROOT)
atexit.register(_SERVER.close)


def run_cli(*args: str, timeout: int = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run a console entry (e.g. 'curate', 'score', ...) as `python -m` would, in its own process: forked from a
    server that has the project imported already (tests/cli_server.py), so each call skips the start-up. The
    tests that start a command to kill it use `start_cli`, a fresh interpreter."""
    proc = _SERVER.run(args, CLI_ENV, ROOT, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_cli(*args: str) -> subprocess.Popen:
    """Start a console entry as `run_cli` does, without waiting (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", *args], env=CLI_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n1 n2)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


@pytest.fixture(scope="session")
def pool(teacher, tmp_path_factory):
    """digits[1500:] (held out from the teacher) against noise, dead leaves and glyphs."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    cfg = ScoreConfig(
        teacher=str(teacher),
        sources=[
            "digits=builtin:digits?start=1500&unit=100",
            "noise=synthetic:noise?n=300&size=8&unit=128",
            "leaves=synthetic:dead-leaves?n=200",
            "glyphs=synthetic:glyphs?n=200",
        ],
        pool=str(root),
        batch_size=64,
        show_progress=False,
    )
    result = score(cfg)
    assert result.rows == 297 + 300 + 200 + 200
    return root


# ------------------------------------------------------------------------------ encoded files users bring


def _encode(img, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_images(seed: int = 0) -> dict[str, bytes]:
    """Encoded files of the modes and formats users bring, each with content (gradients, noise) so that a
    different decode gives different pixels: RGBA and LA with transparency over white, 16-bit grey, CMYK JPEG,
    a palette with transparency, an EXIF-rotated JPEG, a JPEG large enough for draft decoding, WebP, BMP,
    GIF, a float TIFF."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:64]
    grad = ((xx * 4 + yy * 2) % 256).astype(np.uint8)
    rgb = np.stack([grad, 255 - grad, rng.integers(0, 256, grad.shape, dtype=np.uint8)], -1).astype(np.uint8)
    alpha = np.where(xx < 32, 0, 255).astype(np.uint8)  # left half fully transparent
    white = np.full_like(rgb, 255)
    rgba = np.concatenate([np.where(alpha[..., None] == 0, white, rgb), alpha[..., None]], -1)
    files = {
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la.png": _encode(Image.fromarray(np.stack([255 - grad, (xx * 4).astype(np.uint8)], -1), "LA"), "PNG"),
        "gray16.png": _encode(Image.fromarray(grad.astype(np.uint16) * 235), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "webp.webp": _encode(Image.fromarray(rgb), "WEBP", quality=90),
        "bmp.bmp": _encode(Image.fromarray(rgb), "BMP"),
        "tiff-float.tif": _encode(Image.fromarray((grad / 255.0).astype(np.float32), "F"), "TIFF"),
    }
    pal = Image.fromarray(rgb).quantize(16)
    files["palette-trns.png"] = _encode(pal, "PNG", transparency=int(np.asarray(pal)[0, 0]))
    files["palette.gif"] = _encode(pal, "GIF", transparency=int(np.asarray(pal)[0, 0]))
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif-rotated.jpg"] = _encode(Image.fromarray(rgb), "JPEG", quality=92, exif=exif.tobytes())
    big = np.asarray(Image.fromarray(rgb).resize((1600, 1200), Image.BILINEAR))
    files["large.jpg"] = _encode(Image.fromarray(big), "JPEG", quality=90)
    return files


CORRUPT = {"truncated.png": "corrupt", "zero.jpg": "zero-byte", "text.png": "not an image"}


def write_odd_folder(folder: Path, labelled: bool = False, corrupt: bool = True) -> dict[str, bytes]:
    """odd_images() as files (under class folders a/ and b/ when labelled), plus a few corrupt ones."""
    files = odd_images()
    written = {}
    for i, (name, data) in enumerate(sorted(files.items())):
        rel = f"{'ab'[i % 2]}/{name}" if labelled else name
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        written[rel] = data
    if corrupt:
        (folder / "truncated.png").write_bytes(files["rgba.png"][:100])
        (folder / "zero.jpg").write_bytes(b"")
        (folder / "text.png").write_text("hello, I am not a picture")
    return written


def rgb_teacher(path: Path, size: int = 32, classes: int | list[str] = 10, seed: int = 0) -> Path:
    """An untrained RGB MLP with large output weights, saved as a checkpoint: every pixel moves its logits by a
    visible amount, so a view that differs anywhere gives different logits (all the view tests need)."""
    torch.manual_seed(seed)
    names = classes if isinstance(classes, list) else [f"class-{i}" for i in range(classes)]
    spec = models.InputSpec(size, 3, (0.5, 0.45, 0.4), (0.25, 0.25, 0.25))
    model, factory, kwargs = models.build("mlp", len(names), spec)
    with torch.no_grad():
        model.fc.weight.mul_(50.0)
    model.eval()
    models.save_checkpoint(path, model, factory, kwargs, names, spec)
    return path


# ------------------------------------------------------------------------------ storage servers on loopback


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "kdcurate-test-secret-5f2a9c"  # the S3 secret key the tests use: it must never be written anywhere


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1, with the standard AWS variables set for this process and the
    CLIs it starts. Yields a function making a fresh bucket and returning its s3:// URL."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    import time
    import urllib.request
    import uuid

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "kdcurate-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    CLI_ENV.update(env)

    def bucket() -> str:
        import s3fs

        name = f"b-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"

    yield bucket
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
            CLI_ENV.pop(k, None)
        else:
            os.environ[k] = CLI_ENV[k] = v


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """A directory served read-only over HTTP on 127.0.0.1; yields (its path, its base URL)."""
    import functools
    import http.server
    import threading

    root = tmp_path_factory.mktemp("http")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()

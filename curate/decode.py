"""Raw sample -> uint8 C×S×S pixels in the teacher's view (resize shorter side, centre crop, channels).

Runs in the loader workers. Normalisation ((x/255 - mean)/std) happens later on the whole batch, on
the device, so workers ship uint8 (4× fewer bytes than float). Every way an image can be bad raises
DecodeError with a reason that lands in the pool's errors/ table.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from distill.models import InputSpec

DEFAULT_MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs


class DecodeError(Exception):
    pass


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[str, int] | None = None):
    """Decode encoded bytes with Pillow, refusing empty, truncated, non-image and oversized input."""
    if not data:
        raise DecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"decompression bomb: {w}x{h} pixels exceeds the limit of {max_pixels}")
            if draft and img.format == "JPEG":  # let libjpeg decode at a reduced scale
                img.draft(draft[0], (draft[1], draft[1]))
            img.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt image: {str(e)[:160]}") from None
    return img, (w, h)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB'. Transparency is composited onto black; 16/32-bit integer and
    float images are rescaled to 8 bits; modes that cannot be converted raise DecodeError."""
    target = "L" if channels == 1 else "RGB"
    mode = img.mode
    if mode == target:
        return img
    try:
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            mode = img.mode
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, img).convert(target)
        if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = np.asarray(img, dtype=np.float32)
            top = float(arr.max()) if arr.size else 0.0
            scale = 255.0 / 65535.0 if top > 255 else 1.0
            img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
            return img.convert(target)
        return img.convert(target)
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported image mode {mode}: {e}") from None


def fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop size×size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pixels_from_bytes(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Encoded image -> (uint8 C×S×S, original width, original height)."""
    img, (w, h) = open_image(data, max_pixels, draft=("L" if spec.channels == 1 else "RGB", spec.size))
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    arr = np.asarray(fit(to_mode(img, spec.channels), spec.size))
    return _chw(arr), w, h


def pixels_from_array(rec: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, int, int]:
    """uint8 H×W[×C] record -> (uint8 C×S×S, width, height)."""
    if rec.dtype != np.uint8:
        raise DecodeError(f"array record has dtype {rec.dtype}, expected uint8")
    if rec.ndim == 3 and rec.shape[2] == 1:
        rec = rec[..., 0]
    if rec.ndim not in (2, 3) or (rec.ndim == 3 and rec.shape[2] not in (3, 4)):
        raise DecodeError(f"array record of shape {rec.shape} is not H×W, H×W×3 or H×W×4")
    h, w = rec.shape[:2]
    if rec.ndim == 2 and spec.channels == 1 and (h, w) == (spec.size, spec.size):
        return rec[None], w, h  # the common no-work path: grayscale at the teacher's size
    img = Image.fromarray(np.ascontiguousarray(rec))
    arr = np.asarray(fit(to_mode(img, spec.channels), spec.size))
    return _chw(arr), w, h


def _chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))

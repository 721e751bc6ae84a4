"""The network's view of an image: InputSpec, and the one decode of bytes or arrays into it.

`curate score` (the teacher's view), `curate report` (thumbnails), `distill train` and `distill eval`
(the student's view) all call `to_pixels`, so a soft label always belongs to exactly the pixels the
student trains on. Output is uint8 C×S×S; normalisation ((x/255 - mean)/std) happens later on the whole
batch, on the device (kdcore.tensors), so loader workers ship uint8 (4× fewer bytes than float).

The view: EXIF orientation applied; any Pillow mode to L or RGB (transparency composited on black,
16-bit and 32-bit integer images scaled from their full range, float images from [0, 1], CMYK and
palettes converted); the shorter side resized to S (bilinear; large JPEGs decoded at a reduced scale by
libjpeg first), then a centre S×S crop. Every way an image can be bad raises DecodeError with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kdcore.errors import UserError
from kdcore.limits import DEFAULT_MAX_PIXELS

ORIENTATION = 0x0112  # EXIF tag
RESIZE = "shorter-side+center-crop"


class DecodeError(Exception):
    """An input that is not a usable image; the message is the reason written to errors/."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network's input: resize the shorter side to `size`, centre-crop a
    size×size square, convert to `channels`, scale to [0, 1], then (x - mean) / std per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 4:
            raise UserError(f"size must be at least 4, got {self.size}")
        for name in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, name))
            if len(vals) == 1 and self.channels == 3:
                vals = vals * 3
            if len(vals) != self.channels:
                raise UserError(f"{name} needs 1 or {self.channels} values, got {len(vals)}")
            object.__setattr__(self, name, vals)
        if any(v <= 0 for v in self.std):
            raise UserError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(int(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]), d.get("resize", RESIZE))


def to_pixels(data: bytes | np.ndarray, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS
              ) -> tuple[np.ndarray, int, int]:  # fmt: skip
    """Encoded bytes or a uint8 H×W[×C] array -> (uint8 C×S×S in the view, original width, height)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        img, (w, h) = open_image(bytes(data), max_pixels, draft=("L" if spec.channels == 1 else "RGB", spec.size))
    else:
        rec = np.asarray(data)
        if rec.dtype != np.uint8:
            raise DecodeError(f"array record has dtype {rec.dtype}, expected uint8")
        if rec.ndim == 3 and rec.shape[2] == 1:
            rec = rec[..., 0]
        if rec.ndim not in (2, 3) or (rec.ndim == 3 and rec.shape[2] not in (3, 4)):
            raise DecodeError(f"array record of shape {rec.shape} is not H×W, H×W×3 or H×W×4")
        h, w = rec.shape[:2]
        if rec.ndim == 2 and spec.channels == 1 and (h, w) == (spec.size, spec.size):
            return np.ascontiguousarray(rec)[None], w, h  # the common no-work path: grey at the view's size
        img = Image.fromarray(np.ascontiguousarray(rec))
    arr = np.asarray(fit(to_mode(img, spec.channels), spec.size))
    return (arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))), w, h


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[str, int] | None = None
               ) -> tuple[Image.Image, tuple[int, int]]:  # fmt: skip
    """Decode encoded bytes with Pillow (first frame, EXIF orientation applied), refusing empty, truncated,
    non-image and oversized input. Returns the image and its displayed (width, height) before any draft."""
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
            orientation = img.getexif().get(ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            if orientation in range(2, 9):
                img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as e:
        raise DecodeError(f"corrupt image: {str(e)[:160]}") from None
    return img, (w, h)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB'. Transparency (alpha, palette or tRNS) is composited onto black;
    16/32-bit integer images are scaled from their full range, float images from [0, 1]; modes that
    cannot be converted raise DecodeError."""
    target = "L" if channels == 1 else "RGB"
    mode = img.mode
    try:
        if mode == target and "transparency" not in img.info:
            return img
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_to_uint8(img), "L").convert(target)
        if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):
            img = img.convert("RGBA")
            mode = "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, rgba).convert(target)
        return img.convert(target)
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported image mode {mode}: {e}") from None


def _to_uint8(img: Image.Image) -> np.ndarray:
    """A single-channel 16-bit, 32-bit or float image as uint8: I;16* by /257 (its full range), I likewise
    when it holds values above 255 (16-bit PNGs), F from [0, 1] when it stays there, else clipped."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bilinear) and centre-crop size×size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))

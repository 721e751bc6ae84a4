"""Decoding: every Pillow mode converts; every kind of bad image raises DecodeError with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate.decode import DecodeError, pixels_from_array, pixels_from_bytes
from distill.models import InputSpec

GRAY = InputSpec(16, 1, (0.5,), (0.5,))
RGB = InputSpec(16, 3, (0.5,), (0.5,))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img, fmt",
    [
        (Image.new("RGB", (40, 20), (255, 0, 0)), "JPEG"),
        (Image.new("RGBA", (20, 20), (255, 255, 255, 0)), "PNG"),
        (Image.new("LA", (20, 20), (200, 255)), "PNG"),
        (Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG"),
        (Image.new("1", (20, 20), 1), "PNG"),
        (Image.new("P", (20, 20), 3), "GIF"),
        (Image.new("RGB", (20, 30), (0, 0, 255)), "WEBP"),
        (Image.new("RGB", (20, 20), (0, 128, 0)), "BMP"),
        (Image.new("RGB", (20, 20), (0, 128, 0)), "TIFF"),
    ],
)
def test_modes_and_formats_convert_to_the_teacher_view(img, fmt):
    for spec in (GRAY, RGB):
        px, w, h = pixels_from_bytes(encode(img, fmt), spec, 10**8)
        assert px.shape == (spec.channels, 16, 16) and px.dtype == np.uint8
        assert (w, h) == img.size


def test_transparency_composites_on_black_and_16_bit_rescales():
    clear = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    px, _, _ = pixels_from_bytes(encode(clear), GRAY, 10**8)
    assert px.max() == 0
    deep = Image.fromarray(np.full((16, 16), 65535, np.uint16))
    px, _, _ = pixels_from_bytes(encode(deep), GRAY, 10**8)
    assert px.min() == 255


def test_resize_keeps_aspect_and_center_crops():
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 10:30] = 255  # a bright centre band as wide as the crop
    px, w, h = pixels_from_array(arr, InputSpec(10, 1, (0.5,), (0.5,)))
    assert (w, h) == (40, 20) and px.shape == (1, 10, 10) and px.min() > 200


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "zero-byte"),
        (b"hello, I am text", "not an image"),
        (encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "corrupt image"),
    ],
)
def test_bad_bytes_raise_decode_error(data, reason):
    with pytest.raises(DecodeError, match=reason):
        pixels_from_bytes(data, GRAY, 10**8)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (9000, 9000), 0))  # ~10 KB on disk, 81 Mpx decoded
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="decompression bomb"):
        pixels_from_bytes(bomb, GRAY, max_pixels=64_000_000)


def test_bad_array_records():
    with pytest.raises(DecodeError, match="dtype"):
        pixels_from_array(np.zeros((4, 4), np.float32), GRAY)
    with pytest.raises(DecodeError, match="shape"):
        pixels_from_array(np.zeros((4, 4, 5), np.uint8), GRAY)

"""The view: every Pillow mode converts; transparency, 16-bit and EXIF orientation as documented; every kind
of bad image raises DecodeError with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kdcore.errors import UserError
from kdcore.view import DecodeError, InputSpec, to_pixels

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
        (Image.new("F", (20, 20), 0.5), "TIFF"),
        (Image.new("I;16", (20, 20), 1000), "PNG"),
    ],
)
def test_modes_and_formats_convert_to_the_view(img, fmt):
    for spec in (GRAY, RGB):
        px, w, h = to_pixels(encode(img, fmt), spec)
        assert px.shape == (spec.channels, 16, 16) and px.dtype == np.uint8
        assert (w, h) == img.size


def test_transparency_composites_on_black():
    clear = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    assert to_pixels(encode(clear), GRAY)[0].max() == 0
    half = Image.new("LA", (16, 16), (200, 128))
    assert int(to_pixels(encode(half), GRAY)[0][0, 0, 0]) == round(200 * 128 / 255)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    px = to_pixels(encode(pal, transparency=1), RGB)[0]  # palette index 1 (white) is transparent
    assert px.max() == 0
    assert to_pixels(encode(pal), RGB)[0].min() == 255  # the same image without transparency is white


def test_16_bit_scales_by_the_full_range():
    for value, want in ((65535, 255), (30000, round(30000 / 257)), (200, round(200 / 257))):
        deep = Image.fromarray(np.full((16, 16), value, np.uint16))
        assert deep.mode.startswith("I;16")
        assert int(to_pixels(encode(deep), GRAY)[0][0, 0, 0]) == want


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, landscape
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90° clockwise -> portrait, top half white
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    px, w, h = to_pixels(data, InputSpec(20, 1, (0.5,), (0.5,)))
    assert (w, h) == (20, 40)
    upright = to_pixels(encode(img, "JPEG", quality=95), InputSpec(20, 1, (0.5,), (0.5,)))[0]
    assert upright[0][:, :5].mean() > 200 and upright[0][:5].mean() < 200  # unrotated: left half white
    assert px[0, :5].mean() > 200 and px[0, -5:].mean() < 50  # rotated: top rows white, bottom black


def test_resize_keeps_aspect_and_center_crops():
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 10:30] = 255  # a bright centre band as wide as the crop
    px, w, h = to_pixels(arr, InputSpec(10, 1, (0.5,), (0.5,)))
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
        to_pixels(data, GRAY)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (9000, 9000), 0))  # ~10 KB on disk, 81 Mpx decoded
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="decompression bomb"):
        to_pixels(bomb, GRAY, max_pixels=64_000_000)


def test_bad_array_records():
    with pytest.raises(DecodeError, match="dtype"):
        to_pixels(np.zeros((4, 4), np.float32), GRAY)
    with pytest.raises(DecodeError, match="shape"):
        to_pixels(np.zeros((4, 4, 5), np.uint8), GRAY)


def test_input_spec_checks_its_values():
    with pytest.raises(UserError, match="size must be at least 4"):
        InputSpec(0, 1, (0.5,), (0.5,))
    with pytest.raises(UserError, match="std must be positive"):
        InputSpec(8, 1, (0.5,), (0.0,))
    assert InputSpec(8, 3, (0.5,), (0.25,)).std == (0.25, 0.25, 0.25)

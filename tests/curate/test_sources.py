"""Every source kind, read from real files made here."""

from __future__ import annotations

import gzip
import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from curate.errors import UserError
from curate.generated import FASHION_DIR
from curate.sources import RawSample, ReadError, content_hash, parse_source, uid_of


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def read_all(spec: str) -> tuple[list[RawSample], list[ReadError], list]:
    src = parse_source(spec)
    units = src.units()
    items = [it for u in units for it in src.read(u)]
    return [i for i in items if isinstance(i, RawSample)], [i for i in items if isinstance(i, ReadError)], units


def test_uid_is_first_8_bytes_of_blake2b_big_endian_signed():
    sid = "shop/a/b.png"
    expected = int.from_bytes(hashlib.blake2b(sid.encode()).digest()[:8], "big", signed=True)
    assert uid_of(sid) == expected
    assert uid_of("x/1") != uid_of("x/2")
    assert content_hash(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()


def test_folder_source_sorted_units_and_dir_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (5, 7, 3), np.uint8)))
    (tmp_path / "notes.txt").write_text("not an image")
    samples, errors, units = read_all(f"pets=folder:{tmp_path}?labels=dirs&unit=4")
    assert [s.key for s in samples] == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [u.size for u in units] == [4, 2] and [u.id for u in units] == ["000000", "000001"]
    assert samples[0].data == (tmp_path / "cat" / "0.png").read_bytes()
    assert not errors


def test_wds_source_reads_tar_members_and_cls(tmp_path):
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    arr = np.full((4, 4), 7, np.uint8)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:06d}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"s{s}_{i}", "png": png_bytes(arr), "cls": str(i).encode()})
            w.write({"__key__": f"s{s}_noimg", "txt": b"hello"})
    samples, errors, units = read_all(f"web=wds:{pattern}")
    assert len(units) == 2
    assert [s.key for s in samples[:3]] == ["s0_0", "s0_1", "s0_2"]
    assert [s.label for s in samples] == [0, 1, 2] * 2
    assert all(s.data == png_bytes(arr) for s in samples)
    assert [e.key for e in errors] == ["s0_noimg", "s1_noimg"] and "no image member" in errors[0].reason


def test_wds_truncated_tar_keeps_what_was_read(tmp_path):
    path = tmp_path / "t.tar"
    big = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    with wds.TarWriter(str(path)) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "png": png_bytes(big)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    samples, errors, _ = read_all(f"t=wds:{path}")
    assert 1 <= len(samples) < 4
    assert errors and "corrupt tar" in errors[-1].reason


def test_parquet_source_hf_struct_column_labels_and_row_groups(tmp_path):
    imgs = [png_bytes(np.full((3, 3), i, np.uint8)) for i in range(5)]
    table = pa.table(
        {"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(imgs)], "label": [0, 1, 0, 1, 1]}
    )
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    samples, errors, units = read_all(f"hf=parquet:{tmp_path}/*.parquet?label=label")
    assert [u.id for u in units] == ["0000-00000", "0000-00001", "0000-00002"]
    assert [s.key for s in samples] == [f"d/{i}" for i in range(5)]
    assert [s.label for s in samples] == [0, 1, 0, 1, 1]
    assert samples[3].data == imgs[3] and not errors
    with pytest.raises(UserError, match="no column 'img'"):
        parse_source(f"hf=parquet:{tmp_path}/d.parquet?column=img").units()


def write_idx(path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_source_round_trip(tmp_path, compress):
    images = np.random.default_rng(2).integers(0, 255, (10, 6, 5), np.uint8)
    labels = np.arange(10, dtype=np.uint8) % 3
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"img{suffix}", images, compress)
    write_idx(tmp_path / f"lab{suffix}", labels, compress)
    samples, _, units = read_all(f"m=idx:{tmp_path}/img{suffix}?labels={tmp_path}/lab{suffix}&unit=4")
    assert [u.size for u in units] == [4, 4, 2]
    assert [s.key for s in samples] == [str(i) for i in range(10)]
    assert all(np.array_equal(s.data, images[i]) for i, s in enumerate(samples))
    assert [s.label for s in samples] == labels.tolist()


def test_idx_truncated_is_a_user_error(tmp_path):
    write_idx(tmp_path / "img", np.zeros((4, 3, 3), np.uint8), False)
    raw = (tmp_path / "img").read_bytes()
    (tmp_path / "img").write_bytes(raw[:-5])
    with pytest.raises(UserError, match="truncated"):
        parse_source(f"m=idx:{tmp_path}/img?unit=2").units()


def test_npy_source_rgb_and_dtype_check(tmp_path):
    arr = np.random.default_rng(3).integers(0, 255, (7, 4, 4, 3), np.uint8)
    np.save(tmp_path / "x.npy", arr)
    np.save(tmp_path / "y.npy", np.arange(7) % 2)
    samples, _, _ = read_all(f"n=npy:{tmp_path}/x.npy?labels={tmp_path}/y.npy&unit=3")
    assert len(samples) == 7 and np.array_equal(samples[5].data, arr[5]) and samples[5].label == 1
    np.save(tmp_path / "f.npy", arr.astype(np.float32))
    with pytest.raises(UserError, match="expected uint8"):
        parse_source(f"n=npy:{tmp_path}/f.npy").units()


@pytest.mark.parametrize("kind", ["noise", "dead-leaves", "shaders", "glyphs"])
def test_synthetic_is_deterministic_by_seed_and_index(kind):
    a, _, units = read_all(f"s=synthetic:{kind}?n=6&seed=5&size=24&unit=4")
    b, _, _ = read_all(f"s=synthetic:{kind}?n=6&seed=5&size=24&unit=2")
    c, _, _ = read_all(f"s=synthetic:{kind}?n=6&seed=6&size=24")
    assert len(units) == 2 and len(a) == 6
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].data, c[0].data)
    assert not np.array_equal(a[0].data, a[1].data)
    assert a[0].data.shape[:2] == (24, 24) and a[0].data.dtype == np.uint8
    assert a[0].data.std() > 0  # not a blank image


def test_builtin_sets_with_ranges():
    digits, _, _ = read_all("d=builtin:digits?start=100&stop=110")
    assert [s.key for s in digits] == [str(i) for i in range(100, 110)]
    assert digits[0].data.shape == (8, 8) and digits[0].data.max() > 200 and digits[0].label is not None
    mnist, _, units = read_all("m=builtin:mnist?unit=2000")
    assert len(mnist) == 5000 and len(units) == 3 and mnist[0].data.shape == (28, 28)
    photos, _, _ = read_all("p=builtin:photos?n=5&size=40")
    assert photos[0].data.shape == (40, 40, 3) and photos[0].label is None
    with pytest.raises(UserError, match="empty range"):
        parse_source("d=builtin:digits?start=5&stop=5").units()


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_builtin_fashion_mnist_split_and_range():
    src = parse_source("f=builtin:fashion-mnist?split=test&start=9990")
    samples = [s for u in src.units() for s in src.read(u)]
    assert [s.key for s in samples] == [str(i) for i in range(9990, 10000)]
    assert src.classes[0] == "T-shirt/top" and samples[0].data.shape == (28, 28)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosep", "needs a name"),
        ("a b=folder:/x", "may hold only"),
        ("x=zip:/tmp", "unknown kind 'zip'"),
        ("x=folder:/definitely/missing", "folder not found"),
        ("x=synthetic:plasma", "unknown synthetic kind"),
        ("x=builtin:cifar", "unknown builtin"),
        ("x=synthetic:noise?n=abc", "needs an integer"),
    ],
)
def test_bad_source_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_source(spec).units()

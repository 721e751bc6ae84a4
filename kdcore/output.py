"""What a command hands back: one result dict, drawn for people or printed as JSON for scripts.

Every command returns a plain dict (what it wrote, counts, figures, `warnings`, `notes`, and `error` when
it must exit 1). Without `--json` the command's `show` draws it on stdout (tables, lines) and the warnings go to
stderr. With `--json` stdout holds exactly one JSON object, the dict itself: whatever else would reach
stdout while the command runs (a library's print, a worker process) is sent to stderr with the logs and
progress bars. A mistake the user can fix still prints nothing on stdout: one line on stderr, exit 2.

Tables are pretty on a terminal (fitted to its width); off a terminal (logs, pipes) they are drawn at
their natural width, so no cell, header or title is ever cut or wrapped, whatever COLUMNS says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import IO, Any

LOG_WIDTH = 100_000  # off a terminal: wide enough that nothing is ever cut


def console(stderr: bool = False) -> Any:
    """A rich Console on stdout (or stderr): the terminal's width on a terminal, never cutting elsewhere."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if con.is_terminal:
        return con
    return Console(stderr=stderr, highlight=False, width=LOG_WIDTH, soft_wrap=True)


def table(columns: list[str], title: str | None = None) -> Any:
    """A rich Table: the first column left-aligned, the others right-aligned (numbers)."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    return t


def jsonable(obj: Any) -> Any:
    """Plain JSON values: dataclasses and mappings as objects, tuples and sets as lists, NaN and infinities as
    null, numpy scalars and arrays as numbers and lists, paths, dates and other values as text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, decimal.Decimal):
        return jsonable(float(obj))
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, (datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, PurePath):
        return str(obj)
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False)


_results: list[IO[str]] = []  # the real stdout while a --json command runs


def results() -> IO[str]:
    """Where results go: the real stdout (also while a --json command sends everything else to stderr)."""
    return _results[-1] if _results else sys.stdout


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[IO[str]]:
    """Send stdout, Python's and the file descriptor's (worker processes, native libraries), to stderr; yield a
    stream to the real stdout."""
    sys.stdout.flush()
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        out_fd = err_fd = None
    if out_fd is None:  # stdout is not a file (an in-process test runner): Python's level is all there is
        real = sys.stdout
        _results.append(real)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield real
        finally:
            _results.pop()
        return
    saved = os.dup(out_fd)
    os.dup2(err_fd, out_fd)
    real = open(saved, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 - closed below
    _results.append(real)
    try:
        yield real
    finally:
        _results.pop()
        sys.stdout.flush()
        real.flush()
        os.dup2(saved, out_fd)
        real.close()


def deliver(produce: Callable[[], dict[str, Any] | None], show: Callable[[dict[str, Any]], None] | None,
            as_json: bool) -> None:  # fmt: skip
    """Run `produce` and hand its result to people (`show`, warnings on stderr) or to scripts (one JSON object on
    stdout). A result with `error` exits 1 after it is printed. `produce` returning None has written its result
    itself (to `results()`)."""
    if as_json:
        with stdout_to_stderr() as real:
            data = produce()
            if data is not None:
                data.setdefault("warnings", [])
                real.write(dumps(data) + "\n")
    else:
        data = produce()
        if data is not None and show is not None:
            show(data)
    if data is None:
        return
    for note in data.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)
    for warning in data.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    if data.get("error"):
        print(f"error: {data['error']}", file=sys.stderr)
        raise SystemExit(1)

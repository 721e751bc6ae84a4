"""CLI commands as real processes, without paying the interpreter's start-up each time.

A server process (started once per test worker, from a fresh interpreter) imports the project and its heavy
dependencies, then forks one child per command: the child takes the command's environment, working directory
and argv, runs `python -m MODULE ARGS` (runpy, as `-m` does), writes stdout and stderr to files and exits with
the command's exit code. Each command is its own process, forked from the same pristine parent: nothing carries
from one command to the next. The server computes nothing itself, so no thread pool exists when it forks.

    python -m tests.cli_server        (started by `Server`; speaks length-prefixed pickles on stdin/stdout)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PRELOAD = (
    "numpy", "torch", "torch._dynamo", "torch.utils.data", "pyarrow.parquet", "pyarrow.dataset", "duckdb", "faiss",
    "webdataset", "PIL.Image", "matplotlib.pyplot", "fsspec", "typer", "rich", "kdcore.models", "curate.cli",
    "curate.score", "curate.scoring", "curate.select", "curate.export", "curate.index", "curate.report",
    "curate.query", "distill.cli", "distill.train", "distill.evaluate", "pipelines.cli", "pipelines.run",
)  # fmt: skip


def _read(stream: Any) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("!I", head)
    return pickle.loads(stream.read(n))


def _write(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def _child(module: str, argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked child: become `python -m module argv...` and exit with its code."""
    import runpy

    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own stdout
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what `python -m` prints for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os._exit(code)


def serve() -> None:
    """The server loop: preload, then fork a child per request and report its exit."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of the server go to stderr, never into the protocol
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):  # an optional dependency missing: the child imports what it needs
            importlib.import_module(name)
    _write(proto_out, "ready")
    while (req := _read(proto_in)) is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            proto_out.close()
            _child(req["module"], req["argv"], req["env"], req["cwd"], req["out"], req["err"])
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.01)
        code = os.waitstatus_to_exitcode(status)
        _write(proto_out, {"returncode": code, "timed_out": timed_out})


class Server:
    """A client of one server process (started on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        proc = subprocess.Popen([sys.executable, "-m", "tests.cli_server"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd=self.root, env=env)  # fmt: skip
        if _read(proc.stdout) != "ready":
            raise RuntimeError("the CLI server did not start")
        return proc

    def run(self, args: tuple[str, ...], env: dict[str, str], cwd: Path, timeout: float
            ) -> subprocess.CompletedProcess:  # fmt: skip
        with self.lock, tempfile.TemporaryDirectory(prefix="cli-") as tmp:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            _write(self.proc.stdin, {"module": args[0], "argv": list(args[1:]), "env": dict(env), "cwd": str(cwd),
                                     "out": out, "err": err, "timeout": timeout})  # fmt: skip
            res = _read(self.proc.stdout)
            stdout = Path(out).read_text(encoding="utf-8", errors="replace") if os.path.exists(out) else ""
            stderr = Path(err).read_text(encoding="utf-8", errors="replace") if os.path.exists(err) else ""
        cmd = [sys.executable, "-m", *args]
        if res["timed_out"]:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, res["returncode"], stdout, stderr)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    serve()

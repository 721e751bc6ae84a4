"""One writer per role on a pool in object storage, where there is no OS lock: a lock object holding its
holder (command, pid, host, a token), refreshed by a heartbeat; one not refreshed for STALE seconds belongs
to a writer that died and may be taken over. Taking it writes the object, then reads it back: the writer
whose token is there holds it (two writers racing see one token)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kdcore import storage
from kdcore.errors import UserError

HEARTBEAT, STALE = 20.0, 90.0


@contextmanager
def remote_lock(url: str, holder: dict[str, Any], pool: str) -> Iterator[None]:
    token = uuid.uuid4().hex
    mine = {**holder, "token": token}
    current = _read(url)
    if current and time.time() - current.get("refreshed", 0) < STALE and not _dead_here(current):
        raise UserError(f"pool {storage.redact(pool)} is being written by {current.get('command')} (pid "
                        f"{current.get('pid')} on {current.get('host')}, since {current.get('since')}); wait for it to "
                        f"finish or stop it (a lock not refreshed for {STALE:.0f} s is taken over)")  # fmt: skip
    _write(url, mine)
    time.sleep(0.2)  # let a racing writer's object land, then see whose is there
    if (_read(url) or {}).get("token") != token:
        raise UserError(f"pool {storage.redact(pool)} was taken by another writer at the same moment; rerun")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            _write(url, mine)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if (_read(url) or {}).get("token") == token:
            storage.remove(url)


def _dead_here(holder: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (killed): its lock is free at once."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return False


def _read(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write(url: str, holder: dict[str, Any]) -> None:
    storage.write_bytes(url, json.dumps({**holder, "refreshed": time.time()}).encode())

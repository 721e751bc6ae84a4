"""A run directory on any storage kdcore.storage writes: a local folder, or a prefix on object storage.

Training writes its files with plain local calls (torch.save, appends to metrics.jsonl, matplotlib), so a
remote run is staged in a local temporary folder: each file is uploaded whole after it is written (an object
appears complete or not at all, so every upload is atomic), and `pull` brings back what a `--resume` needs
(the checkpoint and the metrics) before training starts. A local run is the folder itself.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kdcore import storage
from kdcore.errors import UserError


class RunDir:
    def __init__(self, url: str, what: str = "--out") -> None:
        self.url = storage.target(url, what)
        self.remote = not storage.is_local(self.url)
        if self.remote:
            storage.check_writable(self.url, what)
            if storage.isfile(self.url):
                raise UserError(f"{what} {storage.redact(self.url)} is a file; give a run directory")
            self.root = Path(tempfile.mkdtemp(prefix="kdcurate-run-"))
        else:
            self.root = storage.local(self.url)
            if self.root.exists() and not self.root.is_dir():
                raise UserError(f"{what} {self.url} is a file; give a run directory")

    def __truediv__(self, name: str) -> Path:
        """The local path of a run file (for a remote run, in the staging folder)."""
        return self.root / name

    def url_of(self, name: str) -> str:
        return storage.join(self.url, name)

    def exists(self, name: str) -> bool:
        """Whether the run itself (not the staging folder) holds `name`."""
        return storage.exists(self.url_of(name)) if self.remote else (self.root / name).exists()

    def make(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def pull(self, *names: str) -> None:
        """Copy these files of a remote run, where they exist, into the staging folder."""
        if not self.remote:
            return
        for name in names:
            if storage.isfile(self.url_of(name)):
                with storage.open_read(self.url_of(name)) as src, open(self.root / name, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)

    def push(self, *names: str) -> None:
        """Upload these staged files (those that exist) to the remote run, each whole."""
        if not self.remote:
            return
        for name in names:
            path = self.root / name
            if path.is_file():
                with open(path, "rb") as src, storage.open_write(self.url_of(name), tag="train") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

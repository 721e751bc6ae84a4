"""Shared by the benchmarks: the common options, the machine description and writing a table into
docs/benchmarks.md (or the file `--doc` names)."""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def add_options(ap: argparse.ArgumentParser) -> None:
    """--smoke and --doc, which every benchmark takes."""
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: proves the script runs end to end (its numbers mean nothing)",
    )
    ap.add_argument("--doc", type=Path, default=DOC, help=f"the Markdown file the tables go into (default {DOC})")


SMOKE = "(smoke run: tiny sizes; the numbers mean nothing)"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between <!-- NAME --> markers in `doc` (docs/benchmarks.md)."""
    start, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nEach section is written by the script it names.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)

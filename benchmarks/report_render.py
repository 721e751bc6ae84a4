"""Render a report page in headless Chromium (Debian's `chromium`) and save the screenshot, to look at it
the way a user will. Default: the demo's report (`make demo` first) -> docs/report.png.

    python benchmarks/report_render.py [REPORT_DIR] [--out docs/report.png] [--height 4200]
    python benchmarks/report_render.py --smoke [--doc PATH]   (a one-line page, screenshot in a temporary folder)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, table, write_section  # noqa: E402


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", nargs="?", default=str(ROOT / "work" / "demo" / "report" / "report"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    ap.add_argument("--height", type=int, default=4200)
    add_options(ap)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="kdcurate-bench-") if args.smoke else None
    if tmp is not None:
        (Path(tmp.name) / "report.html").write_text("<!doctype html><h1>kdcurate report</h1>")
        args.report, args.out, args.height = tmp.name, str(Path(tmp.name) / "report.png"), 300
    page = Path(args.report) / "report.html"
    chrome = browser()
    if not page.is_file():
        sys.exit(f"error: no {page}; run 'make demo' or 'curate report' first")
    if not chrome:
        sys.exit("error: no chromium; install it with 'apt-get install chromium'")
    shot = f"--screenshot={Path(args.out).resolve()}"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags.append(f"--window-size=1200,{args.height}")
    cmd = [chrome, *flags, shot, page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"{page} -> {args.out}")
    if tmp is not None:
        size = Path(args.out).stat().st_size
        write_section("report-render", f"## Report render {SMOKE}\n\n" + table(["page", "screenshot bytes"],
                                                                                [["report.html", f"{size:,}"]]),
                      args.doc)  # fmt: skip


if __name__ == "__main__":
    main()

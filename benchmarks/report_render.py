"""Render a report page in headless Chromium (Debian's `chromium`) and save the screenshot, to look at it
the way a user will. Default: the demo's report (`make demo` first) -> docs/report.png.

    python benchmarks/report_render.py [REPORT_DIR] [--out docs/report.png] [--height 4200]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", nargs="?", default=str(ROOT / "work" / "demo" / "report" / "report"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    ap.add_argument("--height", type=int, default=4200)
    args = ap.parse_args()
    page = Path(args.report) / "report.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not page.is_file():
        sys.exit(f"error: no {page}; run 'make demo' or 'curate report' first")
    if not browser:
        sys.exit("error: no chromium; install it with 'apt-get install chromium'")
    shot = f"--screenshot={Path(args.out).resolve()}"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags.append(f"--window-size=1200,{args.height}")
    cmd = [browser, *flags, shot, page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"{page} -> {args.out}")


if __name__ == "__main__":
    main()

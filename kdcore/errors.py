"""The one exception type for mistakes a user can fix; every CLI prints it as one line and exits 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad spec, missing file, SQL error...: the message names the problem and the fix."""


def run_app(app: Callable[[], None]) -> None:
    """Run a typer app: a UserError becomes one line on stderr and exit code 2; Ctrl-C exits 130 quietly."""
    try:
        app()
    except UserError as e:
        text = str(e).strip().splitlines()
        print(f"error: {text[0] if text else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)

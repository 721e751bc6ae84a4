"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad spec, missing file, SQL error...: the message names the problem and the fix."""


def run_app(app: Callable[[], None], *errors: type[Exception]) -> None:
    """Run a typer app; a UserError (or one of `errors`) becomes one line on stderr and exit code 2."""
    try:
        app()
    except (UserError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

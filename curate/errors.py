"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad spec, missing file, SQL error...: the message names the problem and the fix."""

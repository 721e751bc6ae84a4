"""Small parsers every stage shares: `LOCATION?key=value&...` options and `topk:K`."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from kdcore.errors import UserError


def split_options(spec: str, what: str) -> tuple[str, dict[str, str]]:
    """'HEAD?k=v&k2=v2' -> ('HEAD', {'k': 'v', 'k2': 'v2'}); a malformed query is a UserError."""
    head, _, query = spec.partition("?")
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise UserError(f"{what}: cannot parse options {query!r}; use ?key=value&key=value") from None
    return head, opts


def parse_value(v: str) -> Any:
    """'true'/'false' -> bool, integers and floats as numbers, anything else as the string."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_topk(text: str, max_k: int, what: str) -> str:
    """'full' or 'topk:K' with 0 < K <= max_k, normalised; anything else is a UserError."""
    if text == "full":
        return "full"
    kind, _, k = text.partition(":")
    if kind == "topk" and k.isdigit() and 0 < int(k) <= max_k:
        return f"topk:{int(k)}"
    raise UserError(f"{what} must be full or topk:K with 0 < K <= {max_k}, got {text!r}")


def topk_k(kind: str) -> int | None:
    """K of a normalised 'topk:K', None for 'full'."""
    return int(kind.split(":")[1]) if kind.startswith("topk:") else None

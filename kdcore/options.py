"""Each option is declared once, as a config dataclass field with its help text; the CLI options (typer)
and the pipeline's TOML keys are derived from the fields.

    batch_size: int = option(256, "Samples per forward pass.")
    sources: list[str] = option([], "NAME=KIND:LOCATION, repeatable.", cli_name="source")
    pool: str = option(None, "Pool directory.", positional=True, toml_reason="the job's WORK/score/pool")
    show_progress: bool = option(True, "Show progress bars.", cli_name="progress", toml_reason="pipeline --progress")

A field with `cli_reason` is not a CLI option and one with `toml_reason` is not a TOML key; the reason says
where its value comes from instead (tests check that every other field is reachable from both). Every command
also gets --json (kdcore.output). Messages name options as CLI flags (`--per-class`); `job_words` says the same
in a job's words (`[select] per-class`), so one check serves both front ends.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from kdcore.errors import UserError

REQUIRED = dataclasses.MISSING


def option(
    default: Any = REQUIRED,
    help: str = "",
    *,
    cli_name: str | None = None,
    positional: bool = False,
    cli_reason: str | None = None,
    toml_reason: str | None = None,
) -> Any:
    """A config field with its help text and how it is reached (see module doc). List defaults are copied."""
    md = {"help": help, "cli_name": cli_name, "positional": positional, "cli_reason": cli_reason,
          "toml_reason": toml_reason}  # fmt: skip
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def internal(default: Any, reason: str) -> Any:
    """A field neither the CLI nor a job sets (filled in by the code that builds the config)."""
    return option(default, reason, cli_reason=reason, toml_reason=reason)


def fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def cli_name(f: dataclasses.Field) -> str:
    return f.metadata.get("cli_name") or f.name


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return REQUIRED


def _base(tp: Any) -> Any:
    """X from `X | None` / Optional[X]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


# -------------------------------------------------------------------------------------------- CLI


def cli_params(cls: type) -> list[inspect.Parameter]:
    """typer parameters for the CLI fields of a config dataclass, in declaration order."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in fields(cls):
        md = f.metadata
        if md.get("cli_reason"):
            continue
        default = _default(f)
        name = cli_name(f)
        tp = hints[f.name]
        help_text = md.get("help", "")
        if isinstance(default, list) and not default:
            default = None  # typer: a repeatable option with no value given
        metavar = name.upper()
        if md.get("positional"):
            info = typer.Argument(... if default is REQUIRED else default, help=help_text, show_default=False,
                                  metavar=metavar)  # fmt: skip
        else:
            flag = "--" + name.replace("_", "-")
            if _base(tp) is bool:
                info = typer.Option(default, f"{flag}/--no-{name.replace('_', '-')}", help=help_text)
            else:
                info = typer.Option(... if default is REQUIRED else default, flag, help=help_text, metavar=metavar)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=tp))
    return params


def json_param() -> inspect.Parameter:
    """--json, which every command has: its result as one JSON object on stdout (kdcore.output)."""
    import typer

    info = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (logs stay on stderr).")
    return inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, default=info, annotation=bool)


def command(app: Any, cls: type, run: Callable[..., dict[str, Any] | None], name: str | None = None, doc: str = "",
            show: Callable[[dict[str, Any]], None] | None = None, json_aware: bool = False) -> None:  # fmt: skip
    """Register `name` on a typer app: its options are `cls`'s CLI fields and --json; it builds `cls`, calls `run`
    (which returns the result dict) and hands the result to `show` for people, or prints it as JSON. A
    `json_aware` run is called as run(cfg, as_json) and may write its JSON itself (kdcore.output.results)."""
    from kdcore import output

    params = [*cli_params(cls), json_param()]
    names = {cli_name(f): f.name for f in fields(cls)}

    def cmd(**kwargs: Any) -> None:
        as_json = kwargs.pop("json_")
        values = {names[k]: v for k, v in kwargs.items()}
        for f in fields(cls):
            if isinstance(_default(f), list) and values.get(f.name) is None and f.name in values:
                values[f.name] = []
        cfg = cls(**values)
        output.deliver(lambda: run(cfg, as_json) if json_aware else run(cfg), show, as_json)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = doc
    cmd.__name__ = (name or cls.__name__).replace("-", "_")
    app.command(name)(cmd)


# -------------------------------------------------------------------------------------------- TOML


def toml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """TOML key -> field, for the fields a job may set (keys are field names; the CLI name is an alias)."""
    out = {}
    for f in fields(cls):
        if f.metadata.get("toml_reason"):
            continue
        out[f.name] = f
        out.setdefault(cli_name(f), f)
    return out


def toml_types(cls: type, f: dataclasses.Field) -> tuple[type, ...]:
    """The TOML value types a field accepts (an int where a float is wanted; a string for a list)."""
    tp = _base(typing.get_type_hints(cls)[f.name])
    if tp is bool:
        return (bool,)
    if tp is int:
        return (int,)
    if tp is float:
        return (int, float)
    if tp is str:
        return (str,)
    if typing.get_origin(tp) is list:
        return (list, str)
    return (object,)


def from_table(cls: type, table: dict[str, Any], where: str, section: str, line: Callable[[str], int] | None = None,
               **fixed: Any) -> Any:  # fmt: skip
    """Build `cls` from the TOML table [section] of file `where` (keys with '-' or '_'), type-checked; `fixed`
    holds the values the caller supplies (the fields with a toml_reason). Errors name the key and its line."""
    known = toml_fields(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        k = key.replace("-", "_")
        at = f"{where} line {line(key)}" if line else where
        if k not in known:
            names = ", ".join(sorted({f.name for f in known.values()}))
            raise UserError(f"{at}: unknown key '{key}' in [{section}]; known: {names}")
        f = known[k]
        want = toml_types(cls, f)
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            names = " or ".join("list" if t is list else t.__name__ for t in want)
            raise UserError(f"{at}: '{key}' in [{section}] must be {names}, got {value!r}")
        if list in want and isinstance(value, str):
            value = [value]
        if list in want and not all(isinstance(v, str) for v in value):
            raise UserError(f"{at}: '{key}' in [{section}] must be a list of strings, got {value!r}")
        values[f.name] = value
    missing = [f.name for f in fields(cls) if _default(f) is REQUIRED and f.name not in values and f.name not in fixed]
    if missing:
        raise UserError(f"{where}: [{section}] needs '{missing[0]}'")
    try:
        return cls(**values, **fixed)
    except UserError as e:
        text, key = job_words(str(e), section, cls)
        if key is None:
            raise UserError(f"{where} [{section}]: {text}") from None
        given = next((k for k in table if k.replace("-", "_") == key.replace("-", "_")), None)
        at = f"{where} line {line(given or key)}" if line else where
        raise UserError(f"{at}: {text}") from None


_FLAG = re.compile(r"(?<![\w-])--(no-)?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")


def job_words(text: str, section: str, cls: type | None = None, extra: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A message written in CLI words, in a job's words: every --flag of a field the job's [section] sets (or of
    an `extra` key of that table) becomes `[section] key`. Returns the text and the first key it names (None
    when it names none). Flags of fields a job does not set (paths the job supplies) are left as they are."""
    keys = {k.replace("_", "-"): k.replace("_", "-") for k in extra}
    if cls is not None:
        for f in fields(cls):
            if not f.metadata.get("toml_reason"):
                keys.setdefault(cli_name(f).replace("_", "-"), f.name.replace("_", "-"))
    named: list[str] = []

    def render(m: re.Match) -> str:
        key = keys.get(m.group(2))
        if key is None:
            return m.group(0)
        named.append(key)
        return f"[{section}] {key}" + (" = false" if m.group(1) else "")

    return _FLAG.sub(render, text), (named[0] if named else None)

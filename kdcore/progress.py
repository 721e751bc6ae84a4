"""Progress bars (rich) for long work, on stderr so stdout stays clean for results (and for --json). Off a
terminal (a log file) a bar is written once, when it ends, at its full width (kdcore.output.console)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdcore.output import console


@contextmanager
def bar(
    description: str, total: int | None, enabled: bool = True, unit: str = "samples", start: int = 0
) -> Iterator[Callable[..., None]]:
    """Yields advance(n, note=""). Shows done/total, rate (or the caller's note) and ETA on stderr."""
    if not enabled:
        yield lambda n=1, note="": None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console(stderr=True), transient=False) as prog:
        task = prog.add_task(description, total=total, completed=start, note="")

        def advance(n: int = 1, note: str = "") -> None:
            prog.advance(task, n)
            t = prog.tasks[task]
            if not note and t.elapsed:
                note = f"{(t.completed - start) / t.elapsed:,.0f}/s"
            prog.update(task, note=note)

        yield advance

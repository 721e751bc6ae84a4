"""Progress bars (rich) for long work, shown on stderr so stdout stays clean for data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)


@contextmanager
def bar(
    description: str, total: int | None, enabled: bool = True, unit: str = "samples"
) -> Iterator[Callable[[int], None]]:
    """Yields advance(n). Shows done/total, rate and ETA; silent when disabled or not a terminal."""
    if not enabled:
        yield lambda n: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{unit}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            prog.advance(task, n)
            t = prog.tasks[task]
            if t.elapsed:
                prog.update(task, rate=f"{t.completed / t.elapsed:,.0f}/s")

        yield advance

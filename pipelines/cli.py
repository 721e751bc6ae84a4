"""`pipeline`: run a batch job from one TOML spec. The plan and the summary go to stdout (with --json as one JSON
object, the one `pipeline run` also writes to WORK/summary.json), stage logs and progress bars to stderr."""

from __future__ import annotations

import sys
from typing import Any

import typer

from kdcore.errors import run_app
from kdcore.output import console, deliver

app = typer.Typer(
    help="Run kdcurate batch jobs: teacher, score, index, select, export, eval, distill, report from one TOML spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main() -> None:
    """Batch jobs from a TOML spec (see pipelines/demo.toml and pipelines/example.toml)."""


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@app.command()
def run(
    job: str = typer.Argument(..., help="The job spec (TOML)."),
    from_: str = typer.Option(None, "--from", help="Run this stage and every later one again."),
    force: bool = typer.Option(False, help="Run every stage again."),
    dry_run: bool = typer.Option(False, help="Check the spec and print what would run and why; run nothing."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    json_: bool = typer.Option(False, "--json", help="Print the plan and summary as one JSON object on stdout."),
) -> None:
    """Run the job's stages in order. A stage is skipped when its parameters and inputs have not changed
    since it completed; a killed job continues where it stopped when run again.

    \b
    Examples:
      pipeline run pipelines/demo.toml
      pipeline run job.toml --dry-run
      pipeline run job.toml --from distill
      pipeline run job.toml --json | jq .summary.student_accuracy
    """
    from pipelines.run import result_dict
    from pipelines.run import run as run_job

    def produce() -> dict[str, Any]:
        res = run_job(job, start=from_, force=force, dry_run=dry_run, show_progress=progress, log=_log)
        return result_dict(res, dry_run)

    deliver(produce, _show_run, json_)


def _show_run(d: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    dry_run = d["dry_run"]
    plan = Table(title=f"job {d['job']} ({d['work']})")
    for col in ("stage", "action", "why", "seconds"):
        plan.add_column(col, justify="right" if col == "seconds" else "left")
    for s in d["stages"]:
        plan.add_row(s["stage"], s["action"], s["reason"],
                     f"{s['seconds']:.1f}" if s["action"] == "run" and not dry_run else "")  # fmt: skip
    out.print(plan, markup=False)
    if dry_run:
        return
    summ = d["summary"]
    t = Table(title="summary")
    t.add_column("what")
    t.add_column("value", justify="right", overflow="fold")
    for key in ("teacher_accuracy", "student_accuracy", "agreement"):
        if key in summ:
            t.add_row(key.replace("_", " "), f"{summ[key]:.4f}")
    if "selection" in summ:
        sel = summ["selection"]
        t.add_row("selection", f"{sel['rows']:,} samples, H/log C {sel['rel_entropy']:.3f}")
        t.add_row("composition", ", ".join(f"{k} {v:,}" for k, v in sel["per_source"].items()))
        if "precision" in sel:
            t.add_row("selection precision",
                      f"{sel['precision']:.3f} (task share of the pool {sel['task_share_of_pool']:.3f})")  # fmt: skip
    if "auroc" in summ:
        t.add_row("AUROC, task sources positive", ", ".join(f"{k} {v:.3f}" for k, v in summ["auroc"].items()))
    t.add_row("wall time per stage", ", ".join(f"{k} {v:.0f}s" for k, v in summ["seconds"].items()))
    out.print(t, markup=False)
    for key in ("student", "report"):
        if key in summ:
            out.print(f"{key}: {summ[key]}", markup=False, highlight=False)
    out.print(f"summary: {d['summary_file']}", markup=False, highlight=False)


@app.command()
def keys(
    stage: str = typer.Argument(None, help="A stage (teacher, score, index, select, ...); all when left out."),
    json_: bool = typer.Option(False, "--json", help="Print the keys as one JSON object on stdout."),
) -> None:
    """List the keys a job's table takes, with their TOML types and help (the stage command's options)."""
    from kdcore.errors import UserError
    from pipelines.run import SPECS, keys

    if stage is not None and stage not in SPECS:
        raise UserError(f"unknown stage {stage!r}; stages: {', '.join(SPECS)}")

    def produce() -> dict[str, Any]:
        stages = [stage] if stage else list(SPECS)
        return {"stages": {n: [{"key": k, "type": t, "help": h} for k, t, h in keys(n)] for n in stages}}

    deliver(produce, _show_keys, json_)


def _show_keys(d: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    for name, rows in d["stages"].items():
        table = Table(title=f"[{name}]", title_justify="left")
        for col in ("key", "type", "help"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(row["key"], row["type"], row["help"])
        out.print(table, markup=False)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

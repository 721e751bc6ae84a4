"""Output for scripts: with --json every command prints exactly one JSON object on stdout (what it wrote, counts,
figures, warnings) and nothing else; logs and bars stay on stderr. Off a terminal, tables are never cut, whatever
COLUMNS says.

One small pool, selection, shard set and run are made once for the module (a tiny untrained teacher); the commands
run in this process through typer's runner, and a few as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app as curate_app
from distill.cli import app as distill_app
from pipelines.cli import app as pipeline_app
from tests.conftest import CLI_ENV, ROOT, rgb_teacher

APPS = {"curate": curate_app, "distill": distill_app, "pipeline": pipeline_app}
CLASSES = [str(i) for i in range(10)]  # the digits' classes, so labelled digits evaluate the student


def invoke(*args: str) -> tuple[dict, str]:
    """Run `APP COMMAND ARGS --json` in this process; (the one JSON object on stdout, stderr)."""
    res = CliRunner().invoke(APPS[args[0]], [*args[1:], "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    obj = json.loads(res.stdout)  # the whole of stdout is one JSON document...
    assert isinstance(obj, dict) and lines and lines[0].startswith("{"), res.stdout[:200]  # ...and it is an object
    return obj, res.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Every command once, in the order a user runs them: command -> (its JSON object, the module's work dir)."""
    w = tmp_path_factory.mktemp("json")
    teacher = rgb_teacher(w / "teacher.pt", size=8, classes=CLASSES)
    pool, sel, shards, labelled, run = w / "pool", w / "sel", w / "shards", w / "labelled", w / "run"
    out: dict[str, dict] = {}
    out["score"], _ = invoke("curate", "score", "--teacher", str(teacher), "--pool", str(pool), "--no-progress",
                             "--source", "d=builtin:digits?stop=120&unit=60", "--source",
                             "n=synthetic:noise?n=60&size=8", "--batch-size", "64")  # fmt: skip
    out["compact"], _ = invoke("curate", "compact", str(pool), "--no-progress")
    out["index"], _ = invoke("curate", "index", str(pool), "--no-progress")
    out["sql"], _ = invoke(
        "curate", "sql", str(pool), "SELECT source, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1"
    )
    out["sql --out"], _ = invoke("curate", "sql", str(pool), "SELECT uid FROM samples", "--format", "parquet",
                                 "--out", str(w / "uids.parquet"))  # fmt: skip
    out["select"], _ = invoke("curate", "select", str(pool), "--strategy", "top-per-class", "--per-class", "4",
                              "--score", "confidence", "--out", str(sel))  # fmt: skip
    out["report"], _ = invoke("curate", "report", str(pool), "--selection", str(sel), "--out", str(w / "report"),
                              "--thumbs", "1")  # fmt: skip
    out["export"], _ = invoke("curate", "export", str(pool), "--selection", str(sel), "--out", str(shards),
                              "--no-progress")  # fmt: skip
    out["export --source"], _ = invoke("curate", "export", "--source", "l=builtin:digits?start=120&stop=220",
                                       "--out", str(labelled), "--no-progress")  # fmt: skip
    out["train"], _ = invoke("distill", "train", str(shards), "--out", str(run), "--steps", "2", "--batch-size", "8",
                             "--student", "cnn-tiny", "--workers", "0", "--no-progress")  # fmt: skip
    out["eval"], _ = invoke("distill", "eval", str(run), "--data", str(labelled), "--workers", "0")
    out["finetune"], _ = invoke("distill", "finetune", str(run), "--data", str(labelled), "--per-class", "2",
                                "--steps", "2")  # fmt: skip
    job = w / "job.toml"
    job.write_text(f'[job]\nname = "j"\nwork = "{w / "work"}"\n[teacher]\nspec = "{teacher}"\n'
                   '[score]\nsources = ["n=synthetic:noise?n=16&size=8"]\n')  # fmt: skip
    out["pipeline run --dry-run"], _ = invoke("pipeline", "run", str(job), "--dry-run")
    out["pipeline run"], _ = invoke("pipeline", "run", str(job), "--no-progress")
    out["pipeline keys"], _ = invoke("pipeline", "keys", "score")
    return {k: (v, w) for k, v in out.items()}


def _score(d: dict, w: Path) -> None:
    assert d["rows"] == 180 and d["errors"] == 0 and d["pool"] == str(w / "pool")
    assert d["per_source"]["d"]["rows"] == 120 and d["per_source"]["n"]["units"] == 1 and d["failed_units"] == []


def _compact(d: dict, w: Path) -> None:
    assert d["units_merged"] == 2 and d["rows_merged"] == 120 and len(d["written"]) == 1  # the two units of d


def _index(d: dict, w: Path) -> None:
    assert d["rows"] == 180 and d["kind"] == "flat" and 0 < d["recall_at_10"] <= 1 and Path(d["path"]).exists()


def _sql(d: dict, w: Path) -> None:
    assert d["columns"] == ["source", "n"] and d["count"] == 2
    assert d["rows"] == [{"source": "d", "n": 120}, {"source": "n", "n": 60}]


def _sql_out(d: dict, w: Path) -> None:
    assert d == {"out": str(w / "uids.parquet"), "format": "parquet", "count": 180, "warnings": []}


def _select(d: dict, w: Path) -> None:
    assert d["out"] == str(w / "sel") and d["rows"] == sum(d["per_source"].values()) == sum(d["per_class"].values())
    assert 0 < d["rows"] <= 40 and d["candidates"] == 180


def _report(d: dict, w: Path) -> None:
    assert Path(d["html"]).is_file() and {s["source"] for s in d["sources"]} == {"d", "n"}
    assert isinstance(d["warnings"], list)


def _export(d: dict, w: Path) -> None:
    sel = json.loads((w / "sel" / "selection.json").read_text())
    assert d["samples"] == sel["rows"] and d["errors"] == 0 and d["manifest"] == f"{w / 'shards'}/manifest.json"


def _export_source(d: dict, w: Path) -> None:
    assert d["samples"] == 100 and d["shards"] == 1 and Path(d["manifest"]).is_file()


def _train(d: dict, w: Path) -> None:
    assert d["steps"] == 2 and d["student"] == f"{w / 'run'}/student.pt" and Path(d["student"]).is_file()


def _eval(d: dict, w: Path) -> None:
    assert d["samples"] == 100 and 0 <= d["accuracy"] <= 1 and "confusion" not in d


def _finetune(d: dict, w: Path) -> None:
    assert d["samples"] == 20 and d["steps"] == 2 and Path(d["student"]).is_file()


def _pipeline_dry(d: dict, w: Path) -> None:
    assert d["dry_run"] is True and d["summary_file"] is None
    assert [(s["stage"], s["action"]) for s in d["stages"]] == [("teacher", "run"), ("score", "run")]


def _pipeline_run(d: dict, w: Path) -> None:
    assert d["job"] == "j" and d["work"] == str(w / "work") and d["summary"]["seconds"].keys() == {"teacher", "score"}
    assert json.loads(Path(d["summary_file"]).read_text()) == {k: v for k, v in d.items() if k != "warnings"}


def _pipeline_keys(d: dict, w: Path) -> None:
    keys = {k["key"]: k for k in d["stages"]["score"]}
    assert keys["batch-size"]["type"] == "int" and "forward pass" in keys["batch-size"]["help"]


CHECKS = {
    "score": _score, "compact": _compact, "index": _index, "sql": _sql, "sql --out": _sql_out, "select": _select,
    "report": _report, "export": _export, "export --source": _export_source, "train": _train, "eval": _eval,
    "finetune": _finetune, "pipeline run --dry-run": _pipeline_dry, "pipeline run": _pipeline_run,
    "pipeline keys": _pipeline_keys,
}  # fmt: skip


@pytest.mark.parametrize("command", list(CHECKS))
def test_every_command_prints_one_json_object(results, command):
    data, work = results[command]
    CHECKS[command](data, work)


def _run(args: list[str], columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**CLI_ENV, "COLUMNS": str(columns)} if columns else CLI_ENV
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True)


def test_json_stdout_is_clean_in_a_real_process_and_sql_refuses_csv(results, tmp_path):
    """A subprocess: stdout is the object alone even with bars on (they go to stderr)."""
    _, w = results["score"]
    proc = _run(["curate", "score", "--teacher", str(w / "teacher.pt"), "--pool", str(tmp_path / "p"), "--source",
                 "n=synthetic:noise?n=40&size=8", "--json"])  # fmt: skip
    assert json.loads(proc.stdout)["rows"] == 40 and len(proc.stdout.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, "-m", "curate", "sql", str(w / "pool"), "SELECT 1", "--format", "csv",
                          "--json"], env=CLI_ENV, cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == "" and "--out FILE" in bad.stderr


def test_tables_off_a_terminal_are_never_cut(results, tmp_path):
    """The same words whatever COLUMNS says: headers, sources and the pool's path are whole."""
    _, w = results["score"]
    long_name = "a_source_with_a_rather_long_name_for_a_narrow_terminal"
    outs = []
    for columns in (40, 300):
        pool = tmp_path / f"pool-{columns}-with-a-long-directory-name-that-would-wrap"
        proc = _run(["curate", "score", "--teacher", str(w / "teacher.pt"), "--pool", str(pool), "--source",
                     f"{long_name}=synthetic:noise?n=20&size=8", "--no-progress"], columns)  # fmt: skip
        assert str(pool) in proc.stdout and long_name in proc.stdout
        for word in ("source", "units", "skipped", "rescored", "removed", "rows", "errors", "samples/s"):
            assert word in proc.stdout.split(), word
        assert "…" not in proc.stdout
        keys = _run(["pipelines", "keys", "select"], columns).stdout
        outs.append(keys)
        assert "Column or SQL expression ranking samples (higher = better)." in keys
    assert outs[0] == outs[1]

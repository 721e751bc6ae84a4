"""Each option is declared once: every config field is a CLI option and a job key, or says why it is not."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from curate import config as curate_config
from curate.cli import app as curate_app
from distill import config as distill_config
from distill.cli import app as distill_app
from kdcore.errors import UserError
from pipelines.run import SPECS, keys, load_job

COMMANDS = [
    (curate_app, "score", curate_config.ScoreConfig),
    (curate_app, "compact", curate_config.CompactConfig),
    (curate_app, "index", curate_config.IndexConfig),
    (curate_app, "sql", curate_config.SqlConfig),
    (curate_app, "select", curate_config.SelectConfig),
    (curate_app, "report", curate_config.ReportConfig),
    (curate_app, "export", curate_config.ExportConfig),
    (distill_app, "train", distill_config.TrainConfig),
    (distill_app, "finetune", distill_config.FinetuneConfig),
    (distill_app, "eval", distill_config.EvalConfig),
]


@pytest.mark.parametrize("app, name, cls", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_every_config_field_is_a_cli_option_or_says_why_not(app, name, cls):
    command = typer.main.get_command(app).commands[name]
    params = {p.name for p in command.params}
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli_name") or f.name
        assert (cli in params) != bool(f.metadata.get("cli_reason")), f"{name}: {f.name}"
        assert f.metadata.get("help"), f"{name}: {f.name} has no help text"


@pytest.mark.parametrize("stage", [s for s, spec in SPECS.items() if spec.config is not None])
def test_every_config_field_is_a_job_key_or_says_why_not(stage):
    listed = {k.replace("-", "_") for k, _, _ in keys(stage)}
    for f in dataclasses.fields(SPECS[stage].config):
        assert (f.name in listed) != bool(f.metadata.get("toml_reason")), f"[{stage}] {f.name}"


JOB = """
[teacher]
spec = "t.pt"
[score]
sources = ["n=synthetic:noise?n=10"]
max-pixels = 1000
odin-eps = 0.002
odin-temperature = 10
[select]
strategy = "balanced"
n = 5
[export]
[distill]
labels = "true"
loss = "ce"
init = "runs/prev"
warmup = 0.1
log-every = 7
steps = 20
"""


def test_options_that_had_drifted_are_reachable_from_both(tmp_path):
    job = load_job(str(_write(tmp_path, JOB)))
    score, train = job.configs["score"], job.configs["distill"]
    assert (score.max_pixels, score.odin_eps, score.odin_temperature) == (1000, 0.002, 10.0)
    assert (train.labels, train.init, train.warmup, train.log_every) == ("true", "runs/prev", 0.1, 7)
    assert train.shards.endswith("export/shards") and train.out.endswith("distill/run")  # supplied by the job
    params = {p.name for p in typer.main.get_command(distill_app).commands["train"].params}
    assert {"warmup", "log_every", "labels", "init"} <= params
    params = {p.name for p in typer.main.get_command(curate_app).commands["score"].params}
    assert {"max_pixels", "odin_eps", "odin_temperature", "max_bytes"} <= params


@pytest.mark.parametrize(
    "table, message",
    [
        ('[select]\nstrategy = "magic"', "unknown [select] strategy 'magic'"),
        ('[select]\nstrategy = "balanced"', "needs [select] n"),
        ("[distill]\nsteps = 0", "[distill] steps must be at least 1"),
        ('[distill]\nsteps = 10\nlabels = "maybe"', "[distill] labels must be teacher or true"),
        ('[score]\nsources = ["x=synthetic:noise"]\nbatch-size = 0', "line 5: [score] batch-size must be > 0"),
        ('[score]\nsources = ["x=synthetic:noise"]\npool = "elsewhere"', "unknown key 'pool'"),
    ],
)
def test_job_values_are_checked_by_the_stage_configs(tmp_path, table, message):
    text = '[teacher]\nspec = "t.pt"\n[score]\nsources = ["n=synthetic:noise?n=10"]\n[export]\n[select]\n' \
           'strategy = "random"\nn = 3\n'  # fmt: skip
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_job(str(_write(tmp_path, _merge(text, table))))


def _merge(base: str, table: str) -> str:
    """`base` with the table of `table` replaced by it (or added)."""
    name = table.splitlines()[0]
    blocks, current = {}, None
    for line in base.strip().splitlines():
        if line.startswith("["):
            current = line
            blocks[current] = []
        else:
            blocks[current].append(line)
    blocks[name] = table.splitlines()[1:]
    return "\n".join(f"{k}\n" + "\n".join(v) for k, v in blocks.items()) + "\n"


def _write(tmp_path, text: str):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path

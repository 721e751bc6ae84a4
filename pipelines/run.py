"""`pipeline run JOB.toml`: every stage from one spec, cached by fingerprint, resumable.

A job names its stages as TOML tables: [teacher] (an existing `spec`, or a labelled `source` to train one
with `distill train --loss ce --labels true`), [synthesize] (teacher-guided images, scored as the source
`synth`), [score], [index], [select], [export], [eval] (a labelled
`source` to evaluate on), [distill], [report]. A table's keys are the fields of the stage's config, the
same options as its CLI command (`per-class` or `per_class`; `pipeline keys STAGE` lists them); the job
supplies the paths between stages. Each stage writes under the job's work directory;
`STAGE/.stage.json` records the fingerprint of its parameters and of what it reads (the stages before it,
and the content of every file the teacher spec names), and is written last. A stage whose fingerprint is
unchanged is skipped; one that changed runs again, from scratch; one that was interrupted runs again with
its own resume (units, shards, checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from curate.config import ExportConfig, IndexConfig, ReportConfig, ScoreConfig, SelectConfig, SynthesizeConfig
from distill.config import TrainConfig
from kdcore import storage
from kdcore.errors import UserError
from kdcore.options import from_table, job_words, toml_fields, toml_types

SYNTH_SOURCE = "synth"  # the source name [score] gives the [synthesize] stage's images
STAGES = ("teacher", "synthesize", "score", "index", "select", "export", "eval", "distill", "report")


@dataclass(frozen=True)
class StageSpec:
    config: type | None  # the config whose TOML fields are the table's keys
    extra: dict[str, tuple[type, ...]] = field(default_factory=dict)  # keys of the job itself
    help: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # the stage this one reads
    reads: tuple[str, ...] = ()  # the stages whose fingerprints feed this one's


SPECS: dict[str, StageSpec] = {
    "job": StageSpec(None, {"name": (str,), "work": (str,)},
                     {"name": "the job's name", "work": "its work directory (default work/NAME)"}),
    "teacher": StageSpec(TrainConfig, {"spec": (str,), "source": (str,)},
                         {"spec": "an existing teacher (any teacher spec)",
                          "source": "a labelled source to train the teacher on (supervised distill train)"}),
    "synthesize": StageSpec(SynthesizeConfig, reads=("teacher",)),
    "score": StageSpec(ScoreConfig, needs=None, reads=("teacher", "synthesize")),
    "index": StageSpec(IndexConfig, needs="score", reads=("score",)),
    "select": StageSpec(SelectConfig, needs="score", reads=("score", "index")),
    "export": StageSpec(ExportConfig, needs="select", reads=("select",)),
    "eval": StageSpec(None, {"source": (str, list)}, {"source": "labelled source(s) to evaluate on"}),
    "distill": StageSpec(TrainConfig, {"online": (bool,), "rounds": (int,)},
                         {"online": "the job's teacher labels every augmented or mixed view",
                          "rounds": "more rounds after the first student, each drawing the samples it disagrees with "
                                    "the teacher on most (pipelines/rounds.py); stops when held-back agreement stops "
                                    "rising"},
                         needs="export", reads=("teacher", "export", "eval")),
    "report": StageSpec(ReportConfig, needs="score", reads=("score", "select")),
}  # fmt: skip


@dataclass
class Job:
    path: Path
    name: str
    work: Path
    stages: dict[str, dict[str, Any]]  # stage -> the table's values (normalised keys)
    configs: dict[str, Any] = field(default_factory=dict)  # stage -> its config, built and checked

    def url(self, *parts: str) -> str:
        return str(self.work.joinpath(*parts))

    @property
    def teacher(self) -> str:
        t = self.stages["teacher"]
        return t["spec"] if "spec" in t else self.url("teacher", "run")


@dataclass
class StageRun:
    stage: str
    action: str  # run | skip
    reason: str
    seconds: float = 0.0


@dataclass
class RunResult:
    job: Job
    stages: list[StageRun] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ spec


def load_job(path: str) -> Job:
    """Parse and check a job: every table and key known and typed, every stage's config built (so its
    values are checked as the CLI checks them) before anything runs."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no job spec at {path}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a TOML job spec (not UTF-8 text); give the job's .toml file") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}") from None
    tables: dict[str, dict[str, Any]] = {}
    for table, values in raw.items():
        if table not in SPECS:
            raise UserError(f"{path} line {_line(text, table)}: unknown stage [{table}]; stages: {', '.join(STAGES)}")
        if not isinstance(values, dict):
            raise UserError(f"{path} line {_line(text, table)}: '{table}' must be a table, [{table}]")
        _check_extra(path, text, table, values)
        tables[table] = values
    job_opts = tables.pop("job", {})
    if "teacher" not in tables or not (("spec" in tables["teacher"]) ^ ("source" in tables["teacher"])):
        raise UserError(f"{path} line {_line(text, 'teacher')}: [teacher] needs exactly one of 'spec' or 'source'")
    for stage in tables:
        needed = SPECS[stage].needs
        if needed and needed not in tables:
            raise UserError(f"{path} line {_line(text, stage)}: [{stage}] needs a [{needed}] stage")
    if "score" in tables and "sources" not in tables["score"]:
        raise UserError(f"{path} line {_line(text, 'score')}: [score] needs 'sources'")
    if "eval" in tables and "source" not in tables["eval"]:
        raise UserError(f"{path} line {_line(text, 'eval')}: [eval] needs 'source'")
    rounds = tables.get("distill", {}).get("rounds", 1)
    if rounds < 1:
        raise UserError(f"{path} line {_line(text, 'rounds', 'distill')}: [distill] rounds must be >= 1, got {rounds}")
    if rounds > 1 and tables["distill"].get("online"):
        raise UserError(f"{path} line {_line(text, 'rounds', 'distill')}: [distill] rounds draws offline shards; it "
                        "does not combine with online = true")  # fmt: skip
    name = job_opts.get("name", p.stem)
    work = Path(storage.target(job_opts.get("work", f"work/{name}"), f"{path}: [job] work"))
    if work.exists() and not work.is_dir():
        raise UserError(f"{path}: work = {work} is a file; give a directory")
    job = Job(p, name, work, {t: {k.replace("-", "_"): v for k, v in vals.items()} for t, vals in tables.items()})
    for stage in tables:
        job.configs[stage] = _build(job, stage, tables[stage], text)
    _check_specs(job)
    return job


def _check_specs(job: Job) -> None:
    """Parse every teacher and source spec the stages will read, as the stages parse them (nothing is read), so
    `--dry-run` refuses what the run would."""
    from curate.sources import parse_source

    teacher = job.stages["teacher"]
    specs = [("teacher", teacher["source"])] if "source" in teacher else []
    for stage, attr in (("score", "sources"), ("eval", "sources"), ("select", "references")):
        if stage in job.configs:
            specs += [(stage, spec) for spec in getattr(job.configs[stage], attr)]
    for stage, spec in specs:
        try:
            parse_source(spec)
        except UserError as e:
            raise UserError(f"{job.path} [{stage}]: {e}") from None
    if "spec" in teacher:
        _check_teacher(str(job.path), teacher["spec"])


def _check_teacher(where: str, spec: str) -> None:
    """The teacher spec's kind is known, or it names a checkpoint or run directory (as kdcore.models.load
    decides; the weights are read when the teacher stage runs)."""
    from kdcore.models.kinds import TEACHER_KINDS, usage
    from kdcore.specs import split_options

    head, _ = split_options(spec.strip(), f"teacher spec {storage.redact(spec)!r}")
    kind, sep, _ = head.partition(":")
    remote = storage.scheme(head) not in ("", "pipe")  # a checkpoint or run directory on object storage
    if head and ((sep and kind in TEACHER_KINDS) or remote or Path(head).exists() or head.endswith((".pt", ".pth"))):
        return
    raise UserError(f"{where} [teacher]: unknown teacher spec {storage.redact(spec)!r}: use {usage()}")


def _check_extra(path: str, text: str, table: str, values: dict[str, Any]) -> None:
    spec = SPECS[table]
    for key, value in values.items():
        k = key.replace("-", "_")
        if k in spec.extra:
            want = spec.extra[k]
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
                raise UserError(f"{path} line {_line(text, key, table)}: '{key}' in [{table}] must be "
                                f"{' or '.join(t.__name__ for t in want)}, got {value!r}")  # fmt: skip
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise UserError(f"{path} line {_line(text, key, table)}: '{key}' must be a list of strings")
        elif spec.config is None or k not in toml_fields(spec.config):
            known = sorted(set(spec.extra) | ({f.name for f in toml_fields(spec.config).values()} if spec.config
                                              else set()))  # fmt: skip
            raise UserError(f"{path} line {_line(text, key, table)}: unknown key '{key}' in [{table}]; known: "
                            f"{', '.join(known)}")  # fmt: skip


def _build(job: Job, stage: str, table: dict[str, Any], text: str) -> Any:
    """The stage's config from its table and the paths the job supplies (checked by the config itself)."""
    spec = SPECS[stage]
    values = {k: v for k, v in table.items() if k.replace("-", "_") not in spec.extra}
    where = str(job.path)

    def line(key: str) -> int:
        return _line(text, key, stage)

    def build(cls: type, vals: dict[str, Any], **fixed: Any) -> Any:
        return from_table(cls, vals, where, stage, line, **fixed)

    pool, sel = job.url("score", "pool"), job.url("select", "selection")
    try:
        if stage == "teacher":
            if "spec" in job.stages[stage]:
                return None
            given = {k.replace("-", "_") for k in values}
            values = {"steps": 1000, **values} if "epochs" not in given and "steps" not in given else values
            supervised = {k: v for k, v in (("loss", "ce"), ("labels", "true")) if k not in given}
            return build(
                TrainConfig, values, shards=job.url("teacher", "shards"), out=job.url("teacher", "run"), **supervised
            )
        if stage == "synthesize":
            if values.get("method") == "boundary" and "source" not in values:  # the pool's own images
                values = {**values, "source": job.stages.get("score", {}).get("sources", [])}
            return build(SynthesizeConfig, values, teacher=job.teacher, out=job.url("synthesize", "images"))
        if stage == "score":
            if "synthesize" in job.stages:
                values = {**values, "sources": [*values.get("sources", []), f"{SYNTH_SOURCE}=folder:"
                                                 f"{job.url('synthesize', 'images')}"]}  # fmt: skip
            return build(ScoreConfig, values, teacher=job.teacher, pool=pool)
        if stage == "index":
            return build(IndexConfig, values, pool=pool)
        if stage == "select":
            return build(SelectConfig, values, pool=pool, out=sel)
        if stage == "export":
            return build(ExportConfig, values, out=job.url("export", "shards"), pool=pool, selection=sel)
        if stage == "eval":
            src = job.stages[stage]["source"]
            return ExportConfig(out=job.url("eval", "shards"), sources=[src] if isinstance(src, str) else list(src))
        if stage == "distill":
            given = {k.replace("-", "_") for k in values}
            values = {"steps": 1000, **values} if "epochs" not in given and "steps" not in given else values
            fixed = {"teacher": job.teacher} if job.stages[stage].get("online") else {}
            return build(
                TrainConfig,
                values,
                shards=job.url("export", "shards"),
                out=job.url("distill", "run"),
                eval=job.url("eval", "shards") if "eval" in job.stages else None,
                **fixed,
            )
        if stage == "report":
            return build(ReportConfig, values, pool=pool, out=job.url("report", "report"),
                         selection=sel if "select" in job.stages else None)  # fmt: skip
    except TypeError as e:  # a value given twice (e.g. a key the job supplies)
        raise UserError(f"{where} [{stage}]: {e}") from None
    raise AssertionError(stage)


def _line(text: str, key: str, table: str | None = None) -> int:
    """1-based line of `key` (inside [table] when given) or of the table header."""
    lines = text.splitlines()
    start = 0
    if table:
        start = next((i for i, ln in enumerate(lines) if re.match(rf"\s*\[\s*{re.escape(table)}\s*\]", ln)), 0)
        pat = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
    else:
        pat = re.compile(rf"\s*\[\s*{re.escape(key)}\s*\]")
    for i in range(start, len(lines)):
        if pat.match(lines[i]):
            return i + 1
    return start + 1


def keys(stage: str) -> list[tuple[str, str, str]]:
    """(key, TOML types, help) of a stage's table, for `pipeline keys`."""
    spec = SPECS[stage]
    out = [(k, " or ".join(t.__name__ for t in types), spec.help.get(k, "")) for k, types in spec.extra.items()]
    if spec.config is not None:
        for f in dataclasses.fields(spec.config):
            if not f.metadata.get("toml_reason"):
                types = " or ".join(t.__name__ for t in toml_types(spec.config, f))
                out.append((f.name.replace("_", "-"), types, f.metadata.get("help", "")))
    return out


# ------------------------------------------------------------------------------------------ running


def run(path: str, start: str | None = None, force: bool = False, dry_run: bool = False,
        show_progress: bool = True, log: Callable[[str], None] = print) -> RunResult:  # fmt: skip
    job = load_job(path)
    if start and start not in job.stages:
        raise UserError(f"--from {start}: the job has no such stage; it has "
                        f"{', '.join(s for s in STAGES if s in job.stages)}")  # fmt: skip
    job.work.mkdir(parents=True, exist_ok=True)
    result = RunResult(job)
    prints: dict[str, str] = {}
    forced = force
    for stage in STAGES:
        if stage not in job.stages:
            continue
        forced = forced or stage == start
        params = job.stages[stage]
        upstream = {s: prints[s] for s in SPECS[stage].reads if s in prints}
        fp = fingerprint(stage, params, upstream, job)
        prints[stage] = fp
        marker = job.work / stage / ".stage.json"
        old = storage.read_json(str(marker), ".stage.json") if marker.is_file() else {}
        if not forced and old.get("fingerprint") == fp and old.get("complete"):
            result.stages.append(StageRun(stage, "skip", "unchanged since it completed"))
            continue
        changed = old.get("fingerprint") not in (None, fp)
        reason = "forced" if forced else ("parameters or inputs changed" if changed
                                          else ("resuming" if old else "not run yet"))  # fmt: skip
        if dry_run:
            result.stages.append(StageRun(stage, "run", reason))
            continue
        if forced or changed:
            shutil.rmtree(job.work / stage, ignore_errors=True)
        (job.work / stage).mkdir(parents=True, exist_ok=True)
        storage.write_json(str(marker), {"fingerprint": fp, "complete": False, "params": params})
        log(f"[{stage}] {reason}")
        t0 = time.perf_counter()
        cfg = job.configs[stage]
        if cfg is not None and hasattr(cfg, "show_progress"):
            cfg = dataclasses.replace(cfg, show_progress=show_progress)
        try:
            info = RUNNERS[stage](job, cfg)
        except UserError as e:
            raise UserError(in_job_words(job, stage, str(e))) from None
        seconds = time.perf_counter() - t0
        storage.write_json(str(marker), {"fingerprint": fp, "complete": True, "params": params, "seconds": seconds,
                                         "info": info})  # fmt: skip
        result.stages.append(StageRun(stage, "run", reason, seconds))
    if not dry_run:
        result.summary = summarise(job)
        storage.write_json(job.url("summary.json"), result_dict(result))
    return result


def result_dict(res: RunResult, dry_run: bool = False) -> dict[str, Any]:
    """What `pipeline run --json` prints and WORK/summary.json holds: the job, each stage's action, the summary."""
    from kdcore.output import jsonable

    return jsonable(
        {
            "job": res.job.name,
            "spec": str(res.job.path),
            "work": str(res.job.work),
            "dry_run": dry_run,
            "stages": [dataclasses.asdict(s) for s in res.stages],
            "summary": res.summary,
            "summary_file": None if dry_run else res.job.url("summary.json"),
        }
    )


def in_job_words(job: Job, stage: str, message: str) -> str:
    """A stage's error in the job's words: the CLI flags it names become `[stage] key` (kdcore.options.job_words),
    prefixed with the job spec (and the stage, when no key is named)."""
    spec = SPECS[stage]
    text, key = job_words(message, stage, spec.config, tuple(spec.extra))
    if key is None:
        return f"{job.path} [{stage}]: {text}"
    lines = job.path.read_text(errors="replace")
    header = _line(lines, stage)  # where the key is not written out (a value the job left to its default)
    at = next((n for k in (key, key.replace("-", "_")) if (n := _line(lines, k, stage)) != header), header)
    return f"{job.path} line {at}: {text}"


def fingerprint(stage: str, params: dict, upstream: dict[str, str], job: Job) -> str:
    """Hash of the stage's parameters, its upstream fingerprints, and for an existing teacher the content
    of every file its spec reads (weights, TorchScript file, factory module, checkpoint, classes file)."""
    h = hashlib.sha256(json.dumps({"stage": stage, "params": params, "upstream": upstream}, sort_keys=True,
                                  default=str).encode())  # fmt: skip
    if stage == "teacher" and "spec" in params:
        from kdcore.models import spec_files

        for f in spec_files(params["spec"]):
            h.update(f.encode())
            h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ stages


def _teacher(job: Job, cfg: TrainConfig | None) -> dict:
    if cfg is None:
        from kdcore import models

        return {"spec": job.teacher, "classes": len(models.load(job.teacher).classes)}
    from curate.export import export
    from distill.train import train

    source = job.stages["teacher"]["source"]
    export(ExportConfig(out=cfg.shards, sources=[source], shard_size=10_000, show_progress=cfg.show_progress))
    res = train(dataclasses.replace(cfg, resume=storage.exists(storage.join(cfg.out, "checkpoint.pt"))))
    return {"spec": cfg.out, "steps": res.steps}


def _synthesize(job: Job, cfg: SynthesizeConfig) -> dict:
    from curate.synthesize import synthesize

    res = synthesize(cfg)
    return {"images": res.images, "target_hit": res.target_hit, "confidence": res.confidence, "moved": res.moved}


def _score(job: Job, cfg: ScoreConfig) -> dict:
    from curate.score import score

    res = score(cfg)
    if res.error_rate_exceeded:
        raise UserError(f"error rate {res.error_rate:.2%} exceeds max_error_rate; see {res.pool}/errors/")
    return {"rows": res.rows, "error_rate": res.error_rate, "failed_units": [list(f) for f in res.failed_units]}


def _index(job: Job, cfg: IndexConfig) -> dict:
    from curate.index import index

    res = index(cfg)
    return {"kind": res.kind, "recall_at_10": res.recall_at_10}


def _select(job: Job, cfg: SelectConfig) -> dict:
    from curate.select import select

    res = select(cfg)
    return {"rows": res.rows, "per_source": res.per_source, "rel_entropy": res.rel_entropy}


def _export(job: Job, cfg: ExportConfig) -> dict:
    from curate.export import export

    res = export(cfg)
    return {"samples": res.samples, "shards": res.shards, "errors": res.errors}


def _distill(job: Job, cfg: TrainConfig) -> dict:
    from distill.train import train

    res = train(dataclasses.replace(cfg, resume=storage.exists(storage.join(cfg.out, "checkpoint.pt"))))
    info = {"steps": res.steps, **res.final}
    rounds = job.stages["distill"].get("rounds", 1)
    if rounds > 1:
        from pipelines.rounds import run_rounds

        state = run_rounds(job.work, rounds, job.configs["score"], job.configs["select"], job.configs["export"], cfg,
                           cfg.show_progress)  # fmt: skip
        info["rounds"] = [{k: r[k] for k in ("round", "drawn", "held_agreement")} for r in state["rounds"]]
        info["best_round"], info["stopped"] = state["best"], state["stopped"]
    return info


def _report(job: Job, cfg: ReportConfig) -> dict:
    from curate.report import report

    return {"html": report(cfg).html}


RUNNERS: dict[str, Callable[[Job, Any], dict]] = {
    "teacher": _teacher, "synthesize": _synthesize, "score": _score, "index": _index, "select": _select,
    "export": _export, "distill": _distill, "eval": _export, "report": _report,
}  # fmt: skip


# ------------------------------------------------------------------------------------------ summary


def summarise(job: Job) -> dict[str, Any]:
    """Teacher and student accuracy, their agreement, the selection, wall time per stage."""
    out: dict[str, Any] = {"seconds": {}}
    for stage in STAGES:
        m = job.work / stage / ".stage.json"
        if m.is_file():
            out["seconds"][stage] = round(json.loads(m.read_text()).get("seconds", 0.0), 1)
    sel = job.work / "select" / "selection" / "selection.json"
    if sel.is_file():
        info = json.loads(sel.read_text())
        out["selection"] = {"rows": info["rows"], "per_source": info["per_source"], "rel_entropy": info["rel_entropy"]}
    rounds = job.work / "distill" / "rounds" / "rounds.json"
    if rounds.is_file():
        info = json.loads(rounds.read_text())
        out["rounds"] = {"held_agreement": [r["held_agreement"] for r in info["rounds"]], "best": info.get("best"),
                         "stopped": info.get("stopped")}  # fmt: skip
    student = job.work / "distill" / "run" / "student.pt"
    if "eval" in job.stages and (job.work / "eval" / "shards" / "manifest.json").is_file():
        from distill.evaluate import compare

        out.update(compare(job.teacher, str(student) if student.is_file() else None, job.url("eval", "shards")))
    rep = job.work / "report" / "report"
    if (rep / "report.json").is_file():
        info = json.loads((rep / "report.json").read_text())
        if info.get("selection") and "precision" in info["selection"]:
            out.setdefault("selection", {})["precision"] = info["selection"]["precision"]
            out["selection"]["task_share_of_pool"] = info["selection"]["share_of_task_in_pool"]
        if info.get("auroc"):
            out["auroc"] = info["auroc"]
        out["report"] = str(rep / "report.html")
    if student.is_file():
        out["student"] = str(student)
    if "eval" in job.stages:
        storage.write_json(job.url("eval", "eval.json"), out)
    return out

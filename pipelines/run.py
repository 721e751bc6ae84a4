"""`pipeline run JOB.toml`: every stage from one spec, cached by fingerprint, resumable.

A job names its stages as TOML tables, with keys named like the CLI options (`per-class` or
`per_class`): [teacher] (an existing `spec`, or a labelled `source` to train one with `distill train
--loss ce --labels true`), [score], [index], [select], [export], [distill], [eval], [report]. Each stage
writes under the job's work directory; `STAGE/.stage.json` records the fingerprint of its parameters and
of the stages it reads, and is written last. A stage whose fingerprint is unchanged is skipped; one that
changed runs again, from scratch; one that was interrupted runs again with its own resume (units, shards,
checkpoints).
"""

from __future__ import annotations

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

from curate.errors import UserError
from curate.pool import write_json_atomic

STAGES = ("teacher", "score", "index", "select", "export", "eval", "distill", "report")
INT, NUM, STR, BOOL = int, (int, float), str, bool  # the TOML types each key accepts
TRAIN = {"student": STR, "steps": INT, "epochs": NUM, "batch_size": INT, "lr": NUM, "seed": INT}
KEYS: dict[str, dict[str, Any]] = {  # stage -> key -> accepted TOML type(s)
    "job": {"name": STR, "work": STR},
    "teacher": {"spec": STR, "source": STR, **TRAIN},
    "score": {"sources": list, "batch_size": INT, "workers": INT, "device": STR, "logits": STR, "embed_layer": STR,
              "max_error_rate": NUM, "odin": BOOL, "retries": INT, "engine": STR, "ray_address": STR},
    "index": {"kind": STR, "memory": STR, "per_source": BOOL},
    "select": {"strategy": STR, "where": STR, "score": STR, "n": INT, "per_class": INT, "threshold": NUM,
               "fraction": NUM, "temperature": NUM, "gamma": NUM, "replace": BOOL, "reference": (STR, list), "k": INT,
               "nprobe": INT, "clusters": INT, "dedup": STR, "seed": INT},
    "export": {"shard_size": INT, "soft_labels": STR, "workers": INT, "seed": INT},
    "distill": {**TRAIN, "weight_decay": NUM, "optimizer": STR, "loss": STR, "temperature": NUM, "alpha": NUM,
                "topk_classes": INT, "weights": BOOL, "eval_every": INT, "checkpoint_every": INT, "device": STR,
                "workers": INT, "shuffle_buffer": INT, "flip": BOOL, "online": BOOL, "online_fraction": NUM,
                "crop": INT, "randaugment": BOOL, "mixup": NUM, "cutmix": NUM, "feature_weight": NUM,
                "feature_layers": STR, "rkd_distance": NUM, "rkd_angle": NUM},
    "eval": {"source": STR},
    "report": {"score": STR, "thumbs": INT},
}  # fmt: skip
REQUIRED = {"score": ("sources",), "select": ("strategy",), "eval": ("source",)}
NEEDS = {"index": "score", "select": "score", "export": "select", "distill": "export", "report": "score"}


@dataclass
class Job:
    path: Path
    name: str
    work: Path
    stages: dict[str, dict[str, Any]]


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
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no job spec at {path}")
    text = p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}") from None
    stages: dict[str, dict[str, Any]] = {}
    for table, values in raw.items():
        if table not in KEYS:
            raise UserError(f"{path} line {_line(text, table)}: unknown stage [{table}]; stages: {', '.join(STAGES)}")
        if not isinstance(values, dict):
            raise UserError(f"{path} line {_line(text, table)}: '{table}' must be a table, [{table}]")
        norm = {}
        for key, value in values.items():
            k = key.replace("-", "_")
            if k not in KEYS[table]:
                raise UserError(f"{path} line {_line(text, key, table)}: unknown key '{key}' in [{table}]; "
                                f"known: {', '.join(KEYS[table])}")  # fmt: skip
            want = KEYS[table][k] if isinstance(KEYS[table][k], tuple) else (KEYS[table][k],)
            if not isinstance(value, want) or (isinstance(value, bool) and BOOL not in want):
                names = " or ".join(t.__name__ for t in want)
                raise UserError(f"{path} line {_line(text, key, table)}: '{key}' in [{table}] must be {names}, "
                                f"got {value!r}")  # fmt: skip
            norm[k] = value
        for key in REQUIRED.get(table, ()):
            if key not in norm:
                raise UserError(f"{path} line {_line(text, table)}: [{table}] needs '{key}'")
        stages[table] = norm
    job_opts = stages.pop("job", {})
    if "teacher" not in stages or not (("spec" in stages["teacher"]) ^ ("source" in stages["teacher"])):
        raise UserError(f"{path} line {_line(text, 'teacher')}: [teacher] needs exactly one of 'spec' or 'source'")
    for stage, needed in NEEDS.items():
        if stage in stages and needed not in stages:
            raise UserError(f"{path} line {_line(text, stage)}: [{stage}] needs a [{needed}] stage")
    if "distill" in stages and "export" not in stages:
        raise UserError(f"{path}: [distill] needs [export]")
    name = job_opts.get("name", p.stem)
    work = Path(job_opts.get("work", f"work/{name}"))
    return Job(p, name, work, stages)


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


# ------------------------------------------------------------------------------------------ running


def run(path: str, start: str | None = None, force: bool = False, dry_run: bool = False,
        show_progress: bool = True, log: Callable[[str], None] = print) -> RunResult:  # fmt: skip
    job = load_job(path)
    if start and start not in job.stages:
        raise UserError(
            f"--from {start}: the job has no such stage; it has {', '.join(s for s in STAGES if s in job.stages)}"
        )
    job.work.mkdir(parents=True, exist_ok=True)
    result = RunResult(job)
    prints: dict[str, str] = {}
    forced = force
    for stage in STAGES:
        if stage not in job.stages:
            continue
        forced = forced or stage == start
        params = job.stages[stage]
        upstream = {s: prints[s] for s in _reads(stage, job) if s in prints}
        fp = _fingerprint(stage, params, upstream, job)
        prints[stage] = fp
        marker = job.work / stage / ".stage.json"
        old = json.loads(marker.read_text()) if marker.is_file() else {}
        if not forced and old.get("fingerprint") == fp and old.get("complete"):
            result.stages.append(StageRun(stage, "skip", "unchanged since it completed"))
            continue
        reason = "forced" if forced else ("parameters or inputs changed" if old.get("fingerprint") not in (None, fp)
                                          else ("resuming" if old else "not run yet"))  # fmt: skip
        if dry_run:
            result.stages.append(StageRun(stage, "run", reason))
            continue
        fresh = forced or old.get("fingerprint") not in (None, fp)
        if fresh:
            shutil.rmtree(job.work / stage, ignore_errors=True)
        (job.work / stage).mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"fingerprint": fp, "complete": False, "params": params})
        log(f"[{stage}] {reason}")
        t0 = time.perf_counter()
        info = RUNNERS[stage](job, params, show_progress)
        seconds = time.perf_counter() - t0
        write_json_atomic(marker, {"fingerprint": fp, "complete": True, "params": params, "seconds": seconds,
                                   "info": info})  # fmt: skip
        result.stages.append(StageRun(stage, "run", reason, seconds))
    if not dry_run:
        result.summary = summarise(job)
    return result


def _reads(stage: str, job: Job) -> list[str]:
    return {
        "score": ["teacher"], "index": ["score"], "select": ["score", "index"], "export": ["select"],
        "distill": ["teacher", "export", "eval"], "report": ["score", "select"],
    }.get(stage, [])  # fmt: skip


def _fingerprint(stage: str, params: dict, upstream: dict[str, str], job: Job) -> str:
    blob = json.dumps({"stage": stage, "params": params, "upstream": upstream}, sort_keys=True, default=str)
    if stage == "teacher" and "spec" in params:  # an existing teacher: its file is part of the input
        f = Path(params["spec"].split("?")[0])
        f = f / "student.pt" if f.is_dir() else f
        if f.is_file():
            blob += hashlib.sha256(f.read_bytes()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_spec(job: Job) -> str:
    t = job.stages["teacher"]
    return t["spec"] if "spec" in t else str(job.work / "teacher" / "run")


# ------------------------------------------------------------------------------------------ stages


def _teacher(job: Job, p: dict, show: bool) -> dict:
    if "spec" in p:
        from distill import models

        try:
            return {"spec": p["spec"], "classes": len(models.load(p["spec"]).classes)}
        except models.SpecError as e:
            raise UserError(str(e)) from None
    from curate.export import ExportConfig, export
    from distill.train import TrainConfig, train

    d = job.work / "teacher"
    export(ExportConfig(out=str(d / "shards"), sources=[p["source"]], shard_size=10_000, show_progress=show))
    steps = p.get("steps") if "epochs" not in p else None
    res = train(TrainConfig(shards=str(d / "shards"), out=str(d / "run"), student=p.get("student", "cnn-small"),
                            steps=steps if steps or "epochs" in p else 1000, epochs=p.get("epochs"),
                            batch_size=p.get("batch_size", 128), lr=p.get("lr", 3e-3), seed=p.get("seed", 0),
                            loss="ce", labels="true", resume=(d / "run" / "checkpoint.pt").exists(),
                            show_progress=show))  # fmt: skip
    return {"spec": str(d / "run"), "steps": res.steps}


def _score(job: Job, p: dict, show: bool) -> dict:
    from curate.score import ScoreConfig, score

    opts = {k: v for k, v in p.items() if k != "sources"}
    pool = str(job.work / "score" / "pool")
    res = score(
        ScoreConfig(teacher=teacher_spec(job), sources=list(p["sources"]), pool=pool, show_progress=show, **opts)
    )
    if res.error_rate_exceeded:
        raise UserError(f"error rate {res.error_rate:.2%} exceeds max_error_rate; see {res.pool}/errors/")
    return {"rows": res.rows, "error_rate": res.error_rate, "failed_units": [list(f) for f in res.failed_units]}


def _index(job: Job, p: dict, show: bool) -> dict:
    from curate.index import index

    res = index(str(job.work / "score" / "pool"), show_progress=show, **p)
    return {"kind": res.kind, "recall_at_10": res.recall_at_10}


def _select(job: Job, p: dict, show: bool) -> dict:
    from curate.select import SelectConfig, select

    p = dict(p)
    refs = p.pop("reference", [])
    res = select(SelectConfig(pool=str(job.work / "score" / "pool"), out=str(job.work / "select" / "selection"),
                              references=[refs] if isinstance(refs, str) else list(refs), **p))  # fmt: skip
    return {"rows": res.rows, "per_source": res.per_source, "rel_entropy": res.rel_entropy}


def _export(job: Job, p: dict, show: bool) -> dict:
    from curate.export import ExportConfig, export

    res = export(ExportConfig(out=str(job.work / "export" / "shards"), pool=str(job.work / "score" / "pool"),
                              selection=str(job.work / "select" / "selection"), show_progress=show, **p))  # fmt: skip
    return {"samples": res.samples, "shards": res.shards, "errors": res.errors}


def _eval(job: Job, p: dict, show: bool) -> dict:
    from curate.export import ExportConfig, export

    res = export(ExportConfig(out=str(job.work / "eval" / "shards"), sources=[p["source"]], shard_size=10_000,
                              show_progress=show))  # fmt: skip
    return {"samples": res.samples}


def _distill(job: Job, p: dict, show: bool) -> dict:
    from distill.train import TrainConfig, train

    run_dir = job.work / "distill" / "run"
    p = {"steps": 1000, **p} if "epochs" not in p else dict(p)
    if p.pop("online", False):  # the job's teacher labels every augmented or mixed view
        p["teacher"] = teacher_spec(job)
    res = train(TrainConfig(shards=str(job.work / "export" / "shards"), out=str(run_dir),
                            eval=str(job.work / "eval" / "shards") if "eval" in job.stages else None,
                            resume=(run_dir / "checkpoint.pt").exists(), show_progress=show, **p))  # fmt: skip
    return {"steps": res.steps, **res.final}


def _report(job: Job, p: dict, show: bool) -> dict:
    from curate.report import report

    sel = job.work / "select" / "selection"
    res = report(str(job.work / "score" / "pool"), str(job.work / "report" / "report"),
                 selection=str(sel) if "select" in job.stages else None, **p)  # fmt: skip
    return {"html": res.html}


RUNNERS: dict[str, Callable[[Job, dict, bool], dict]] = {
    "teacher": _teacher, "score": _score, "index": _index, "select": _select, "export": _export,
    "distill": _distill, "eval": _eval, "report": _report,
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
    student = job.work / "distill" / "run" / "student.pt"
    if "eval" in job.stages and (job.work / "eval" / "shards" / "manifest.json").is_file():
        from distill.evaluate import compare

        out.update(compare(teacher_spec(job), str(student) if student.is_file() else None,
                           str(job.work / "eval" / "shards")))  # fmt: skip
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
        write_json_atomic(job.work / "eval" / "eval.json", out)
    return out

"""Rounds of distillation (`[distill] rounds = R`): after a student, draw the next shards from where it and the
teacher disagree, and train on.

Round 1 is the job's [distill] stage as it is. Each later round:
1. the last student scores the job's sources into a pool of its own (`curate score` with the student as the
   teacher: a student.pt is a teacher spec), so every pool sample has the student's logits beside the teacher's;
2. the candidates are the top 4 x N samples of the teacher's pool by the job's [select] score, under its
   `where` (N: the first selection's size); a seeded tenth of them (at most 2,000), never drawn, is held back;
3. disagreement = 1 - the student's probability of the teacher's class; the N candidates that disagree most
   join the first selection (a selection directory like any other, exported to shards);
4. the student trains on from its weights (`init`) for the job's step budget again.
The held-back agreement (the student's class = the teacher's, on the held-back samples) is measured after every
round; rounds stop when it rises by less than MIN_GAIN, and the student of the best round becomes the job's
distill/run/student.pt. Every round's parts live under distill/rounds/R/; rounds.json records each finished
round, so a killed job resumes at the first round not recorded.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from curate.config import ExportConfig, ScoreConfig, SelectConfig
from distill.config import TrainConfig
from kdcore import storage

MIN_GAIN = 0.002  # held-back agreement must rise by this much for another round
CANDIDATES = 4  # candidates = CANDIDATES x N by the job's score
HELD = (0.1, 2000)  # share of the candidates held back, at most this many


def run_rounds(work: Path, rounds: int, score_cfg: ScoreConfig, select_cfg: SelectConfig, export_cfg: ExportConfig,
               train_cfg: TrainConfig, show_progress: bool) -> dict[str, Any]:  # fmt: skip
    """Rounds 2..R after the job's first student (train_cfg.out); returns what rounds.json holds."""
    from curate.export import export
    from curate.score import score
    from distill.train import train

    root = work / "distill" / "rounds"
    state_path = root / "rounds.json"
    state = storage.read_json(str(state_path)) if state_path.is_file() else {"rounds": []}
    first = Path(train_cfg.out) / "student.pt"
    if not state["rounds"]:  # round 1's student, kept: the job's student.pt becomes the best round's at the end
        kept = root / "1" / "student.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, kept)
        state["rounds"].append({"round": 1, "student": str(kept), "drawn": 0, "held_agreement": None})
    cand, held = candidates(select_cfg)
    state["stopped"] = f"{rounds} rounds run"
    while True:
        last = state["rounds"][-1]
        spool = root / str(last["round"]) / "student-pool"  # the student's view of the pool (resumes, cached)
        score(dataclasses.replace(score_cfg, teacher=last["student"], pool=str(spool), show_progress=show_progress,
                                  batch_size=score_cfg.batch_size or 256))  # fmt: skip
        last["held_agreement"], disagreement = student_view(select_cfg.pool, str(spool), cand, held)
        storage.write_json(str(state_path), state)
        if len(state["rounds"]) >= 2 and last["held_agreement"] - state["rounds"][-2]["held_agreement"] < MIN_GAIN:
            state["stopped"] = f"round {last['round']} raised the held-back agreement by less than {MIN_GAIN}"
            break
        if last["round"] >= rounds:
            break
        here = root / str(last["round"] + 1)
        sel = here / "selection"
        drawn = draw(select_cfg, cand, held, disagreement, str(sel))
        shards = here / "shards"
        export(dataclasses.replace(export_cfg, selection=str(sel), out=str(shards), show_progress=show_progress))
        run = here / "run"
        train(dataclasses.replace(train_cfg, shards=str(shards), out=str(run), init=last["student"],
                                  resume=(run / "checkpoint.pt").is_file(), show_progress=show_progress))  # fmt: skip
        state["rounds"].append({"round": last["round"] + 1, "student": str(run / "student.pt"), "drawn": drawn,
                                "held_agreement": None})  # fmt: skip
        storage.write_json(str(state_path), state)
    best = max(state["rounds"], key=lambda r: (r["held_agreement"], -r["round"]))
    state["best"] = best["round"]
    shutil.copyfile(best["student"], first)  # the job's student: the best round's
    storage.write_json(str(state_path), state)
    return state


def candidates(cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(candidate uids by the job's score, descending; the held-back uids among them)."""
    from curate.query import connect
    from curate.select import read_selection

    con = connect(cfg.pool)
    first, _ = read_selection(cfg.out)
    n = first.num_rows
    where = f"WHERE ({cfg.where})" if cfg.where else ""
    uids = np.array([r[0] for r in con.execute(f"SELECT uid FROM samples {where} ORDER BY ({cfg.score}) DESC NULLS "
                                               f"LAST, uid LIMIT {CANDIDATES * n}").fetchall()], np.int64)  # fmt: skip
    chosen = set(first.column("uid").to_pylist())
    free = np.array([u for u in uids if u not in chosen], np.int64)
    rng = np.random.default_rng(cfg.seed)
    held = rng.choice(free, size=min(len(free), HELD[1], int(HELD[0] * len(uids))), replace=False)
    return uids, np.sort(held)


def student_view(pool: str, student_pool: str, cand: np.ndarray, held: np.ndarray) -> tuple[float, np.ndarray]:
    """(held-back agreement, disagreement of every candidate): 1 - the student's probability of the teacher's
    class, both read from the pools by uid."""
    from curate.query import connect

    t = connect(pool)
    t.register("_c", {"uid": cand})
    teacher = dict(t.execute("SELECT uid, pred FROM samples JOIN _c USING (uid)").fetchall())
    s = connect(student_pool)
    s.register("_c", {"uid": cand})
    cols = {r[0] for r in s.execute("DESCRIBE samples").fetchall()}
    logits = "logits" if "logits" in cols else None
    rows = s.execute(f"SELECT uid, {logits or 'topk_idx, topk_val, logsumexp'} FROM samples JOIN _c USING (uid)"
                     ).fetchall()  # fmt: skip
    p_teacher_class, s_pred = {}, {}
    for r in rows:
        uid, tc = r[0], teacher.get(r[0])
        if tc is None:
            continue
        if logits:
            z = np.asarray(r[1], np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            p_teacher_class[uid], s_pred[uid] = float(p[tc]), int(z.argmax())
        else:
            idx, val, lse = list(r[1]), np.asarray(r[2], np.float64), float(r[3])
            p_teacher_class[uid] = float(np.exp(val[idx.index(tc)] - lse)) if tc in idx else 0.0
            s_pred[uid] = int(idx[int(val.argmax())])
    agree = float(np.mean([s_pred[u] == teacher[u] for u in held if u in s_pred])) if len(held) else float("nan")
    disagreement = np.array([1.0 - p_teacher_class.get(int(u), 0.0) for u in cand])
    return agree, disagreement


def draw(cfg: SelectConfig, cand: np.ndarray, held: np.ndarray, disagreement: np.ndarray, out: str) -> int:
    """The first selection plus the N candidates (not held back) that disagree most, written as a selection."""
    from curate.pool import Pool
    from curate.query import connect
    from curate.select import _selection_table, read_selection, write_selection
    from curate.strategies import Picked

    first, info = read_selection(cfg.out)
    n = first.num_rows
    free = ~np.isin(cand, held)
    order = np.argsort(-disagreement[free], kind="stable")[:n]
    new = cand[free][order]
    old = first.column("uid").to_numpy()
    uid = np.concatenate([old, new[~np.isin(new, old)]])
    score = np.concatenate([np.zeros(len(old)), disagreement[free][order][~np.isin(new, old)]])
    weight = np.concatenate([first.column("weight").to_numpy().astype(np.float32),
                             np.ones(len(uid) - len(old), np.float32)])  # fmt: skip
    con = connect(cfg.pool)
    table = _selection_table(con, Picked(uid, score), weight)
    pool = Pool(cfg.pool)
    write_selection(dataclasses.replace(cfg, out=out), table, pool.meta(), pool, len(cand), {}, 0,
                    {"round_draw": f"the first selection ({len(old)}) plus the {len(uid) - len(old)} candidates the "
                     "student disagrees with most (score: 1 - the student's probability of the teacher's class)",
                     "first_selection": info.get("strategy")})  # fmt: skip
    return len(uid) - len(old)

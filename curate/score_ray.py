"""`curate score --engine ray`: the same units, parts and markers as the local engine, run by Ray.

CPU tasks read and decode one unit each (`decode_unit`, the local engine's reader); teacher actors
(one per GPU, or one on a CPU-only cluster) score a unit's batches with the local engine's
`TeacherRunner` and write its parts and marker into the pool, which therefore has to be on storage
every node sees. The driver keeps a bounded number of units in flight, retries a failed unit up to
`retries` more times (a dead actor is replaced), and reports a unit that failed every try exactly as
the local engine does: an errors/ row and no marker, so a rerun tries it again.

On a cluster: `ray start --head` on one node, `ray start --address HEAD:6379` on the others, then
`curate score --engine ray --ray-address HEAD:6379 ...` (or `auto`) from any node with kdcurate
installed in the same environment. The driver's storage variables (AWS_*, GOOGLE_*, AZURE_*, proxies: see
`kdcore.storage.environment`) travel to every worker in Ray's runtime_env, so the workers reach the pool
and the sources with the driver's credentials and endpoint.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import asdict
from typing import Any

from curate.config import ScoreConfig
from curate.pool import Pool
from curate.scoring import (
    ScoreResult,
    TeacherRunner,
    UnitBatches,
    UnitRows,
    account,
    fail_unit,
    failure_reason,
    write_unit,
)
from curate.sources import Unit, parse_source
from kdcore import progress, storage
from kdcore.errors import UserError

try:
    import ray
except ImportError:  # the optional extra
    ray = None


def decode_unit(source_spec: str, unit: Unit, spec: Any, batch_size: int, max_pixels: int, max_bytes: int
                ) -> list[dict[str, Any]]:  # fmt: skip
    """One try at reading and decoding a unit: its batches (uint8 numpy pixels). Raises on failure."""
    src = parse_source(source_spec, max_bytes)
    return list(UnitBatches({src.name: src}, [unit], spec, batch_size, max_pixels).read(0, unit))


class TeacherActor:
    """Holds the teacher on its device; scores a unit's batches and writes the unit into the pool."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = ScoreConfig(**cfg)
        self.runner = TeacherRunner(self.cfg)
        self.pool = Pool(self.cfg.pool)

    def score_unit(self, unit: Unit, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        rows = UnitRows()
        for chunk in chunks:
            self.runner.add(rows, chunk)
        return write_unit(self.pool, unit, rows, self.runner.schema, self.runner.teacher.fingerprint)


def run_ray(cfg: ScoreConfig, todo: list[Unit], input_spec: Any, result: ScoreResult) -> None:
    """Score `todo` on Ray (a new local instance, or the cluster at cfg.ray_address) into cfg.pool."""
    if ray is None:
        raise UserError("--engine ray needs Ray: pip install 'kdcurate[ray]'")
    if not todo:
        return
    started_here = not ray.is_initialized()
    if started_here:
        # the workers reach the pool and the sources with the driver's storage settings, not with whatever
        # environment `ray start` ran in on each node
        runtime_env = {"env_vars": storage.environment()}
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         runtime_env=runtime_env)  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot reach a Ray cluster at {cfg.ray_address or 'a new local instance'}: {e}") from None
    try:
        _drive(cfg, todo, input_spec, result)
    finally:
        if started_here:
            ray.shutdown()


def _drive(cfg: ScoreConfig, todo: list[Unit], input_spec: Any, result: ScoreResult) -> None:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and cfg.device != "cpu"
    actor_cls = ray.remote(num_gpus=1, num_cpus=1)(TeacherActor) if use_gpu else ray.remote(num_cpus=1)(TeacherActor)
    n_actors = gpus if use_gpu else 1
    actor_cfg = {**asdict(cfg), "show_progress": False, "device": "auto" if use_gpu else "cpu"}
    actors = [actor_cls.remote(actor_cfg) for _ in range(n_actors)]
    decode = ray.remote(num_cpus=1, max_retries=0)(decode_unit)
    specs = {parse_source(s).name: s for s in cfg.sources}
    pool = Pool(cfg.pool)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    max_in_flight = max(2, cpus + 2 * n_actors)

    queue: deque[tuple[Unit, int]] = deque((u, 0) for u in todo)
    pending: dict[Any, tuple[Unit, int, int]] = {}  # ref -> (unit, attempt, actor slot)
    turn = 0
    total = sum(u.size or 0 for u in todo) or None
    with progress.bar("scoring (ray)", total=total, enabled=cfg.show_progress) as advance:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                unit, attempt = queue.popleft()
                chunks = decode.remote(
                    specs[unit.source], unit, input_spec, cfg.batch_size, cfg.max_pixels, cfg.max_bytes
                )
                slot = turn % n_actors
                turn += 1
                pending[actors[slot].score_unit.remote(unit, chunks)] = (unit, attempt, slot)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit, attempt, slot = pending.pop(ref)
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayError as e:
                    if isinstance(e, ray.exceptions.RayActorError):  # the actor died: start another
                        actors[slot] = actor_cls.remote(actor_cfg)
                    if attempt < cfg.retries:
                        queue.append((unit, attempt + 1))
                    else:
                        fail_unit(pool, unit, failure_reason(getattr(e, "cause", None) or e), result)
                    continue
                account(result, unit.source, stats)
                advance(stats["rows"] + stats["errors"])

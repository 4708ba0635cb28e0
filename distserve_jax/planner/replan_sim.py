"""Replanning in simulation: the production controller, its live placement changes and the replanner
on the simulator's virtual clock, and the attainment-over-time numbers a replanner is judged by.

Owns:
  - `run_with_replanner(deployment, profile, requests, ...)`: serves a trace on a simulated
    deployment whose `Replanner` ticks after every controller step (as on a server's engine
    loop); the replanner's search runs inline and its answer lands once the virtual clock has
    moved by the search's CPU time; new instances join `startup_s` after a change starts. Returns
    the records, the replanner and the placement changes (`engine.placement_change`) in order.
  - `attainment_over_time(records, slo, bucket_s)`: joint attainment of the requests arriving in
    each bucket (a request never finished misses).
  - `recovery_time(series, shift_at, target)`: seconds from `shift_at` to the start of the first
    bucket from which every later bucket meets `target` (0 when none after the shift missed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from distserve_jax import metrics
from distserve_jax.metrics import SLO, RequestRecord
from distserve_jax.planner import drift as dr
from distserve_jax.planner import simulator
from distserve_jax.planner.deployment import Deployment
from distserve_jax.planner.latency_model import Profile
from distserve_jax.planner.replan_search import WindowPlanner
from distserve_jax.planner.replanner import Replanner, ReplanSettings


@dataclasses.dataclass
class ReplanRun:
    records: list[RequestRecord]
    replanner: Replanner
    changes: list[Any]  # engine PlacementChange, in the order they started (final state)
    placements: list[tuple[float, str]]  # (time, placement served from then on)


def run_with_replanner(deployment: Deployment, profile: Profile, requests: Sequence[simulator.SimRequest], *,
                       planner: WindowPlanner, planned_for: dr.PlannedWorkload, settings: ReplanSettings,
                       startup_s: float = 0.0) -> ReplanRun:
    """See the module docstring."""
    ex = simulator.SimExecutor(deployment, profile, startup_s=startup_s, num_devices=planner.budget)
    ctrl = simulator.make_controller(ex)
    rp = Replanner(ctrl, planner, planned_for, settings, background=False)
    changes: list[Any] = []
    placements = [(0.0, ctrl.current_placement().describe())]

    def on_step() -> None:
        rp.tick()
        c = ctrl.placement_change
        if c is not None:
            if not changes or changes[-1].started_at != c.started_at:
                changes.append(c)
            else:
                changes[-1] = c
            desc = ctrl.current_placement().describe()
            if desc != placements[-1][1]:
                placements.append((ctrl.clock(), desc))

    records = simulator.run(deployment, profile, requests, executor=ex, controller=ctrl, on_step=on_step)
    return ReplanRun(records, rp, changes, placements)


def attainment_over_time(records: Sequence[RequestRecord], slo: SLO, bucket_s: float,
                         end: float | None = None) -> list[tuple[float, float, int]]:
    """(bucket start, attainment, requests) for every bucket of arrivals (see the module docstring)."""
    if not bucket_s > 0:
        raise ValueError(f"bucket_s must be > 0, got {bucket_s!r}")
    end = max(r.arrival_time for r in records) if end is None else end
    n = int(end // bucket_s) + 1
    buckets: list[list[RequestRecord]] = [[] for _ in range(n)]
    for r in records:
        k = int(r.arrival_time // bucket_s)
        if k < n:
            buckets[k].append(r)
    return [(k * bucket_s, metrics.attainment(b, slo) if b else float("nan"), len(b)) for k, b in enumerate(buckets)]


def recovery_time(series: Sequence[tuple[float, float, int]], shift_at: float, target: float = 0.9) -> float | None:
    """See the module docstring; None when attainment never gets back to `target` for good."""
    after = [(t, a) for t, a, n in series if t >= shift_at and n > 0]
    if not after:
        return None
    last_miss = max((i for i, (_, a) in enumerate(after) if a < target), default=None)
    if last_miss is None:
        return 0.0
    if last_miss == len(after) - 1:
        return None
    return after[last_miss + 1][0] - shift_at

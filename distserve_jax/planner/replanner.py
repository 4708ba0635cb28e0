"""The replanner policy: when to re-run the planner, and when to move to what it proposes.

Owns the decision loop over one controller (`tick()`, called on the engine's loop after each
`Controller.step()`; it reads time only from the controller's clock):

  every `interval_s`: window = the controller's `WorkloadMonitor` over the last `window_s`
    - fewer than `min_requests` arrivals in it: nothing (missing / vanished metrics never move
      a placement: the floor of one instance per phase holds because nothing changes);
    - a placement change in progress, or less than `dwell_s` since the last one finished:
      nothing;
    - drift (`drift.detect`) of the window against the workload the current placement was
      planned for, AND against the workload last checked without a switch, on `confirm`
      consecutive ticks: plan (`WindowPlanner.propose`) on lengths sampled from the window at
      the rate to plan for:
        max(window rate, rate since the first of those ticks) + backlog / drain_s,
      where the backlog (requests not yet prefilled or waiting for a decode instance) grows at
      (arrival - completion rate) for `startup_s` more while new instances start;
  a proposal: switch (`Controller.apply_placement`) only when its predicted per-device goodput gain > `min_gain`, it
    differs from the current placement and it fits the budget; else remember the window as
    checked (hysteresis: the same drifted workload is not planned again and again).
The search takes CPU seconds: with `background=True` it runs in a thread and its result is
applied by a later `tick()` (on the engine's loop); with `background=False` (the simulator) it
runs inline and its result is applied once the virtual clock has advanced by its CPU time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Any

from absl import logging

from distserve_jax.planner import drift as dr
from distserve_jax.planner.autoplan import to_engine_placement
from distserve_jax.planner.replan_search import Proposal, WindowPlanner, same_placement

ACTIVE_STATES = ("starting", "draining")


class ReplanSettingsError(ValueError):
    """A replanner setting is out of range (the message names it)."""


@dataclasses.dataclass(frozen=True)
class ReplanSettings:
    """The replanner's knobs (the server's `--replan_*` flags; see the module docstring)."""

    interval_s: float = 10.0
    min_gain: float = 0.1
    window_s: float = 30.0
    dwell_s: float = 120.0
    confirm: int = 2
    rate_ratio: float = 1.5
    distance: float = 0.25
    min_requests: int = 20
    drain_s: float = 30.0
    startup_s: float = 30.0
    num_requests: int = 200

    def __post_init__(self):
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v >= 0 if allow_zero else v > 0)
            if not ok:
                raise ReplanSettingsError(f"replan_{name} must be a {'non-negative' if allow_zero else 'positive'} "
                                          f"number of seconds, got {v!r}")
        for name in ("interval_s", "window_s", "drain_s"):
            positive(name)
        for name in ("dwell_s", "startup_s"):
            positive(name, allow_zero=True)
        if not (isinstance(self.min_gain, (int, float)) and 0 < self.min_gain < 10):
            raise ReplanSettingsError(f"replan_min_gain must be in (0, 10) (a relative goodput gain: 0.1 = +10%), "
                                      f"got {self.min_gain!r}")
        if self.window_s < self.interval_s:
            raise ReplanSettingsError(f"replan_window_s ({self.window_s}) must be >= replan_interval_s ({self.interval_s})")
        for name in ("confirm", "min_requests", "num_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ReplanSettingsError(f"replan_{name} must be a positive integer, got {v!r}")
        try:
            self.thresholds
        except ValueError as e:
            raise ReplanSettingsError(f"replan_{e}") from None

    @property
    def thresholds(self) -> dr.DriftThresholds:
        return dr.DriftThresholds(self.rate_ratio, self.distance, self.min_requests)


@dataclasses.dataclass
class _Job:
    started_at: float
    window: Any
    drift: dr.Drift
    future: concurrent.futures.Future | None = None
    ready_at: float | None = None  # inline: when the virtual clock may apply it
    proposal: Proposal | None = None


class Replanner:
    """The policy over `controller` (see the module docstring).

    Args:
      controller: the engine core (`monitor`, `clock`, `current_placement()`, `apply_placement`,
        `placement_change`, `requests`, `migration_queue`).
      planner: the `WindowPlanner` (profile, SLO, budget, limits).
      planned_for: the workload the starting placement was planned for.
      settings: the knobs.
      background: run the search in a thread (a server) or inline on the virtual clock (the simulator).
    """

    def __init__(self, controller: Any, planner: WindowPlanner, planned_for: dr.PlannedWorkload,
                 settings: ReplanSettings = ReplanSettings(), *, background: bool = True, seed: int = 0):
        self.ctrl, self.planner, self.settings = controller, planner, settings
        self.planned_for = planned_for
        self.checked: dr.PlannedWorkload | None = None
        self.background, self.seed = background, seed
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="replan") if background else None
        self._job: _Job | None = None
        self._next_check = controller.clock() + settings.interval_s
        self._confirmed = 0
        self._drift_since: float | None = None  # the first tick of the current run of drifted ones
        self._last_change_end: float | None = None
        self.num_changes = 0
        self.last_drift: dr.Drift | None = None
        self.last_proposal: Proposal | None = None
        self.log: list[dict[str, Any]] = []  # decisions, in order (time, kind, detail)

    # ------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One look at the controller (cheap unless a check is due; never blocks on the search)."""
        now = self.ctrl.clock()
        change = getattr(self.ctrl, "placement_change", None)
        if change is not None and change.state in ACTIVE_STATES:
            return
        if change is not None and change.finished_at is not None:
            self._last_change_end = max(self._last_change_end or change.finished_at, change.finished_at)
        if self._job is not None:
            self._collect(now)
            return
        if now < self._next_check:
            return
        self._next_check = now + self.settings.interval_s
        window = self.ctrl.monitor.window(now, self.settings.window_s)
        d = dr.detect(self.planned_for, window, self.settings.thresholds)
        self.last_drift = d
        if d is None or not d.drifted:
            self._confirmed = 0
            return
        if self.checked is not None:
            again = dr.detect(self.checked, window, self.settings.thresholds)
            if again is not None and not again.drifted:
                self._confirmed = 0
                return  # the planner already looked at this workload and kept the placement
        self._confirmed += 1
        if self._confirmed == 1:
            self._drift_since = now
        if self._confirmed < self.settings.confirm:
            return
        if self._last_change_end is not None and now - self._last_change_end < self.settings.dwell_s:
            return
        if window.num_completions == 0:
            return
        self._confirmed = 0
        self._start(now, window, d)

    def rate_to_plan(self, now: float, window: Any) -> float:
        """The rate to size for (see the module docstring)."""
        s = self.settings
        since = self._drift_since if self._drift_since is not None and self._drift_since < now else now - s.interval_s
        rate = max(window.rate, window.rate_since(since))
        recent = self.ctrl.monitor.window(now, s.interval_s)
        backlog = self.backlog() + s.startup_s * max(0.0, recent.rate - recent.completion_rate)
        return rate + backlog / s.drain_s

    def backlog(self) -> int:
        """Requests waiting: not prefilled yet, or prefilled and waiting for a decode instance."""
        waiting = sum(1 for r in self.ctrl.requests.values() if not r.output_token_ids)
        return waiting + len(self.ctrl.migration_queue)

    def _start(self, now: float, window: Any, d: dr.Drift) -> None:
        rate = self.rate_to_plan(now, window)
        lens = window.sample_lengths(self.settings.num_requests, seed=self.seed)
        current = self.planner.deployment(self.ctrl.current_placement())
        self._note(now, "plan", f"drift: {d.reason}; planning for {rate:.3g} req/s")
        job = _Job(now, window, d)
        if self._pool is not None:
            job.future = self._pool.submit(self.planner.propose, lens, rate, current)
        else:
            job.proposal = self.planner.propose(lens, rate, current)
            job.ready_at = now + job.proposal.seconds
        self._job = job

    def _collect(self, now: float) -> None:
        job = self._job
        if job.future is not None:
            if not job.future.done():
                return
            try:
                job.proposal = job.future.result()
            except Exception as e:  # noqa: BLE001 - a failed search keeps the placement
                logging.exception("replanner: the search failed; keeping the placement")
                self._note(now, "error", f"search failed: {e!r}")
                self._job = None
                self.checked = dr.PlannedWorkload.from_window(job.window)
                return
        elif job.ready_at is not None and now < job.ready_at:
            return
        self._job = None
        self._decide(now, job)

    def _decide(self, now: float, job: _Job) -> None:
        p = self.last_proposal = job.proposal
        s = self.settings
        current = self.planner.deployment(self.ctrl.current_placement())
        why = None
        if p.target is None:
            why = p.note or "the planner found no placement"
        elif same_placement(p.target, current):
            why = f"the planner keeps {current.describe()}"
        elif not p.gain > s.min_gain:
            why = (f"{p.target.describe()} gains {p.gain:+.1%} per device (needs > {s.min_gain:.0%}; "
                   f"attainment {p.current_attainment:.3f} -> {p.target_attainment:.3f})")
        if why is None:
            try:
                self.ctrl.apply_placement(to_engine_placement(p.target, devices=False))
            except (ValueError, RuntimeError) as e:
                why = f"cannot switch to {p.target.describe()}: {e}"
        if why is not None:
            self._note(now, "keep", why)
            self.checked = dr.PlannedWorkload.from_window(job.window)
            return
        self.num_changes += 1
        self.planned_for = dr.PlannedWorkload(p.rate, job.window.completed)
        self.checked = None
        self._note(now, "switch", f"{current.describe()} -> {p.target.describe()} (gain {p.gain:+.1%} per device, "
                                  f"attainment {p.current_attainment:.3f} -> {p.target_attainment:.3f} at "
                                  f"{p.rate:.3g} req/s; planned in {p.seconds:.1f} CPU s)")

    def _note(self, now: float, kind: str, detail: str) -> None:
        logging.info("replanner at %.1f s: %s: %s", now, kind, detail)
        self.log.append({"time": now, "kind": kind, "detail": detail})
        del self.log[:-100]

    # ------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """A search is running or waiting to be applied."""
        return self._job is not None

    def info(self) -> dict[str, Any]:
        d = self.last_drift
        return {"num_changes": self.num_changes, "planning": self.busy, "planned_rate": self.planned_for.rate,
                "drift": None if d is None else {"rate": d.rate, "rate_ratio": d.rate_ratio,
                                                 "prompt_distance": d.prompt_distance,
                                                 "output_distance": d.output_distance, "drifted": d.drifted,
                                                 "reason": d.reason},
                "last_proposal": None if self.last_proposal is None else self.last_proposal.summary(),
                "log": self.log[-10:]}

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

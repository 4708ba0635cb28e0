"""What the planner proposes for an observed window: the same search, scored against what runs now.

Owns one replanning computation (no clock, no JAX, no engine state; it runs off the serving loop):
  - `WindowPlanner.propose(lens, rate, current)`: Alg. 2 (`search.alg2`, the code behind
    `--placement=plan`) on one node of `budget` devices, over a trace of the window's sampled
    (prompt, output) lengths at `rate`: the best pair by per-device goodput, replicated
    ceil(rate / goodput) times (the most that fit the budget) and simulated jointly at `rate`.
    The best pair does not depend on the rate: while the window's lengths stay within
    `same_lengths` (KS) of the lengths last searched, only the replication is redone (one or
    two simulations instead of a search). The current placement is simulated on the same requests (common
    random numbers) and both are scored by **per-device goodput at the observed load**:
    attainment x rate / devices (the requests per second and device that meet the SLO, the
    simulator's `request_goodput` per device). `gain` = target / current - 1 (inf when the
    current placement meets no request). When the current placement misses the attainment
    target at that load (it is overloaded: per-device numbers cannot tell a scale-up from the
    same pair on fewer devices), both are scored by goodput (the rate each serves within the SLO:
    copies x the pair's goodput, or the rate search on the current placement).
The target goes to `Controller.apply_placement` without device ids: the change keeps every
instance of a shape (role, tp, pp) the target has, and gives new ones free devices first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from distserve_jax.metrics import SLO
from distserve_jax.planner import goodput as g
from distserve_jax.planner import search
from distserve_jax.planner.deployment import Deployment, SimInstance
from distserve_jax.planner.drift import ks_distance
from distserve_jax.planner.latency_model import Profile

LIMIT_KEYS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len")


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A replanning answer. `target` is None when the planner found nothing to serve (see `note`)."""

    rate: float
    target: Deployment | None
    current_attainment: float
    target_attainment: float | None
    current_devices: int
    target_devices: int | None
    gain: float  # predicted per-device goodput gain of target over current (-1..inf; 0 without a target)
    seconds: float  # planner CPU time
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {"rate": self.rate, "target": self.target.describe() if self.target else None,
                "current_attainment": self.current_attainment, "target_attainment": self.target_attainment,
                "current_devices": self.current_devices, "target_devices": self.target_devices,
                "gain": self.gain, "seconds": self.seconds, "note": self.note}


def per_device_goodput(attainment: float, rate: float, devices: int) -> float:
    """Requests per second and device meeting the SLO at `rate` (see the module docstring)."""
    return attainment * rate / devices


class WindowPlanner:
    """The replanner's planner (see the module docstring).

    Args:
      profile: the latency profile the server plans with (`--plan_profile` / the cached one).
      slo: the SLO the placement must meet; `target`: the attainment to reach.
      budget: devices the engine may use (never exceeded; one node of them, as `--placement=plan`).
      limits: the engine limits (block_size, max_num_seqs, max_num_batched_tokens, max_model_len).
      num_requests: requests in the sampled trace; seed: the arrival process's seed.
      same_lengths: the KS distance under which window lengths count as those last searched (the
        best pair is then re-replicated, not searched again).
      timer: a clock for `Proposal.seconds` (e.g. `time.process_time`); None: the search's own count.
    """

    def __init__(self, profile: Profile, slo: SLO, *, budget: int, limits: dict[str, Any] | None = None,
                 target: float = 0.9, num_requests: int = 200, seed: int = 0, same_lengths: float = 0.25,
                 timer: Callable[[], float] | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
            raise ValueError(f"the device budget must be an integer >= 2 (one prefill and one decode device), "
                             f"got {budget!r}")
        self.profile, self.slo, self.budget, self.target = profile, slo, budget, target
        self.limits = {k: v for k, v in (limits or {}).items() if k in LIMIT_KEYS}
        self.num_requests, self.seed, self.same_lengths, self.timer = num_requests, seed, same_lengths, timer
        self.cluster = search.Cluster(1, budget)
        self._cache: tuple[tuple[tuple[int, int], ...], g.Scored] | None = None

    def deployment(self, placement: Any) -> Deployment:
        """An engine `Placement` as the simulator's deployment, under this planner's limits."""
        from distserve_jax.planner.deployment import from_placement

        return from_placement(placement, gpus_per_node=self.budget, **self.limits)

    def remember(self, lens: Sequence[tuple[int, int]], plan: search.Plan) -> None:
        """Remembers a full search's answer for `lens` (e.g. the one the starting placement came from)."""
        if plan.best is not None and plan.best.goodput > 0 and plan.best.unit.kind == "pair":
            self._cache = (tuple(lens), plan.best)

    def _reusable(self, lens: Sequence[tuple[int, int]]) -> g.Scored | None:
        """The cached best pair when `lens` are distributed as the lengths it was searched for."""
        if self._cache is None:
            return None
        old, best = self._cache
        for k in (0, 1):
            if ks_distance([x[k] for x in lens], [x[k] for x in old]) >= self.same_lengths:
                return None
        return best

    def propose(self, lens: Sequence[tuple[int, int]], rate: float, current: Deployment) -> Proposal:
        """The placement the planner picks for `lens` at `rate`, scored against `current`."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"the rate to plan for must be > 0 req/s, got {rate!r}")
        if not lens:
            raise ValueError("the window has no request lengths to plan on")
        t0 = self.timer() if self.timer else 0.0
        work = g.Workload.make(list(lens), seed=self.seed, name="window")
        cur_att = g.attainment(g.Unit("placement", current, current.num_devices), self.profile, work, self.slo, rate)
        searched = 0.0
        best = self._reusable(lens)
        note = "lengths as last searched: the best pair re-replicated" if best is not None else "full search"
        try:
            if best is None:
                plan = search.alg2(self.profile, self.cluster, work, self.slo, rate, target=self.target,
                                   limits=dict(self.limits))
                searched = plan.seconds
                best = plan.best
                if best is None or best.goodput <= 0:
                    raise g.ImpossibleSLOError(plan.error or "no pair meets the SLO")
                self._cache = (tuple(lens), best)
            dep, att, why = self._replicate(best, rate, work)
        except g.PlannerError as e:
            return Proposal(rate, None, cur_att, None, current.num_devices, None, 0.0,
                            self._elapsed(t0, searched), f"planner: {e}")
        if cur_att >= self.target:
            new = per_device_goodput(att, rate, dep.num_devices)
            old = per_device_goodput(cur_att, rate, current.num_devices)
        else:  # the current placement misses the SLO at this load: what matters is how much it can serve
            new = self._copies(dep, best) * best.goodput
            old = self._capacity(current, best, work, rate)
            note += f"; overloaded now: goodput {old:.3g} -> {new:.3g} req/s"
        gain = new / old - 1.0 if old > 0 else (math.inf if new > 0 else 0.0)
        return Proposal(rate, dep, cur_att, att, current.num_devices, dep.num_devices, gain,
                        self._elapsed(t0, searched), "; ".join(x for x in (note, why) if x))

    @staticmethod
    def _copies(dep: Deployment, best: g.Scored) -> int:
        """How many copies of `best`'s pair `dep` is (0 when it is anything else)."""
        shapes = sorted(map(_shape, (i for i in best.unit.deployment.instances)))
        k = sum(1 for i in dep.instances if i.role == "prefill")
        return k if sorted(map(_shape, dep.instances)) == sorted(shapes * k) else 0

    def _capacity(self, dep: Deployment, best: g.Scored, work: g.Workload, rate: float) -> float:
        """A placement's goodput: copies x the pair's, or found by the planner's rate search."""
        k = self._copies(dep, best)
        if k:
            return k * best.goodput
        unit = g.Unit("placement", dep, dep.num_devices)
        return g.search_rate(lambda r: g.attainment(unit, self.profile, work, self.slo, r, self.target), guess=rate,
                             target=self.target, rel_tol=0.05).rate

    def _elapsed(self, t0: float, searched: float) -> float:
        return self.timer() - t0 if self.timer else searched

    def _replicate(self, best: g.Scored, rate: float, work: g.Workload) -> tuple[Deployment, float, str]:
        """Alg. 2's last step: ceil(rate / goodput) copies of the pair (at most what the budget holds),
        simulated jointly at `rate`; one more copy while that misses the target, at most twice."""
        p = next(i for i in best.unit.deployment.instances if i.role == "prefill")
        d = next(i for i in best.unit.deployment.instances if i.role == "decode")
        fit = self.budget // best.unit.num_gpus
        if fit < 1:
            raise g.NoFittingPlacementError(f"{best.unit.describe()} needs {best.unit.num_gpus} devices, over the "
                                            f"budget of {self.budget}")
        want = g.ceil_div(rate, best.goodput)
        count, why = min(want, fit), ""
        if want > fit:
            why = f"{rate:.3g} req/s needs {want} x {best.unit.describe()}; the budget of {self.budget} holds {fit}"
        for attempt in range(3):
            dep = search.pack([[("prefill", p.tp, p.pp, r), ("decode", d.tp, d.pp, r)] for r in range(count)],
                              self.cluster, dict(self.limits))
            att = g.attainment(g.Unit("placement", dep, dep.num_devices), self.profile, work, self.slo, rate)
            if att >= self.target or count >= fit or attempt == 2:
                return dep, att, why
            count += 1
        raise AssertionError("unreachable")


def _shape(i: SimInstance) -> tuple[str, int, int]:
    return (i.role, i.tp, i.pp)


def same_placement(a: Deployment, b: Deployment) -> bool:
    """Whether two deployments run the same instances (shapes, ignoring names and device ids)."""
    return sorted(map(_shape, a.instances)) == sorted(map(_shape, b.instances))

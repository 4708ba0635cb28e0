"""Goodput of one simulated unit: the largest rate whose joint SLO attainment stays >= the target.

Owns the rate search and the units it is run on:
  - `search_rate`: brackets the goodput from a guess (doubling / halving), then narrows the
    bracket by bisection, probing at the interpolated crossing first, until
    hi - lo <= rel_tol * hi (1% by default). Rates are compared on the same requests (common
    random numbers: one unit-rate arrival process divided by the rate).
  - units: a prefill instance alone (its requests generate one token, so only TTFT counts;
    the decode side is a zero-time instance), a decode instance alone (a zero-time prefill
    feeds it; only TPOT counts; KV moves over the link given), a prefill + decode pair, and a
    colocated / chunked replica; each judged by `metrics.attainment` with the SLO relaxed to
    the phase simulated.
  - `score_all` with `prune=True`: units are scored best rough capacity per GPU first (per kind),
    and a unit is first simulated at the best per-GPU goodput found so far for its kind (times its
    GPUs, plus the tolerance): when it misses the target there, it cannot beat that best beyond
    the tolerance and is kept as pruned (its goodput an upper bound, ranked after the scored
    ones) after one simulation; else its search starts from there. Scores are memoized per
    (unit, profile, workload, SLO, target, tolerance) within a process.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Sequence

import numpy as np

from distserve_jax import metrics
from distserve_jax.metrics import SLO
from distserve_jax.planner import simulator
from distserve_jax.planner.deployment import Deployment, SimInstance
from distserve_jax.planner.latency_model import Profile, UnprofiledConfigError
from distserve_jax.planner.sim_runner import InstantModel
from distserve_jax.planner.workload import at_rate

UNLIMITED_BLOCKS = 1 + 10_000_000  # a phantom instance's KV cache: never the bottleneck
FAR = 1 << 40  # a device id on another node than every real device
RELAXED = 1e9  # seconds: the target of the phase not simulated
MIN_SPAN_SLOS = 2.0  # a simulated trace spans at least this many times a request's SLO (TTFT + output x TPOT)


class PlannerError(ValueError):
    """The planner cannot answer (base of its named errors)."""


class ImpossibleSLOError(PlannerError):
    """Even a nearly idle instance misses the SLO target for this workload."""


class NoFittingPlacementError(PlannerError):
    """No candidate placement fits the cluster (GPUs, memory, profiled degrees) at the rate asked."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """The requests a search simulates: lengths and a unit-rate arrival process."""

    lens: tuple[tuple[int, int], ...]
    unit: np.ndarray = dataclasses.field(compare=False, repr=False)
    name: str = "workload"
    cv: float = 1.0
    seed: int = 0

    @classmethod
    def make(cls, lens: Sequence[tuple[int, int]], *, cv: float = 1.0, seed: int = 0, name: str = "workload"):
        from distserve_jax.planner.workload import unit_arrivals

        return cls(tuple(lens), unit_arrivals(len(lens), cv=cv, seed=seed), name, cv, seed)

    def at_least(self, n: int) -> "Workload":
        """This workload's requests cycled to `n` (the same arrival process, continued)."""
        if n <= len(self.lens):
            return self
        from distserve_jax.planner.workload import unit_arrivals

        lens = tuple(self.lens[i % len(self.lens)] for i in range(n))
        return Workload(lens, unit_arrivals(n, cv=self.cv, seed=self.seed), self.name, self.cv, self.seed)

    @property
    def mean_prompt(self) -> float:
        return float(np.mean([p for p, _ in self.lens]))

    @property
    def mean_output(self) -> float:
        return float(np.mean([o for _, o in self.lens]))


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one goodput search simulates."""

    kind: str  # "prefill", "decode", "pair", "colocated", "chunked"
    deployment: Deployment
    num_gpus: int
    phantoms: tuple[str, ...] = ()  # zero-time instances (not counted in num_gpus)

    def describe(self) -> str:
        insts = [i for i in self.deployment.instances if i.name not in self.phantoms]
        return "+".join(f"{i.role[0].upper() if self.kind in ('prefill', 'decode', 'pair') else self.kind}"
                        f"(tp{i.tp}" + (f",pp{i.pp})" if i.pp > 1 else ")") for i in insts)


def search_rate(attainment_at: Callable[[float], float], *, guess: float, target: float, rel_tol: float = 0.01,
                max_evals: int = 40) -> metrics.GoodputResult:
    """The goodput bracket search (see the module docstring). `status` "below_low" when even
    `guess / 2**12` misses the target."""
    memo: dict[float, float] = {}

    def f(r: float) -> float:
        if r not in memo:
            memo[r] = float(attainment_at(r))
        return memo[r]

    lo = hi = None
    r = guess
    for _ in range(24):
        if f(r) >= target:
            lo = r
            if hi is not None:
                break
            r *= 2
        else:
            hi = r
            if lo is not None:
                break
            r /= 2
            if r < guess / 4096:
                return metrics.GoodputResult(0.0, tuple(memo.items()), target, "below_low")
    if hi is None:
        return metrics.GoodputResult(lo, tuple(memo.items()), target, "above_high")
    while hi - lo > rel_tol * hi and len(memo) < max_evals:
        w = hi - lo
        a_lo, a_hi = memo[lo], memo[hi]
        x = lo + w * (a_lo - target) / (a_lo - a_hi) if a_lo > a_hi else lo + w / 2
        x = min(max(x, lo + 0.1 * w), hi - 0.1 * w)
        # Probe just above, then just below the interpolated crossing: when it is accurate, the
        # two probes close the bracket; when it is not, halve the bracket as well.
        for y in (x + 0.45 * rel_tol * hi, x - 0.45 * rel_tol * hi):
            if not lo < y < hi:
                continue
            if f(y) >= target:
                lo = y
                break
            hi = y
            if hi - lo <= rel_tol * hi:
                break
        if hi - lo > 0.5 * w:
            mid = 0.5 * (lo + hi)
            if f(mid) >= target:
                lo = mid
            else:
                hi = mid
    return metrics.GoodputResult(lo, tuple(memo.items()), target, "ok")


# ------------------------------------------------------------------------------ units
def prefill_unit(tp: int, pp: int, limits: dict) -> Unit:
    d = Deployment("disaggregated", (SimInstance("prefill-0", "prefill", tp, pp, tuple(range(tp * pp))),
                                     SimInstance("decode-0", "decode", 1, 1, (FAR,), UNLIMITED_BLOCKS)), **limits)
    return Unit("prefill", d, tp * pp, ("decode-0",))


def decode_unit(tp: int, pp: int, limits: dict, *, same_node: bool) -> Unit:
    """A decode instance fed by a zero-time prefill on the same node (intra-node KV links) or another."""
    src = (tp * pp,) if same_node else (FAR,)
    lim = dict(limits, gpus_per_node=FAR) if same_node else limits
    d = Deployment("disaggregated", (SimInstance("prefill-0", "prefill", 1, 1, src, UNLIMITED_BLOCKS),
                                     SimInstance("decode-0", "decode", tp, pp, tuple(range(tp * pp)))), **lim)
    return Unit("decode", d, tp * pp, ("prefill-0",))


def pair_unit(p: tuple[int, int], d: tuple[int, int], inter_op: int, limits: dict) -> Unit:
    """Alg. 2's segment group: prefill (tp_p, inter_op * pp_p) and decode (tp_d, inter_op * pp_d), the
    two segments of each inter-op stage on one node (node s holds stage group s)."""
    m = limits.get("gpus_per_node", 8)
    gp, gd = p[0] * p[1], d[0] * d[1]
    pdev = tuple(s * m + i for s in range(inter_op) for i in range(gp))
    ddev = tuple(s * m + gp + i for s in range(inter_op) for i in range(gd))
    dep = Deployment("disaggregated", (SimInstance("prefill-0", "prefill", p[0], inter_op * p[1], pdev),
                                       SimInstance("decode-0", "decode", d[0], inter_op * d[1], ddev)), **limits)
    return Unit("pair", dep, inter_op * (gp + gd))


def replica_unit(mode: str, tp: int, limits: dict) -> Unit:
    d = Deployment(mode, (SimInstance(f"{mode}-0", "colocated", tp, 1, tuple(range(tp))),), **limits)
    return Unit(mode, d, tp)


def slo_for(kind: str, slo: SLO) -> SLO:
    if kind == "prefill":
        return SLO(slo.ttft_s, RELAXED)
    if kind == "decode":
        return SLO(RELAXED, slo.tpot_s)
    return slo


def lens_for(kind: str, work: Workload) -> Sequence[tuple[int, int]]:
    return [(p, 1) for p, _ in work.lens] if kind == "prefill" else work.lens


def attainment(unit: Unit, profile: Profile, work: Workload, slo: SLO, rate: float,
               target: float | None = None) -> float:
    """Joint attainment of `unit` at `rate` (the SLO relaxed to the phase a phase unit simulates).

    With `target`, a simulation stops as soon as too many requests missed to reach it: the value
    returned is then an upper bound below the target (enough for a goodput search).
    """
    # A finite trace at a rate past capacity still meets a loose SLO if it ends before queues have
    # grown past it: the trace spans at least a few SLOs (its requests cycled), so overload shows.
    span = MIN_SPAN_SLOS * (slo.ttft_s if unit.kind == "prefill" else slo.ttft_s + work.mean_output * slo.tpot_s)
    work = work.at_least(math.ceil(rate * span))
    lens = lens_for(unit.kind, work)
    reqs = at_rate(lens, rate, unit=work.unit)
    models = {n: InstantModel() for n in unit.phantoms}
    dep = unit.deployment
    if unit.phantoms:  # a phantom's cache holds every request at once
        bs = dep.block_size
        blocks = 2 + sum(-(-(p + o) // bs) + 1 for p, o in lens)
        dep = dataclasses.replace(dep, instances=tuple(
            dataclasses.replace(i, num_blocks=blocks) if i.name in unit.phantoms else i for i in dep.instances))
    slo = slo_for(unit.kind, slo)
    stop = None if target is None else (slo, len(reqs) - math.ceil(target * len(reqs)))
    recs = simulator.run(dep, profile, reqs, step_models=models, stop_after=stop)
    return metrics.attainment(recs, slo)


def guess_rate(unit: Unit, profile: Profile, work: Workload) -> float:
    """A rough capacity estimate to start the bracket from (req/s)."""
    d = unit.deployment
    pw = WorkShape([0] * int(work.mean_prompt), 0)
    out = max(work.mean_output, 1.0)
    rates = []
    for i in d.instances:
        if i.name in unit.phantoms:
            continue
        sm = profile.step_model(i.tp, i.pp)
        if i.role in ("prefill", "colocated"):
            rates.append(1.0 / max(sm.stage_time([pw]), 1e-6))
        if i.role in ("decode", "colocated") and unit.kind != "prefill":
            tokens = profile.kv_capacity_tokens(i.tp, i.pp)[0]
            b = max(1, min(d.max_num_seqs, int(tokens / (work.mean_prompt + out / 2))))
            step = sm.stage_time([WorkShape([0], int(work.mean_prompt + out / 2))] * b) * i.pp
            rates.append(b / (out * max(step, 1e-6)))
    if not rates:
        return 1.0
    return 0.7 / sum(1.0 / r for r in rates) if unit.kind in ("colocated", "chunked") else 0.7 * min(rates)


@dataclasses.dataclass(frozen=True)
class WorkShape:
    """A batch item's shape, for step-time estimates (what `StepModel.stage_time` reads of a `SeqWork`)."""

    token_ids: list
    context_len: int
    sample: bool = True


@dataclasses.dataclass(frozen=True)
class Scored:
    """A unit and its goodput (req/s of the unit, and per GPU)."""

    unit: Unit
    goodput: float  # an upper bound when `pruned`
    result: metrics.GoodputResult
    note: str = ""
    pruned: bool = False  # missed the target at a rate that would not beat the best of its kind

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.unit.num_gpus

    @property
    def num_evals(self) -> int:
        return len(self.result.points)


def score(unit: Unit, profile: Profile, work: Workload, slo: SLO, target: float, rel_tol: float = 0.01,
          beat: float | None = None) -> Scored:
    """The unit's goodput; estimates it relies on (analytic pp, capacity) are named in `note`.

    With `beat` (req/s per GPU), first simulates at `beat * GPUs * (1 + rel_tol)`: a miss there
    returns a pruned score (that rate, an upper bound) after one simulation.
    """
    notes = sorted({e for i in unit.deployment.instances if i.name not in unit.phantoms
                    for e in [profile.step_model(i.tp, i.pp).estimated,
                              "KV capacity estimated from memory" if profile.kv_capacity_tokens(i.tp, i.pp)[1] else ""]
                    if e})
    guess = guess_rate(unit, profile, work)
    memo: dict[float, float] = {}

    def f(r: float) -> float:
        if r not in memo:
            memo[r] = attainment(unit, profile, work, slo, r, target)
        return memo[r]

    if beat is not None and beat > 0:
        r = beat * unit.num_gpus * (1 + rel_tol)
        if f(r) < target:
            res = metrics.GoodputResult(r, tuple(memo.items()), target, "pruned")
            return Scored(unit, r, res, "; ".join(notes + [f"pruned: < {beat * (1 + rel_tol):.4g} req/s/GPU"]),
                          pruned=True)
        guess = r
    res = search_rate(f, guess=guess, target=target, rel_tol=rel_tol)
    res = dataclasses.replace(res, points=tuple(memo.items()))
    return Scored(unit, res.rate, res, "; ".join(notes))


_CACHE: dict[tuple, Scored] = {}  # full (unpruned) scores of this process


def _key(unit: Unit, profile: Profile, work: Workload, slo: SLO, target: float, rel_tol: float) -> tuple:
    return (unit, json.dumps(profile.to_dict(), sort_keys=True), work, slo, target, rel_tol)


def score_all(units: Sequence[Unit], profile: Profile, work: Workload, slo: SLO, target: float, *,
              rel_tol: float = 0.01, jobs: int = 1, progress: Callable[[int, int], None] | None = None,
              prune: bool = False, beat: dict[str, float] | None = None) -> list[Scored]:
    """`score` for every unit (in `jobs` processes), in the order given; with `prune`, units that
    cannot beat the best of their kind (so far, or in `beat`: kind -> req/s per GPU) are pruned
    (see the module docstring)."""
    out: list[Scored | None] = [None] * len(units)
    todo = []
    for i, u in enumerate(units):
        hit = _CACHE.get(_key(u, profile, work, slo, target, rel_tol))
        if hit is not None:
            out[i] = hit
        else:
            todo.append(i)
    if prune:
        rough = {i: guess_rate(units[i], profile, work) / units[i].num_gpus for i in todo}
        todo.sort(key=lambda i: -rough[i])
    best: dict[str, float] = dict(beat or {})
    for s in out:
        if s is not None:
            best[s.unit.kind] = max(best.get(s.unit.kind, 0.0), s.per_gpu)
    done = len(units) - len(todo)
    width = max(1, jobs) if prune else len(todo)
    pool = None
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(min(jobs, len(todo)))
    try:
        for k in range(0, len(todo), width):
            wave = todo[k:k + width]
            args = [(units[i], profile, work, slo, target, rel_tol, best.get(units[i].kind) if prune else None)
                    for i in wave]
            results = pool.imap(_score_star, args) if pool is not None else map(_score_star, args)
            for i, s in zip(wave, results):
                out[i] = s
                if not s.pruned:
                    _CACHE[_key(units[i], profile, work, slo, target, rel_tol)] = s
                    best[s.unit.kind] = max(best.get(s.unit.kind, 0.0), s.per_gpu)
                done += 1
                if progress:
                    progress(done, len(units))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return out  # type: ignore[return-value]


def _score_star(a: tuple) -> Scored:
    return score(*a)


def fits_memory(profile: Profile, tp: int, pp: int, max_model_len: int) -> bool:
    """Whether an instance of tp x pp devices holds the KV of at least one full-length request."""
    return profile.kv_capacity_tokens(tp, pp)[0] >= max_model_len


def profiled_or_none(profile: Profile, tp: int, pp: int) -> str | None:
    """None when tp/pp is usable, else why not (unprofiled)."""
    try:
        profile.step_model(tp, pp)
        return None
    except UnprofiledConfigError as e:
        return str(e)


def ceil_div(a: float, b: float) -> int:
    return max(1, int(math.ceil(a / b - 1e-9)))

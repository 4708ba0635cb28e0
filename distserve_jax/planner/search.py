"""DistServe's placement search (OSDI'24 Alg. 1 and Alg. 2, with replication) and the baselines.

Owns the candidate enumeration, the replication to a target rate and the packing onto nodes:
  - Alg. 1 (high node affinity): every (tp, pp) with tp <= GPUs per node, tp * pp <= the cluster,
    profiled and fitting in memory, is scored as a prefill instance alone (TTFT) and as a decode
    instance alone (TPOT; KV over inter-node links); the best per-GPU goodput of each phase is
    replicated n = ceil(R / goodput_p), m = ceil(R / goodput_d) times.
  - Alg. 2 (low node affinity): for each inter-op degree k (dividing the layers, <= nodes), every
    pair of intra-node segments (tp_p, pp_p), (tp_d, pp_d) with gpus_p + gpus_d <= GPUs per node
    is a segment group: prefill (tp_p, k*pp_p) and decode (tp_d, k*pp_d), stage s of both on node s,
    so KV moves over intra-node links; pairs are simulated jointly (TTFT and TPOT per request) and
    the best per-GPU goodput is replicated ceil(R / goodput) times. Each pair has an upper bound
    (the smaller of the two phases' goodputs alone, per GPU of the pair); pairs are visited those
    of exactly scored phases first, best bound first, and a pair whose bound does not beat the
    best joint goodput found is not simulated (`exhaustive=True` scores them all).
  - baselines: colocated (prefill-first) and chunked replicas of every profiled tp (pp = 1, as the
    engine builds them), replicated ceil(R / goodput) times.
With `prune` (the default; off with Alg. 2's `exhaustive`), a candidate that misses the target at
the best per-GPU goodput of its kind found so far is not searched further (`goodput.score_all`):
the chosen candidates are the exhaustive search's, within the bisection's tolerance.
Each result carries the chosen placement (devices on nodes) and its attainment at R, simulated
jointly.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from absl import logging

from distserve_jax import metrics
from distserve_jax.metrics import SLO
from distserve_jax.planner import goodput as g
from distserve_jax.planner.deployment import Deployment, SimInstance
from distserve_jax.planner.latency_model import Profile

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class Cluster:
    num_nodes: int
    gpus_per_node: int

    def __post_init__(self):
        for k in ("num_nodes", "gpus_per_node"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclasses.dataclass
class Plan:
    """A search's answer: the ranked candidates, the placement for rate R and its predicted attainment."""

    algorithm: str
    rate: float
    placement: Deployment | None
    attainment_at_rate: float | None
    ranked: list[g.Scored]
    prefill: list[g.Scored] = dataclasses.field(default_factory=list)  # Alg. 1: each phase ranked
    decode: list[g.Scored] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    num_simulations: int = 0

    @property
    def best(self) -> g.Scored | None:
        return self.ranked[0] if self.ranked else None


def _rank(scored: list[g.Scored]) -> list[g.Scored]:
    return sorted(scored, key=lambda s: (s.pruned, -s.per_gpu, s.unit.num_gpus, s.unit.describe()))


def candidate_configs(profile: Profile, cluster: Cluster, max_model_len: int, *, max_gpus: int | None = None,
                      pp_values: tuple[int, ...] | None = None) -> tuple[list[tuple[int, int]], list[str]]:
    """Usable (tp, pp) instance shapes and why the others were skipped."""
    m, total = profile.model, max_gpus or cluster.num_gpus
    out, skipped = [], []
    for tp in range(1, cluster.gpus_per_node + 1):
        if not m.valid_tp(tp):
            continue
        for pp in (pp_values or range(1, total // tp + 1)):
            if not m.valid_pp(pp) or tp * pp > total:
                continue
            why = g.profiled_or_none(profile, tp, pp)
            if why is not None:
                if pp == 1:
                    skipped.append(f"tp={tp}: unprofiled")
                continue
            if not g.fits_memory(profile, tp, pp, max_model_len):
                skipped.append(f"tp={tp},pp={pp}: KV cache holds {profile.kv_capacity_tokens(tp, pp)[0]} tokens "
                               f"< max_model_len {max_model_len}")
                continue
            out.append((tp, pp))
    return out, skipped


def _check_slo(scored: list[g.Scored], what: str, slo: SLO) -> None:
    if scored and all(s.goodput <= 0 for s in scored):
        raise g.ImpossibleSLOError(f"no {what} configuration meets TTFT <= {slo.ttft_s}s / TPOT <= {slo.tpot_s}s "
                                   f"for this workload even at a near-zero rate")


# ------------------------------------------------------------------------------ packing
def pack(groups: list[list[tuple[str, int, int, int]]], cluster: Cluster, limits: dict) -> Deployment:
    """Places groups of instance segments on nodes: each group is a list of stage segments
    (role, tp, stages on this node, instance key), every stage of a segment on one node, the segments of
    one group entry on the same node. Raises NoFittingPlacementError when they do not fit."""
    m = cluster.gpus_per_node
    free = [list(range(n * m, (n + 1) * m)) for n in range(cluster.num_nodes)]
    devices: dict[tuple[str, int], list[int]] = {}
    order: list[tuple[str, int, int]] = []
    for segs in groups:
        need = sum(tp * st for _, tp, st, _ in segs)
        node = next((n for n in sorted(range(len(free)), key=lambda n: len(free[n])) if len(free[n]) >= need), None)
        if node is None:
            raise g.NoFittingPlacementError(f"the placement needs more GPUs than the {cluster.num_nodes} x "
                                            f"{cluster.gpus_per_node} cluster has free")
        for role, tp, st, key in segs:
            k = (role, key)
            if k not in devices:
                devices[k] = []
                order.append((role, key, tp))
            devices[k] += free[node][:tp * st]
            free[node] = free[node][tp * st:]
    insts, counts = [], {}
    for role, key, tp in sorted(order, key=lambda x: (x[0] != "prefill", x[0] != "decode", x[1])):
        c = counts.get(role, 0)
        counts[role] = c + 1
        devs = tuple(devices[(role, key)])
        name = f"{role}-{c}" if role != "colocated" else f"{limits.get('_mode', 'colocated')}-{c}"
        insts.append(SimInstance(name, role, tp, len(devs) // tp, devs))
    mode = limits.pop("_mode", "disaggregated")
    return Deployment(mode, tuple(insts), gpus_per_node=m, **limits)


def _segments(role: str, tp: int, pp: int, key: int, m: int) -> list[list[tuple[str, int, int, int]]]:
    """An instance's stages, as many per node as fit (whole instance on one node when tp*pp <= m)."""
    per_node = max(1, m // tp)
    out, left = [], pp
    while left:
        st = min(per_node, left)
        out.append([(role, tp, st, key)])
        left -= st
    return out


def _verify(plan: Plan, dep: Deployment, profile: Profile, work: g.Workload, slo: SLO) -> None:
    plan.placement = dep
    unit = g.Unit("placement", dep, dep.num_devices)
    plan.attainment_at_rate = g.attainment(unit, profile, work, slo, plan.rate)
    plan.num_simulations += 1


def _place(plan: Plan, groups_for: Callable[[tuple[int, ...]], list], counts: tuple[int, ...],
           bump: Callable[[tuple[int, ...]], tuple[int, ...]], cluster: Cluster, lim: dict, profile: Profile,
           work: g.Workload, slo: SLO, target: float, what: Callable[[tuple[int, ...]], str]) -> None:
    """Packs the ceil(R / goodput) replicas and simulates them jointly at R; while that misses the
    target (goodputs come from fewer requests than the check), adds a replica, at most twice."""
    lim = {k: v for k, v in lim.items() if k != "gpus_per_node"}
    for attempt in range(3):
        try:
            dep = pack(groups_for(counts), cluster, dict(lim))
        except g.NoFittingPlacementError as e:
            if plan.placement is None:
                plan.error = f"rate {plan.rate}/s needs {what(counts)}: {e}"
            else:
                plan.skipped.append(f"one more replica would not fit ({what(counts)})")
            return
        _verify(plan, dep, profile, work, slo)
        if plan.attainment_at_rate >= target or attempt == 2:
            return
        plan.skipped.append(f"{what(counts)} simulated at {plan.rate}/s reached only {plan.attainment_at_rate:.3f}: "
                            f"one more replica")
        counts = bump(counts)


# ------------------------------------------------------------------------------ algorithms
def alg1(profile: Profile, cluster: Cluster, work: g.Workload, slo: SLO, rate: float, *, target: float = 0.9,
         limits: dict | None = None, jobs: int = 1, rel_tol: float = 0.01, verify: g.Workload | None = None,
         progress: Progress | None = None, prune: bool = True) -> Plan:
    t0 = time.perf_counter()
    lim = dict(limits or {}, gpus_per_node=cluster.gpus_per_node)
    configs, skipped = candidate_configs(profile, cluster, lim.get("max_model_len", 2048))
    if not configs:
        raise g.NoFittingPlacementError(f"no profiled (tp, pp) fits the cluster and memory: {'; '.join(skipped)}")
    units = [g.prefill_unit(tp, pp, lim) for tp, pp in configs] + \
            [g.decode_unit(tp, pp, lim, same_node=False) for tp, pp in configs]
    scored = g.score_all(units, profile, work, slo, target, rel_tol=rel_tol, jobs=jobs, prune=prune,
                         progress=(lambda i, n: progress("alg1", i, n)) if progress else None)
    pre, dec = _rank(scored[:len(configs)]), _rank(scored[len(configs):])
    _check_slo(pre, "prefill", slo)
    _check_slo(dec, "decode", slo)
    plan = Plan("alg1", rate, None, None, [], pre, dec, skipped,
                num_simulations=sum(s.num_evals for s in scored))
    bp, bd = pre[0], dec[0]
    (tp_p, pp_p), (tp_d, pp_d) = _shape(bp), _shape(bd)
    m_ = cluster.gpus_per_node

    def groups_for(c):
        return ([s for k in range(c[0]) for s in _segments("prefill", tp_p, pp_p, k, m_)]
                + [s for k in range(c[1]) for s in _segments("decode", tp_d, pp_d, k, m_)])

    def bump(c):  # the phase with less headroom over R gets the replica
        return (c[0] + 1, c[1]) if c[0] * bp.goodput <= c[1] * bd.goodput else (c[0], c[1] + 1)

    _place(plan, groups_for, (g.ceil_div(rate, bp.goodput), g.ceil_div(rate, bd.goodput)), bump, cluster, lim,
           profile, verify or work, slo, target,
           lambda c: f"{c[0]} x {bp.unit.describe()} + {c[1]} x {bd.unit.describe()} = "
                     f"{c[0] * bp.unit.num_gpus + c[1] * bd.unit.num_gpus} GPUs")
    plan.ranked = _rank(pre + dec)
    plan.seconds = time.perf_counter() - t0
    return plan


def _shape(s: g.Scored, role: str | None = None) -> tuple[int, int]:
    inst = next(i for i in s.unit.deployment.instances if i.name not in s.unit.phantoms
                and (role is None or i.role == role))
    return inst.tp, inst.pp


def alg2(profile: Profile, cluster: Cluster, work: g.Workload, slo: SLO, rate: float, *, target: float = 0.9,
         limits: dict | None = None, jobs: int = 1, rel_tol: float = 0.01, verify: g.Workload | None = None,
         exhaustive: bool = False, progress: Progress | None = None) -> Plan:
    t0 = time.perf_counter()
    m, layers = cluster.gpus_per_node, profile.model.num_layers
    lim = dict(limits or {}, gpus_per_node=m)
    max_len = lim.get("max_model_len", 2048)
    skipped: list[str] = []
    pairs = []
    shapes: set[tuple[int, int]] = set()
    for k in range(1, cluster.num_nodes + 1):
        if layers % k:
            continue
        seg, sk = candidate_configs(profile, Cluster(1, m), 1, max_gpus=m)
        skipped += sk
        seg = [(tp, pp) for tp, pp in seg if profile.model.valid_pp(k * pp) and
               g.profiled_or_none(profile, tp, k * pp) is None and g.fits_memory(profile, tp, k * pp, max_len)]
        for p in seg:
            for d in seg:
                if p[0] * p[1] + d[0] * d[1] <= m:
                    pairs.append((p, d, k))
                    shapes.update({("p", p[0], k * p[1]), ("d", d[0], k * d[1])})
    if not pairs:
        raise g.NoFittingPlacementError(f"no pair of profiled intra-node segments fits a node of {m} GPUs "
                                        f"with memory for a {max_len}-token request: {'; '.join(sorted(set(skipped)))}")
    # Upper bounds: each phase alone (KV over intra-node links), shared by every pair using it.
    phase_units = {s: (g.prefill_unit(s[1], s[2], lim) if s[0] == "p" else g.decode_unit(s[1], s[2], lim, same_node=True))
                   for s in sorted(shapes)}
    alone = dict(zip(phase_units, g.score_all(list(phase_units.values()), profile, work, slo, target, rel_tol=rel_tol,
                                              prune=not exhaustive,
                                              jobs=jobs, progress=(lambda i, n: progress("alg2 phases", i, n))
                                              if progress else None)))
    nsim = sum(s.num_evals for s in alone.values())
    _check_slo([v for s, v in alone.items() if s[0] == "p"], "prefill", slo)
    _check_slo([v for s, v in alone.items() if s[0] == "d"], "decode", slo)

    def bound(pair) -> float:
        p, d, k = pair
        return min(alone[("p", p[0], k * p[1])].goodput, alone[("d", d[0], k * d[1])].goodput) / (
            k * (p[0] * p[1] + d[0] * d[1]))
    def loose(pair) -> bool:  # a phase's goodput is only an upper bound (pruned)
        p, d, k = pair
        return alone[("p", p[0], k * p[1])].pruned or alone[("d", d[0], k * d[1])].pruned

    # Pairs of exactly scored phases first (their bounds are tight, so the first joint scores set a
    # good incumbent), each group best bound first; a pair whose bound cannot beat the best joint
    # goodput found is skipped.
    pairs.sort(key=lambda pr: (loose(pr), -bound(pr)))
    scored: list[g.Scored] = []
    pair_of: dict[int, tuple] = {}  # id(scored) -> its (prefill segment, decode segment, inter-op degree)
    best = 0.0
    i = 0
    while i < len(pairs):
        batch = []
        while i < len(pairs) and (exhaustive or len(batch) < max(1, jobs)):
            if exhaustive or bound(pairs[i]) > best * (1 + rel_tol):
                batch.append(pairs[i])
            i += 1
        if not batch:
            break
        units = [g.pair_unit(p, d, k, lim) for p, d, k in batch]
        got = g.score_all(units, profile, work, slo, target, rel_tol=rel_tol, jobs=jobs, prune=not exhaustive,
                          beat={"pair": best} if best > 0 else None)
        scored += got
        pair_of.update({id(s): pr for s, pr in zip(got, batch)})
        nsim += sum(s.num_evals for s in got)
        best = max([best] + [s.per_gpu for s in got if not s.pruned])
        if progress:
            progress("alg2 pairs", i, len(pairs))
    if len(scored) < len(pairs):
        logging.info("alg2: %d of %d pairs not simulated (their phase-alone bound <= the best joint %.4f req/s/GPU)",
                     len(pairs) - len(scored), len(pairs), best)
    ranked = _rank(scored)
    plan = Plan("alg2", rate, None, None, ranked, skipped=sorted(set(skipped)), num_simulations=nsim)
    plan.prefill = _rank([v for s, v in alone.items() if s[0] == "p"])
    plan.decode = _rank([v for s, v in alone.items() if s[0] == "d"])
    bst = ranked[0]
    if bst.goodput <= 0:
        raise g.ImpossibleSLOError(f"no prefill/decode pair meets TTFT <= {slo.ttft_s}s / TPOT <= {slo.tpot_s}s jointly")
    (tp_p, pp_p), (tp_d, pp_d) = _shape(bst, "prefill"), _shape(bst, "decode")
    k = pair_of[id(bst)][2]
    _place(plan, lambda c: [[("prefill", tp_p, pp_p // k, r), ("decode", tp_d, pp_d // k, r)]
                            for r in range(c[0]) for _ in range(k)],
           (g.ceil_div(rate, bst.goodput),), lambda c: (c[0] + 1,), cluster, lim, profile, verify or work, slo, target,
           lambda c: f"{c[0]} segment groups of {bst.unit.num_gpus} GPUs ({bst.unit.describe()})")
    plan.seconds = time.perf_counter() - t0
    return plan


def baselines(profile: Profile, cluster: Cluster, work: g.Workload, slo: SLO, rate: float, *, target: float = 0.9,
              limits: dict | None = None, jobs: int = 1, rel_tol: float = 0.01, verify: g.Workload | None = None,
              modes: tuple[str, ...] = ("colocated", "chunked"), progress: Progress | None = None,
              prune: bool = True) -> dict[str, Plan]:
    """The colocated and chunked searches: best tp per GPU, replicated ceil(R / goodput) times."""
    lim = dict(limits or {}, gpus_per_node=cluster.gpus_per_node)
    configs, skipped = candidate_configs(profile, cluster, lim.get("max_model_len", 2048), pp_values=(1,))
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        units = [g.replica_unit(mode, tp, lim) for tp, _ in configs]
        ranked = _rank(g.score_all(units, profile, work, slo, target, rel_tol=rel_tol, jobs=jobs, prune=prune,
                                   progress=(lambda i, n, mode=mode: progress(mode, i, n)) if progress else None))
        plan = Plan(mode, rate, None, None, ranked, skipped=skipped, num_simulations=sum(s.num_evals for s in ranked))
        if ranked and ranked[0].goodput > 0:
            tp = ranked[0].unit.deployment.instances[0].tp
            _place(plan, lambda c, tp=tp: [[("colocated", tp, 1, r)] for r in range(c[0])],
                   (g.ceil_div(rate, ranked[0].goodput),), lambda c: (c[0] + 1,), cluster, {**lim, "_mode": mode},
                   profile, verify or work, slo, target, lambda c, tp=tp, mode=mode: f"{c[0]} x {mode}(tp{tp}) = "
                                                                                  f"{c[0] * tp} GPUs")
        else:
            plan.error = f"no {mode} configuration meets the SLO"
        plan.seconds = time.perf_counter() - t0
        out[mode] = plan
    return out


def summary(plan: Plan) -> dict:
    """A JSON-able digest of a plan (what the CLI prints and the benchmarks record)."""
    def row(s: g.Scored) -> dict:
        return {"unit": s.unit.describe(), "kind": s.unit.kind, "gpus": s.unit.num_gpus, "goodput": s.goodput,
                "per_gpu_goodput": s.per_gpu, "evaluations": s.num_evals, "note": s.note, "pruned": s.pruned}
    return {"algorithm": plan.algorithm, "rate": plan.rate,
            "placement": plan.placement.describe() if plan.placement else None,
            "num_gpus": plan.placement.num_devices if plan.placement else None,
            "attainment_at_rate": plan.attainment_at_rate, "error": plan.error,
            "ranked": [row(s) for s in plan.ranked], "prefill": [row(s) for s in plan.prefill],
            "decode": [row(s) for s in plan.decode], "skipped": plan.skipped, "seconds": plan.seconds,
            "num_simulations": plan.num_simulations}


def attainment_curve(dep: Deployment, profile: Profile, work: g.Workload, slo: SLO, rates: list[float],
                     scales: list[float] | None = None) -> dict:
    """Predicted attainment of a placement at each rate, and at each SLO scale at the first rate."""
    from distserve_jax.planner import simulator
    from distserve_jax.planner.workload import at_rate

    out = {"rates": [], "scales": []}
    for r in rates:
        recs = simulator.run(dep, profile, at_rate(work.lens, r, unit=work.unit))
        out["rates"].append({"rate": r, "attainment": metrics.attainment(recs, slo),
                             "summary": metrics.summarize(recs, slos=slo)})
        if scales and r == rates[0]:
            out["scales"] = [{"scale": s, "attainment": metrics.attainment(recs, slo.scaled(s))} for s in scales]
    return out

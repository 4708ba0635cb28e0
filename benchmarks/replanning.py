"""Replanning benchmark (CLI, simulation): a step shift in load, served by the placement planned for
the old load (static-old), the one planned for the new load (static-oracle) and the replanner.

All three run the production controller, schedulers and live placement change on the simulator
(`distserve_jax.planner.replan_sim`), with a latency profile from `configs/profiles/` (default:
the published A100 OPT-13B DistServe coefficients), one node of `--budget` devices and an instance
start-up time of `--startup_s` virtual seconds. The trace: ShareGPT lengths (demo tokenizer) at
`--rate` req/s for `--before_s`, then `--factor` x the rate for `--after_s` (Poisson, seeded);
with `--shift=longbench` the rate stays and the prompts become LongBench-like instead. The
starting placement is Alg. 2's choice for the old load (one full search, remembered by the
replanner's planner: it is the search `--placement=plan` runs); the oracle is the planner's
answer for the new load.

Reported per policy: attainment before and after the shift, time from the shift until every later
`--bucket_s` bucket of arrivals meets the target (target: <= start-up + 60 s), device-seconds,
placement changes; ratios against the oracle; a PNG of attainment over time (`--png`). A second
part serves `--constant_s` (30 min by default) of constant old load with the replanner on and
counts its placement changes (target 0) and searches.

Example:
  python -m benchmarks.replanning --png=benchmarks/replanning.png --json_out=benchmarks/out/replanning.json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from distserve_jax import metrics
from distserve_jax.metrics import SLO
from distserve_jax.planner import drift as dr
from distserve_jax.planner import goodput as g
from distserve_jax.planner import search
from distserve_jax.planner import workload as wl
from distserve_jax.planner.latency_model import Profile
from distserve_jax.planner.replan_search import WindowPlanner
from distserve_jax.planner.replan_sim import attainment_over_time, recovery_time, run_with_replanner
from distserve_jax.planner.replanner import ReplanSettings
from distserve_jax.planner.simulator import SimRequest

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", "configs/profiles/a100-opt-13b.distserve.json", "Latency profile.")
flags.DEFINE_float("ttft_slo", 0.25, "TTFT target (s): OSDI Table 1, chatbot OPT-13B.")
flags.DEFINE_float("tpot_slo", 0.1, "TPOT target (s).")
flags.DEFINE_float("attainment", 0.9, "Attainment target.")
flags.DEFINE_float("rate", 4.0, "Old load (req/s).")
flags.DEFINE_enum("shift", "rate", ["rate", "longbench"], "rate: x --factor; longbench: LongBench-like prompts.")
flags.DEFINE_float("factor", 3.0, "--shift=rate: the new load is this times the old.")
flags.DEFINE_float("before_s", 300.0, "Seconds of old load.")
flags.DEFINE_float("after_s", 300.0, "Seconds of new load.")
flags.DEFINE_float("constant_s", 1800.0, "Seconds of constant old load for the flap count (0: skip).")
flags.DEFINE_integer("budget", 8, "Devices (one node).")
flags.DEFINE_float("startup_s", 30.0, "Virtual seconds a new instance takes to join.")
flags.DEFINE_float("bucket_s", 10.0, "Attainment-over-time bucket (s of arrivals).")
flags.DEFINE_integer("num_requests", 200, "Requests per simulation in the planner's search.")
flags.DEFINE_float("replan_interval_s", 10.0, "Replanner check interval.")
flags.DEFINE_float("replan_window_s", 30.0, "Replanner window.")
flags.DEFINE_float("replan_min_gain", 0.1, "Replanner min gain.")
flags.DEFINE_float("replan_dwell_s", 120.0, "Replanner dwell time.")
flags.DEFINE_integer("seed", 0, "Trace seed.")
flags.DEFINE_string("png", None, "Attainment over time (PNG).")
flags.DEFINE_string("json_out", None, "Results (JSON).")

LIMITS = dict(max_model_len=2048)


def poisson(rate: float, t0: float, t1: float, rng: np.random.Generator) -> list[float]:
    n = rng.poisson(rate * (t1 - t0))
    return sorted(float(t) for t in rng.uniform(t0, t1, n))


def trace(lens_a, lens_b, rate_a, rate_b, before, after, seed) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for k, t in enumerate(poisson(rate_a, 0.0, before, rng)):
        out.append(SimRequest(t, *lens_a[k % len(lens_a)]))
    for k, t in enumerate(poisson(rate_b, before, before + after, rng)):
        out.append(SimRequest(t, *lens_b[(k * 7 + 3) % len(lens_b)]))
    return out


def device_seconds(placements: list[tuple[float, str]], dep_devices: dict[str, int], end: float) -> float:
    return sum(dep_devices[p] * (min(end, t1) - t0)
               for (t0, p), (t1, _) in zip(placements, placements[1:] + [(end, "")]))


def main(argv: list[str]) -> None:
    del argv
    t_start = time.perf_counter()
    prof = Profile.load(FLAGS.profile)
    slo = SLO(FLAGS.ttft_slo, FLAGS.tpot_slo)
    lens_a = wl.lengths("sharegpt", 2000, max_model_len=2048, seed=FLAGS.seed)
    lens_b = wl.lengths("longbench", 2000, max_model_len=2048, seed=FLAGS.seed) if FLAGS.shift == "longbench" \
        else lens_a
    rate_b = FLAGS.rate * (FLAGS.factor if FLAGS.shift == "rate" else 1.0)
    sample_a = lens_a[:FLAGS.num_requests]
    sample_b = lens_b[:FLAGS.num_requests]

    planner = WindowPlanner(prof, slo, budget=FLAGS.budget, limits=LIMITS, target=FLAGS.attainment,
                            num_requests=FLAGS.num_requests, timer=time.process_time)
    c0 = time.process_time()
    plan = search.alg2(prof, search.Cluster(1, FLAGS.budget), g.Workload.make(sample_a, name="sharegpt"), slo,
                       FLAGS.rate, target=FLAGS.attainment, limits=dict(LIMITS))
    search_cpu = time.process_time() - c0
    if plan.placement is None:
        raise SystemExit(f"no placement for the old load: {plan.error}")
    old = plan.placement
    planner.remember(sample_a, plan)
    c0 = time.process_time()
    oracle = planner.propose(sample_b, rate_b, old).target
    oracle_cpu = time.process_time() - c0
    if oracle is None:
        raise SystemExit("the planner found no placement for the new load")
    print(f"profile {prof.name}; SLO {slo.ttft_s}/{slo.tpot_s} s at {FLAGS.attainment:.0%}; budget {FLAGS.budget} "
          f"devices; start-up {FLAGS.startup_s} s")
    print(f"old load {FLAGS.rate} req/s -> {old.describe()} ({old.num_devices} devices; Alg. 2 in "
          f"{search_cpu:.1f} CPU s, best pair {plan.best.unit.describe()} {plan.best.goodput:.2f} req/s)")
    print(f"new load {rate_b} req/s ({FLAGS.shift}) -> oracle {oracle.describe()} ({oracle.num_devices} devices; "
          f"{oracle_cpu:.1f} CPU s)")

    settings = ReplanSettings(interval_s=FLAGS.replan_interval_s, window_s=FLAGS.replan_window_s,
                              min_gain=FLAGS.replan_min_gain, dwell_s=FLAGS.replan_dwell_s,
                              startup_s=FLAGS.startup_s, num_requests=FLAGS.num_requests)
    planned_a = dr.PlannedWorkload(FLAGS.rate, tuple(sample_a))
    reqs = trace(lens_a, lens_b, FLAGS.rate, rate_b, FLAGS.before_s, FLAGS.after_s, FLAGS.seed)
    shift, end = FLAGS.before_s, FLAGS.before_s + FLAGS.after_s
    static = ReplanSettings(interval_s=1e9, window_s=1e9, startup_s=FLAGS.startup_s)  # its first check never comes
    results, series = {}, {}
    for name, dep, st in (("static-old", old, static), ("static-oracle", oracle, static),
                          ("replanner", old, settings)):
        w0, c0 = time.perf_counter(), time.process_time()
        pl = WindowPlanner(prof, slo, budget=FLAGS.budget, limits=LIMITS, target=FLAGS.attainment,
                           num_requests=FLAGS.num_requests, timer=time.process_time)
        pl.remember(sample_a, plan)
        run = run_with_replanner(dep, prof, reqs, planner=pl, planned_for=planned_a, settings=st,
                                 startup_s=FLAGS.startup_s)
        s = attainment_over_time(run.records, slo, FLAGS.bucket_s, end=end - FLAGS.bucket_s)
        series[name] = s
        devs = {p: _devices(p) for _, p in run.placements}
        before = [r for r in run.records if r.arrival_time < shift]
        after = [r for r in run.records if r.arrival_time >= shift]
        results[name] = {
            "attainment_before": metrics.attainment(before, slo), "attainment_after": metrics.attainment(after, slo),
            "recovery_s": recovery_time(s, shift, FLAGS.attainment),
            "device_seconds": device_seconds(run.placements, devs, end),
            "placements": run.placements, "num_changes": len(run.changes),
            "changes": [c.info() for c in run.changes], "log": run.replanner.log,
            "requests": len(run.records), "unfinished": sum(r.finish_time is None for r in run.records),
            "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    target = FLAGS.startup_s + 60.0
    print(f"\n{len(reqs)} requests; shift at {shift:.0f} s; recovery target <= start-up + 60 = {target:.0f} s")
    print(f"{'policy':<14} {'att. before':>11} {'att. after':>10} {'recovery s':>10} {'dev-s':>8} {'changes':>7}  "
          f"vs oracle: att. after, dev-s")
    o = results["static-oracle"]
    for name, r in results.items():
        rec = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.0f}"
        print(f"{name:<14} {r['attainment_before']:>11.3f} {r['attainment_after']:>10.3f} {rec:>10} "
              f"{r['device_seconds']:>8.0f} {r['num_changes']:>7}  {r['attainment_after'] / o['attainment_after']:.3f}x, "
              f"{r['device_seconds'] / o['device_seconds']:.3f}x")
    for e in results["replanner"]["log"]:
        print(f"  replanner at {e['time']:.1f} s: {e['kind']}: {e['detail']}")

    constant = None
    if FLAGS.constant_s > 0:
        w0 = time.perf_counter()
        creqs = trace(lens_a, lens_a, FLAGS.rate, FLAGS.rate, FLAGS.constant_s, 0.0, FLAGS.seed + 1)
        pl = WindowPlanner(prof, slo, budget=FLAGS.budget, limits=LIMITS, target=FLAGS.attainment,
                           num_requests=FLAGS.num_requests, timer=time.process_time)
        pl.remember(sample_a, plan)
        run = run_with_replanner(old, prof, creqs, planner=pl, planned_for=planned_a, settings=settings,
                                 startup_s=FLAGS.startup_s)
        kinds = [e["kind"] for e in run.replanner.log]
        d = run.replanner.last_drift
        constant = {"seconds": FLAGS.constant_s, "requests": len(creqs), "num_changes": len(run.changes),
                    "searches": kinds.count("plan"), "log": run.replanner.log,
                    "attainment": metrics.attainment(run.records, slo),
                    "last_rate_ratio": d.rate_ratio if d else None, "wall_s": time.perf_counter() - w0}
        print(f"\nconstant {FLAGS.rate} req/s for {FLAGS.constant_s:.0f} s ({len(creqs)} requests): "
              f"{constant['num_changes']} placement changes (target 0), {constant['searches']} searches, "
              f"attainment {constant['attainment']:.3f}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s wall")

    if FLAGS.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        for name, s in series.items():
            ax.plot([t + FLAGS.bucket_s / 2 for t, _, _ in s], [a for _, a, _ in s], label=name,
                    drawstyle="steps-mid")
        ax.axvline(shift, color="grey", ls="--", lw=1)
        ax.axhline(FLAGS.attainment, color="grey", ls=":", lw=1)
        for t, p in results["replanner"]["placements"][1:]:
            ax.axvline(t, color="tab:green", lw=0.8, alpha=0.6)
            ax.annotate(p, (t, 0.05), rotation=90, fontsize=7, color="tab:green")
        ax.set_xlabel("arrival time (s)")
        ax.set_ylabel(f"SLO attainment per {FLAGS.bucket_s:.0f} s")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{prof.name}: {FLAGS.rate} -> {rate_b} req/s ({FLAGS.shift}), start-up {FLAGS.startup_s:.0f} s")
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(FLAGS.png, dpi=110)
        print(f"wrote {FLAGS.png}")
    if FLAGS.json_out:
        Path(FLAGS.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.json_out).write_text(json.dumps({
            "flags": {k: FLAGS[k].value for k in ("profile", "rate", "shift", "factor", "before_s", "after_s",
                                                   "budget", "startup_s", "seed")},
            "old": old.describe(), "oracle": oracle.describe(), "search_cpu_s": search_cpu, "results": results,
            "series": series, "constant": constant}, default=_json, indent=1))


def _devices(desc: str) -> int:
    """Devices of a placement description like `2xP(tp1)+D(tp2)` (tp x pp per instance)."""
    total = 0
    for part in desc.split("+"):
        n = int(part.split("x", 1)[0]) if part[0].isdigit() else 1
        inner = part[part.index("(") + 1:part.index(")")]
        tp = pp = 1
        for kv in inner.split(","):
            if kv.startswith("tp"):
                tp = int(kv[2:])
            elif kv.startswith("pp"):
                pp = int(kv[2:])
        total += n * tp * pp
    return total


def _json(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    app.run(main)

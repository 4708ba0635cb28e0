"""Replanning on the engine (benchmark CLI): a step shift in load served by a real engine, with the
replanner off (static-old), on (replanner), and off from the placement the replanner ended at
(static-oracle: the planner's choice for the new load, serving from the start), in one run.

The engine is the server's core (`build_core` + `planner.online.MonitoredCore`, the replanner built
by `planner.online.build_replanner` as `--replan=on` builds it) on the demo model, starting from
P(tp1)+D(tp1) on `--num_devices` devices (threads executor: CPU devices of this process; ray: one
pinned process per instance). The trace: ShareGPT requests (demo tokenizer, outputs clipped to
`--max_output_len`) at `--rate` req/s for `--before_s`, then `--factor` x the rate for
`--after_s` (Poisson, seeded; the same requests and arrivals for both policies). The SLO is
`--ttft_scale` / `--tpot_scale` x the unloaded p50s measured first, stated before the runs.

Reported per policy: attainment before and after the shift, per `--bucket_s` bucket of arrivals
(a PNG with `--png`), the time from the shift back to >= the target for good, every placement
change (when it started and finished, from what to what), requests finished, and the replanner's
log. Every request must finish with its tokens; the KV blocks of every worker must be free at the
end (checked).

On a host with fewer cores than instances (this 2-core machine), instances added by a change
share the cores the first two use: the replanner's profile predicts isolated devices, so a
scale-up here shows the mechanism (live change under load, nothing dropped), not added capacity.

Example:
  python -m benchmarks.replanning_engine --png=benchmarks/replanning_engine.png
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks.replay import replay
from distserve_jax import metrics
from distserve_jax.engine.factory import build_core
from distserve_jax.engine.model_source import resolve_model
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.planner.online import MonitoredCore, build_replanner
from distserve_jax.planner.replan_sim import recovery_time
from distserve_jax.planner.replanner import ReplanSettings
from distserve_jax.workloads import load_workload

FLAGS = flags.FLAGS
flags.DEFINE_enum("executor", "threads", ["threads", "ray"], "Executor of the engine.")
flags.DEFINE_integer("num_devices", 4, "Devices the engine (and the replanner's budget) sees.")
flags.DEFINE_string("profile", "configs/profiles/demo-cpu.json", "The replanner's latency profile.")
flags.DEFINE_float("rate", 1.0, "Old load (req/s).")
flags.DEFINE_float("factor", 3.0, "The new load is this times the old.")
flags.DEFINE_float("before_s", 60.0, "Seconds of old load.")
flags.DEFINE_float("after_s", 120.0, "Seconds of new load.")
flags.DEFINE_float("bucket_s", 10.0, "Attainment-over-time bucket (s of arrivals).")
flags.DEFINE_float("ttft_scale", 6.0, "TTFT target as a multiple of the unloaded p50 TTFT.")
flags.DEFINE_float("tpot_scale", 2.0, "TPOT target as a multiple of the unloaded p50 TPOT.")
flags.DEFINE_float("target", 0.9, "Attainment target.")
flags.DEFINE_float("interval_s", 5.0, "--replan_interval_s.")
flags.DEFINE_float("window_s", 15.0, "--replan_window_s.")
flags.DEFINE_float("dwell_s", 30.0, "--replan_dwell_s.")
flags.DEFINE_float("min_gain", 0.1, "--replan_min_gain.")
flags.DEFINE_integer("max_model_len", 256, "Context of the engine.")
flags.DEFINE_integer("max_output_len", 64, "ShareGPT outputs are clipped to this many tokens.")
flags.DEFINE_integer("max_num_seqs", 8, "Most sequences per step.")
flags.DEFINE_integer("seed", 0, "Seed of the trace and the arrivals.")
flags.DEFINE_string("png", "", "Attainment over time (PNG).")


def make_trace(tokenizer: Any) -> list:
    rng = np.random.default_rng(FLAGS.seed)
    times, t = [], 0.0
    end = FLAGS.before_s + FLAGS.after_s
    while True:
        rate = FLAGS.rate if t < FLAGS.before_s else FLAGS.rate * FLAGS.factor
        t += rng.exponential(1.0 / rate)
        if t >= end:
            break
        times.append(t)
    reqs = load_workload("sharegpt", len(times), tokenizer=tokenizer, seed=FLAGS.seed, max_model_len=1 << 30,
                         max_prompt_len=FLAGS.max_model_len - FLAGS.max_output_len, max_conversations=20000)
    return [dataclasses.replace(r, arrival_time=a, max_tokens=min(r.max_tokens, FLAGS.max_output_len))
            for r, a in zip(reqs, times)]


def build(replan: bool, slo: metrics.SLO | None, placement: Placement | None = None) -> tuple[Any, Any]:
    core = build_core("demo", placement=placement or Placement((InstanceSpec(),), (InstanceSpec(),)),
                      devices=jax.devices()[:FLAGS.num_devices], executor=FLAGS.executor,
                      max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs, seed=FLAGS.seed)
    core.warmup(wait_background=True)  # measure steady state: not the deferred warm-up work
    replanner = None
    if replan:
        settings = ReplanSettings(interval_s=FLAGS.interval_s, min_gain=FLAGS.min_gain, window_s=FLAGS.window_s,
                                  dwell_s=FLAGS.dwell_s)
        limits = dict(max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs,
                      max_num_batched_tokens=2048, block_size=16)
        replanner = build_replanner(core, settings, slo=slo, model="demo", num_devices=FLAGS.num_devices,
                                    limits=limits, plan_rate=FLAGS.rate, plan_workload="sharegpt",
                                    profile_path=FLAGS.profile, target=FLAGS.target)
    return core, MonitoredCore(core, replanner, window_s=FLAGS.window_s)


def calibrate(trace: list) -> dict[str, float]:
    core, mc = build(False, None)
    try:
        recs = []
        for i, r in enumerate(trace[:6]):
            recs += replay(mc, [dataclasses.replace(r, arrival_time=0.0)], max_duration_s=30, id_prefix=f"c{i}-").records
    finally:
        mc.shutdown()
    done = [r for r in recs if r.completed]
    return {"ttft": statistics.median(r.ttft for r in done),
            "tpot": statistics.median(r.tpot for r in done if r.tpot is not None)}


def buckets(records: list, trace: list, slo: metrics.SLO) -> list[tuple[float, float, int]]:
    n = int((FLAGS.before_s + FLAGS.after_s) // FLAGS.bucket_s) + 1
    groups: list[list] = [[] for _ in range(n)]
    for rec, req in zip(records, trace):
        groups[min(n - 1, int(req.arrival_time // FLAGS.bucket_s))].append(rec)
    return [(k * FLAGS.bucket_s, metrics.attainment(g, slo) if g else float("nan"), len(g))
            for k, g in enumerate(groups)]


def serve(policy: str, trace: list, slo: metrics.SLO, placement: Placement | None = None) -> dict[str, Any]:
    core, mc = build(policy == "replanner", slo, placement)
    try:
        t0 = core.clock()
        wall = time.perf_counter()
        res = replay(mc, trace, max_duration_s=FLAGS.before_s + FLAGS.after_s + 120, id_prefix=f"{policy}-")
        while mc.has_unfinished_requests():  # a change or a search still in progress
            mc.step()
        changes = dict(core.placement_changes)  # finished changes by state
        synced = core.quiesce()
        leaks = {n: s.load.total_blocks - s.load.free_blocks for n, s in synced.items()
                 if s.load.free_blocks != s.load.total_blocks}
        log = [dict(e, time=e["time"] - t0) for e in (mc.replanner.log if mc.replanner is not None else [])]
        now = core.current_placement()
        described = now.describe() if now is not None else core.info().get("placement")
    finally:
        mc.shutdown()
    recs = res.records
    before = [r for r, q in zip(recs, trace) if q.arrival_time < FLAGS.before_s]
    after = [r for r, q in zip(recs, trace) if q.arrival_time >= FLAGS.before_s]
    series = buckets(recs, trace, slo)
    return {"policy": policy, "t0": t0, "wall_s": time.perf_counter() - wall, "series": series,
            "before": metrics.attainment(before, slo), "after": metrics.attainment(after, slo),
            "recovery_s": recovery_time(series, FLAGS.before_s, FLAGS.target),
            "finished": sum(r.completed for r in recs), "requests": len(recs), "timed_out": res.timed_out,
            "changes": changes, "leaked_blocks": leaks, "log": log, "final_placement": described, "placement": now}


def plot(path: str, runs: list[dict], slo: metrics.SLO) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        xs = [t for t, a, n in run["series"] if n]
        ax.plot(xs, [100 * a for t, a, n in run["series"] if n], marker="o", label=run["policy"])
    ax.axvline(FLAGS.before_s, color="k", linestyle=":", linewidth=1, label="shift")
    ax.axhline(100 * FLAGS.target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"demo, {FLAGS.executor}, {FLAGS.rate:g} -> {FLAGS.rate * FLAGS.factor:g} req/s, "
                 f"TTFT<={slo.ttft_s * 1e3:.0f} ms, TPOT<={slo.tpot_s * 1e3:.1f} ms", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    spec = resolve_model("demo")
    trace = make_trace(spec.tokenizer)
    print(f"trace: {len(trace)} ShareGPT requests, {FLAGS.rate:g} req/s for {FLAGS.before_s:g} s then "
          f"{FLAGS.rate * FLAGS.factor:g} req/s for {FLAGS.after_s:g} s; executor {FLAGS.executor}, "
          f"{FLAGS.num_devices} devices, host cores {len(os.sched_getaffinity(0))}", flush=True)
    cal = calibrate(trace)
    slo = metrics.SLO(FLAGS.ttft_scale * cal["ttft"], FLAGS.tpot_scale * cal["tpot"])
    print(f"unloaded p50 TTFT {cal['ttft'] * 1e3:.1f} ms, TPOT {cal['tpot'] * 1e3:.2f} ms -> SLO TTFT <= "
          f"{slo.ttft_s * 1e3:.0f} ms, TPOT <= {slo.tpot_s * 1e3:.1f} ms ({FLAGS.ttft_scale:g}x / "
          f"{FLAGS.tpot_scale:g}x), target {FLAGS.target:.0%}", flush=True)
    runs = [serve(p, trace, slo) for p in ("static-old", "replanner")]
    oracle = runs[1]["placement"]
    if oracle is not None and oracle.describe() != runs[0]["final_placement"]:
        runs.append(serve("static-oracle", trace, slo, oracle))
    else:
        print("static-oracle: the replanner kept the old placement, so it is static-old", flush=True)
    print(f"\n{'policy':<12} {'att. before':>11} {'att. after':>10} {'recovery s':>10} {'finished':>9} "
          f"{'changes':>8} {'wall s':>7} {'leaked':>7}  final placement")
    for r in runs:
        rec = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.0f}"
        print(f"{r['policy']:<12} {r['before']:>11.3f} {r['after']:>10.3f} {rec:>10} "
              f"{r['finished']:>4}/{r['requests']:<4} {sum(r['changes'].values()):>8} {r['wall_s']:>7.0f} "
              f"{sum(r['leaked_blocks'].values()):>7}  {r['final_placement']}")
    for r in runs:
        print(f"  {r['policy']}: placement changes by state {r['changes']}")
        for e in r["log"]:
            print(f"  {r['policy']} at {e['time']:.1f} s: {e['kind']}: {e['detail']}")
    print("\nattainment per bucket of arrivals:")
    print("  t (s)  " + "  ".join(f"{r['policy']:>12}" for r in runs))
    for k in range(len(runs[0]["series"])):
        cells = [f"{r['series'][k][1]:>7.2f} ({r['series'][k][2]:>3})" if r["series"][k][2] else f"{'-':>12}"
                 for r in runs]
        print(f"  {runs[0]['series'][k][0]:>5.0f}  " + "  ".join(cells))
    if FLAGS.png:
        plot(FLAGS.png, runs, slo)
        print(f"wrote {FLAGS.png}")
    logging.info("done")


if __name__ == "__main__":
    app.run(main)

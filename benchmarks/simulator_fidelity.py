"""Simulator fidelity benchmark (CLI): simulated vs measured SLO attainment on the same requests.

For each deployment in `--configs` (`colocated1`, `colocated2`: one / two colocated tp=1 replicas;
`chunked`: one chunked-prefill tp=1 replica; `1p1d`: a tp=1 prefill and a tp=1 decode instance)
and each rate, the same `--num_requests` requests (ShareGPT lengths tokenised with the demo
tokenizer, clipped to `--max_model_len`; random token ids; Poisson arrivals of one seeded
process scaled by 1 / rate) are
  - served for real: `build_core(..., executor=--executor)` on the first devices, warmed up, and
    replayed on the wall clock (`benchmarks.replay`), and
  - simulated: the same deployment (the real engine's KV blocks and limits) on the latency
    profile `--profile` (fitted on these devices by `python -m distserve_jax.planner profile`).
Attainment (both targets, per request, `distserve_jax.metrics`) is reported for both with 95%
Wilson intervals, and their difference in percentage points (the paper's Table 2 standard is
within 2 pp at every point).

SLOs: `--ttft_slo` / `--tpot_slo`, or when 0, `--ttft_scale` x the profile's prefill time of the
90th-percentile prompt and `--tpot_scale` x its decode step at a full batch (`--max_num_seqs`). Rates: `--rates`, or when empty,
`--rate_factors` x each deployment's simulated goodput.

`--executor=threads` runs every instance as a thread of this process: on CPU devices the
instances share the host's cores (and, here, a host shared with other jobs), so the real step
times vary with what else runs, which the profile cannot know; `--executor=ray` (isolated
processes per instance) once it exists in `engine/factory.py`.

Example (a small run; the full acceptance run is --num_requests=1000):
  python -m benchmarks.simulator_fidelity --profile=configs/profiles/demo-cpu.json --num_requests=300
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from distserve_jax import metrics  # noqa: E402
from distserve_jax.planner import deployment as dp  # noqa: E402
from distserve_jax.planner import goodput as g  # noqa: E402
from distserve_jax.planner import simulator  # noqa: E402
from distserve_jax.planner import workload as wl  # noqa: E402
from distserve_jax.planner.latency_model import Profile  # noqa: E402
from distserve_jax.workloads import WorkloadRequest  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("executor", "threads", "Executor hosting the real workers (threads; ray once it lands).")
flags.DEFINE_string("model", "demo", "Model served for real.")
flags.DEFINE_string("profile", "configs/profiles/demo-cpu.json", "Latency profile of --model on these devices.")
flags.DEFINE_list("configs", ["colocated1", "colocated2", "chunked", "1p1d"], "Deployments.")
flags.DEFINE_list("rates", [], "Rates (req/s); empty: --rate_factors x the simulated goodput.")
flags.DEFINE_list("rate_factors", ["0.5", "0.75", "1.0", "1.25", "1.5"], "Multiples of the simulated goodput.")
flags.DEFINE_integer("num_requests", 1000, "Requests per point.")
flags.DEFINE_string("workload", "sharegpt", "Workload lengths.")
flags.DEFINE_integer("max_model_len", 512, "Context length.")
flags.DEFINE_integer("max_output_len", 128, "Output lengths are clipped to this.")
flags.DEFINE_integer("max_num_seqs", 16, "Engine limit.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Engine limit (the chunked replica's chunk budget too).")
flags.DEFINE_integer("num_blocks", 400, "KV blocks per instance.")
flags.DEFINE_float("ttft_slo", 0.0, "TTFT target (s); 0: --ttft_scale x the profile's prefill of the p90 prompt.")
flags.DEFINE_float("tpot_slo", 0.0, "TPOT target (s); 0: --tpot_scale x the profile's decode step at a full batch.")
flags.DEFINE_float("ttft_scale", 3.0, "See --ttft_slo.")
flags.DEFINE_float("tpot_scale", 3.0, "See --tpot_slo.")
flags.DEFINE_float("drain_s", 120.0, "Seconds after the last arrival before a real run is cut.")
flags.DEFINE_integer("seed", 0, "Workload and arrival seed.")
flags.DEFINE_string("out", "benchmarks/out/simulator_fidelity.json", "JSON results.")

SPECS = {"colocated1": ("colocated", [("colocated", 1, 1)]), "colocated2": ("colocated", [("colocated", 1, 1)] * 2),
         "chunked": ("chunked", [("colocated", 1, 1)]), "1p1d": ("disaggregated", [("prefill", 1, 1), ("decode", 1, 1)])}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def limits() -> dict:
    return dict(block_size=16, max_num_seqs=FLAGS.max_num_seqs, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                max_model_len=FLAGS.max_model_len)


def real_core(name: str):
    from distserve_jax.engine.factory import build_core
    from distserve_jax.engine.placement import InstanceSpec, Placement

    mode, specs = SPECS[name]
    kw = dict(max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs, num_blocks=FLAGS.num_blocks,
              max_num_batched_tokens=FLAGS.max_num_batched_tokens, seed=FLAGS.seed, executor=FLAGS.executor)
    if mode == "disaggregated":
        core = build_core(FLAGS.model, placement=Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=1),)), **kw)
    else:
        core = build_core(FLAGS.model, mode=mode, tp=1, replicas=len(specs), **kw)
    core.warmup(wait_background=True)  # measure steady state: not the deferred warm-up work
    return core


def sim_deployment(name: str) -> dp.Deployment:
    mode, specs = SPECS[name]
    d = dp.build(mode, specs, **limits())
    return d.with_limits(instances=tuple(dp.SimInstance(i.name, i.role, i.tp, i.pp, i.devices, FLAGS.num_blocks)
                                         for i in d.instances))


def attain(recs, slo) -> dict:
    k = sum(metrics.meets_slo(r, slo) for r in recs)
    lo, hi = wilson(k, len(recs))
    return {"attainment": k / len(recs), "ci95": [lo, hi], "n": len(recs)}


def main(argv):
    del argv
    from benchmarks.replay import replay

    prof = Profile.load(FLAGS.profile)
    lens = [(min(p, FLAGS.max_model_len - FLAGS.max_output_len), min(o, FLAGS.max_output_len))
            for p, o in wl.lengths(FLAGS.workload, FLAGS.num_requests, seed=FLAGS.seed, max_model_len=FLAGS.max_model_len)]
    work = g.Workload.make(lens, seed=FLAGS.seed, name=FLAGS.workload)
    sm = prof.step_model(1, 1)
    mean_p = int(work.mean_prompt)
    p90 = int(np.percentile([p for p, _ in lens], 90))
    ttft = FLAGS.ttft_slo or FLAGS.ttft_scale * sm.stage_time([g.WorkShape([0] * p90, 0)])
    tpot = FLAGS.tpot_slo or FLAGS.tpot_scale * sm.stage_time([g.WorkShape([0], mean_p)] * FLAGS.max_num_seqs)
    slo = metrics.SLO(ttft, tpot)
    rng = np.random.default_rng(FLAGS.seed)
    vocab = 1000
    ids = [[int(t) for t in rng.integers(3, vocab, p)] for p, _ in lens]
    out = {"flags": {k: getattr(FLAGS, k) for k in ("executor", "model", "profile", "num_requests", "workload",
                                                    "max_model_len", "max_output_len", "max_num_seqs",
                                                    "max_num_batched_tokens", "num_blocks", "seed")},
           "slo": [slo.ttft_s, slo.tpot_s], "machine": f"{os.cpu_count()} cores", "points": []}
    logging.info("SLO: TTFT %.3fs TPOT %.4fs; mean prompt %d, output %d", ttft, tpot, mean_p, work.mean_output)
    print(f"SLO TTFT {ttft:.3f}s TPOT {tpot:.4f}s; {len(lens)} requests, mean prompt {work.mean_prompt:.0f} "
          f"output {work.mean_output:.0f}")
    for name in FLAGS.configs:
        dep = sim_deployment(name)
        if FLAGS.rates:
            rates = [float(r) for r in FLAGS.rates]
        else:
            unit = g.Unit(name, dep, dep.num_devices)
            gp = g.search_rate(lambda r: g.attainment(unit, prof, work, slo, r), guess=g.guess_rate(unit, prof, work),
                               target=0.9, rel_tol=0.02).rate
            if gp <= 0:
                raise ValueError(f"{name}: the SLO is met at no rate in simulation; loosen --ttft_scale/--tpot_scale")
            rates = [round(gp * float(f), 3) for f in FLAGS.rate_factors]
        core = real_core(name)
        for rate in rates:
            reqs = wl.at_rate(lens, rate, unit=work.unit)
            srecs = simulator.run(dep, prof, reqs)
            trace = [WorkloadRequest(None, ids[i], p, o, reqs[i].arrival_time) for i, (p, o) in enumerate(lens)]
            t0 = time.perf_counter()
            res = replay(core, trace, max_duration_s=reqs[-1].arrival_time + FLAGS.drain_s, id_prefix=f"{name}-{rate}-")
            real, sim_ = attain(res.records, slo), attain(srecs, slo)
            diff = 100 * (sim_["attainment"] - real["attainment"])
            row = {"config": name, "placement": dep.describe(), "rate": rate, "real": real, "sim": sim_,
                   "diff_pp": diff, "real_wall_s": time.perf_counter() - t0, "timed_out": res.timed_out,
                   "real_ttft_p90": metrics.summarize(res.records)["ttft_s"]["p90"],
                   "sim_ttft_p90": metrics.summarize(srecs)["ttft_s"]["p90"],
                   "real_tpot_p90": metrics.summarize(res.records)["tpot_s"]["p90"],
                   "sim_tpot_p90": metrics.summarize(srecs)["tpot_s"]["p90"]}
            out["points"].append(row)
            print(f"{name:<11} rate {rate:>7.3f}: real {real['attainment']:.3f} [{real['ci95'][0]:.3f},"
                  f"{real['ci95'][1]:.3f}]  sim {sim_['attainment']:.3f} [{sim_['ci95'][0]:.3f},{sim_['ci95'][1]:.3f}]"
                  f"  diff {diff:+.1f} pp  (TTFT p90 real {row['real_ttft_p90']} sim {row['sim_ttft_p90']:.3f}; "
                  f"TPOT p90 real {row['real_tpot_p90']} sim {row['sim_tpot_p90']:.4f})", flush=True)
            Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
            Path(FLAGS.out).write_text(json.dumps(out, indent=1, default=str))
        core.shutdown()
    worst = max(abs(p["diff_pp"]) for p in out["points"])
    print(f"max |sim - real| = {worst:.1f} pp over {len(out['points'])} points; wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)

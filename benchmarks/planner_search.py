"""Planner search benchmark (CLI): Alg. 1 and Alg. 2 on a 4 x 8 A100 cluster with the published
OPT-66B coefficients on ShareGPT, timed, with the simulation speed.

For each algorithm in `--algorithms` it runs the planner's search (`distserve_jax.planner.search`)
for `--rate` req/s under `--ttft_slo` / `--tpot_slo` at `--attainment`, with `--num_requests`
simulated requests per goodput evaluation in `--jobs` processes, and reports: wall time, CPU time
(this process and its children), the number of simulations and simulated requests, simulated
requests per CPU second, the ranked candidates and the chosen placement with its attainment at
the rate (simulated with `--verify_requests` requests). Alg. 1 assumes a high-affinity cluster:
its KV moves over `--high_affinity_gbps` links between nodes (the paper's testbed has 25 Gbit/s,
the low-affinity case Alg. 2 is for). A separate measurement times one simulation of
`--speed_requests` ShareGPT requests on 1P(tp4)+1D(tp2,pp2) for the raw simulator speed.

Results go to `--out` (JSON). ShareGPT lengths are tokenised once with the demo tokenizer and cached
(`~/.cache/distserve_jax/planner`); the first run pays that (~15 s).

Example:
  python -m benchmarks.planner_search --jobs=2 --out=benchmarks/out/planner_search.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from pathlib import Path

from absl import app, flags

from distserve_jax import metrics
from distserve_jax.planner import deployment as dp
from distserve_jax.planner import goodput as g
from distserve_jax.planner import search, simulator
from distserve_jax.planner import workload as wl
from distserve_jax.planner.latency_model import Profile

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", "configs/profiles/a100-opt-66b.distserve.json", "Latency profile.")
flags.DEFINE_string("workload", "sharegpt", "Workload.")
flags.DEFINE_float("ttft_slo", 2.5, "TTFT target (s): OSDI Table 1, chatbot OPT-66B.")
flags.DEFINE_float("tpot_slo", 0.15, "TPOT target (s).")
flags.DEFINE_float("attainment", 0.9, "Attainment target.")
flags.DEFINE_float("rate", 8.0, "Rate to plan for (req/s).")
flags.DEFINE_integer("num_nodes", 4, "Nodes.")
flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.")
flags.DEFINE_integer("num_requests", 200, "Requests per goodput evaluation.")
flags.DEFINE_integer("verify_requests", 500, "Requests simulating the chosen placement.")
flags.DEFINE_integer("speed_requests", 2000, "Requests of the raw simulator-speed run.")
flags.DEFINE_float("high_affinity_gbps", 200.0, "Alg. 1: inter-node KV link (Gbit/s).")
flags.DEFINE_list("algorithms", ["alg1", "alg2"], "Which searches.")
flags.DEFINE_integer("jobs", 2, "Processes.")
flags.DEFINE_string("out", "benchmarks/out/planner_search.json", "JSON results.")


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def speed(prof: Profile, lens: list[tuple[int, int]]) -> dict:
    dep = dp.build("disaggregated", [("prefill", 4, 1), ("decode", 2, 2)])
    reqs = wl.at_rate(lens, 2.0, seed=1)
    t0, c0 = time.perf_counter(), time.process_time()
    recs = simulator.run(dep, prof, reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = sum(r.output_len for r in recs)
    return {"placement": dep.describe(), "requests": len(reqs), "output_tokens": toks, "wall_s": wall, "cpu_s": cpu,
            "requests_per_cpu_s": len(reqs) / cpu, "tokens_per_cpu_s": toks / cpu,
            "attainment": metrics.attainment(recs, metrics.SLO(FLAGS.ttft_slo, FLAGS.tpot_slo))}


def main(argv):
    del argv
    prof = Profile.load(FLAGS.profile)
    slo = metrics.SLO(FLAGS.ttft_slo, FLAGS.tpot_slo)
    cluster = search.Cluster(FLAGS.num_nodes, FLAGS.gpus_per_node)
    t0 = time.perf_counter()
    lens = wl.lengths(FLAGS.workload, max(FLAGS.num_requests, FLAGS.verify_requests, FLAGS.speed_requests))
    load_s = time.perf_counter() - t0
    work = g.Workload.make(lens[:FLAGS.num_requests], name=FLAGS.workload)
    verify = g.Workload.make(lens[:FLAGS.verify_requests], seed=1, name=FLAGS.workload)
    out = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()}", "workload_load_s": load_s,
           "flags": {k: getattr(FLAGS, k) for k in ("profile", "workload", "ttft_slo", "tpot_slo", "attainment",
                                                    "rate", "num_nodes", "gpus_per_node", "num_requests",
                                                    "verify_requests", "high_affinity_gbps", "jobs")},
           "mean_prompt": work.mean_prompt, "mean_output": work.mean_output, "runs": {}}
    out["speed"] = speed(prof, lens[:FLAGS.speed_requests])
    print(f"simulator speed: {out['speed']['requests_per_cpu_s']:.0f} simulated requests / CPU s "
          f"({out['speed']['tokens_per_cpu_s']:.0f} tokens / CPU s) on {out['speed']['placement']}")
    for alg in FLAGS.algorithms:
        p = prof
        if alg == "alg1":
            p = dataclasses.replace(prof, hardware=dataclasses.replace(prof.hardware,
                                                                        inter_node_gbit_s=FLAGS.high_affinity_gbps))
        fn = search.alg1 if alg == "alg1" else search.alg2
        w0, c0 = time.perf_counter(), cpu_seconds()
        plan = fn(p, cluster, work, slo, FLAGS.rate, target=FLAGS.attainment, jobs=FLAGS.jobs, verify=verify)
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        s = search.summary(plan)
        s.update(wall_s=wall, cpu_s=cpu, simulated_requests=plan.num_simulations * FLAGS.num_requests)
        out["runs"][alg] = s
        print(f"{alg}: {wall:.1f}s wall, {cpu:.1f}s CPU, {plan.num_simulations} simulations; "
              f"best {plan.best.unit.describe()} {plan.best.per_gpu:.3f} req/s/GPU; placement "
              f"{s['placement']} ({s['num_gpus']} GPUs), attainment {s['attainment_at_rate']} at {FLAGS.rate}/s "
              f"{s['error'] or ''}")
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)

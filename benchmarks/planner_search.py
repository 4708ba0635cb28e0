"""Planner search benchmark (CLI): Alg. 1 and Alg. 2 on a 4 x 8 A100 cluster with the published
OPT-66B coefficients on ShareGPT, timed, with the simulation speed.

It takes the planner CLI's flags (`distserve_jax.planner.cli`: `--profile`, `--workload`,
`--tokenizer`, `--ttft_slo`, `--tpot_slo`, `--attainment`, `--rate`, `--num_nodes`,
`--gpus_per_node`, `--num_requests`, `--verify_requests`, `--jobs`, the engine limits,
`--json_out`, ...) with their defaults; the command below sets the OSDI chatbot OPT-66B scenario.
For each algorithm in `--algorithms` it runs the planner's search (`distserve_jax.planner.search`)
and reports: wall time, CPU time (this process and its children), the number of simulations and
simulated requests, the ranked candidates and the chosen placement with its attainment at the rate
(simulated with `--verify_requests` requests). Alg. 1 assumes a high-affinity cluster: its KV
moves over `--high_affinity_gbps` links between nodes (the paper's testbed has 25 Gbit/s, the
low-affinity case Alg. 2 is for). A separate measurement times one simulation of
`--speed_requests` ShareGPT requests on 1P(tp4)+1D(tp2,pp2) at 2 req/s, with fast-forward and
turn by turn (the same records), for the raw simulator speed.

Results go to `--json_out` (JSON). ShareGPT lengths are tokenised once with `--tokenizer` and
cached (`~/.cache/distserve_jax/planner`); the first run pays that (~15 s). The search's requests
are the first `--num_requests` of one draw, the check's the first `--verify_requests` with
arrivals of seed `--seed` + 1.

Example (the OSDI Table 1 chatbot OPT-66B SLOs, 8 req/s):
  python -m benchmarks.planner_search --profile=configs/profiles/a100-opt-66b.distserve.json \
    --ttft_slo=2.5 --tpot_slo=0.15 --rate=8 --num_nodes=4 --num_requests=200 --verify_requests=500 \
    --jobs=2 --json_out=benchmarks/out/planner_search.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from pathlib import Path

from absl import app, flags, logging

from distserve_jax import metrics
from distserve_jax.planner import cli
from distserve_jax.planner import deployment as dp
from distserve_jax.planner import goodput as g
from distserve_jax.planner import search, simulator
from distserve_jax.planner import workload as wl
from distserve_jax.planner.latency_model import Profile

FLAGS = flags.FLAGS
flags.DEFINE_integer("speed_requests", 2000, "Requests of the raw simulator-speed run.")
flags.DEFINE_float("high_affinity_gbps", 200.0, "Alg. 1: inter-node KV link (Gbit/s).")
flags.DEFINE_list("algorithms", ["alg1", "alg2"], "Which searches (none: the simulator speed alone).")


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def speed(prof: Profile, lens: list[tuple[int, int]]) -> dict:
    """One simulation with fast-forward and one turn by turn, on the same requests."""
    dep = dp.build("disaggregated", [("prefill", 4, 1), ("decode", 2, 2)], **cli.limits())
    reqs = wl.at_rate(lens, 2.0, seed=1)
    out, recs = {}, {}
    for ff in (True, False):
        t0, c0 = time.perf_counter(), time.process_time()
        recs[ff] = simulator.run(dep, prof, reqs, fast_forward=ff)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        toks = sum(r.output_len for r in recs[ff])
        out["fast_forward" if ff else "turn_by_turn"] = {
            "wall_s": wall, "cpu_s": cpu, "requests_per_cpu_s": len(reqs) / cpu, "tokens_per_cpu_s": toks / cpu}
    return {"placement": dep.describe(), "requests": len(reqs), "output_tokens": toks, **out,
            "speedup": out["turn_by_turn"]["cpu_s"] / out["fast_forward"]["cpu_s"],
            "same_records": recs[True] == recs[False],
            "attainment": metrics.attainment(recs[True], metrics.SLO(FLAGS.ttft_slo, FLAGS.tpot_slo))}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the engine logs every simulated preemption at INFO
    prof = cli.load_profile(FLAGS.profile)
    slo = metrics.SLO(FLAGS.ttft_slo, FLAGS.tpot_slo)
    cluster = search.Cluster(FLAGS.num_nodes, FLAGS.gpus_per_node)
    t0 = time.perf_counter()
    lens = wl.lengths(FLAGS.workload, max(FLAGS.num_requests, FLAGS.verify_requests, FLAGS.speed_requests),
                      seed=FLAGS.seed, max_model_len=FLAGS.max_model_len, tokenizer=FLAGS.tokenizer)
    load_s = time.perf_counter() - t0
    work = g.Workload.make(lens[:FLAGS.num_requests], cv=FLAGS.cv, seed=FLAGS.seed, name=FLAGS.workload)
    verify = g.Workload.make(lens[:FLAGS.verify_requests], cv=FLAGS.cv, seed=FLAGS.seed + 1, name=FLAGS.workload)
    out = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()}", "workload_load_s": load_s,
           "flags": {k: getattr(FLAGS, k) for k in ("profile", "workload", "ttft_slo", "tpot_slo", "attainment",
                                                    "rate", "num_nodes", "gpus_per_node", "num_requests",
                                                    "verify_requests", "high_affinity_gbps", "jobs", "seed", "cv",
                                                    "block_size", "max_num_seqs", "max_num_batched_tokens",
                                                    "max_model_len")},
           "mean_prompt": work.mean_prompt, "mean_output": work.mean_output, "runs": {}}
    sp = out["speed"] = speed(prof, lens[:FLAGS.speed_requests])
    print(f"simulator speed on {sp['placement']}, {sp['requests']} requests: fast-forward "
          f"{sp['fast_forward']['requests_per_cpu_s']:.0f} simulated requests / CPU s "
          f"({sp['fast_forward']['tokens_per_cpu_s']:.0f} tokens / CPU s), turn by turn "
          f"{sp['turn_by_turn']['requests_per_cpu_s']:.0f} ({sp['speedup']:.2f}x); same records: {sp['same_records']}")
    for alg in [a for a in FLAGS.algorithms if a]:  # --algorithms= : the simulator speed alone
        p = prof
        if alg == "alg1":
            p = dataclasses.replace(prof, hardware=dataclasses.replace(prof.hardware,
                                                                        inter_node_gbit_s=FLAGS.high_affinity_gbps))
        fn = search.alg1 if alg == "alg1" else search.alg2
        w0, c0 = time.perf_counter(), cpu_seconds()
        kw = dict(prune=FLAGS.prune) if alg == "alg1" else dict(exhaustive=FLAGS.exhaustive)
        plan = fn(p, cluster, work, slo, FLAGS.rate, target=FLAGS.attainment, limits=cli.limits(), jobs=FLAGS.jobs,
                  verify=verify, **kw)
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        s = search.summary(plan)
        s.update(wall_s=wall, cpu_s=cpu, simulated_requests=plan.num_simulations * FLAGS.num_requests)
        out["runs"][alg] = s
        print(f"{alg}: {wall:.1f}s wall, {cpu:.1f}s CPU, {plan.num_simulations} simulations; "
              f"best {plan.best.unit.describe()} {plan.best.per_gpu:.3f} req/s/GPU; placement "
              f"{s['placement']} ({s['num_gpus']} GPUs), attainment {s['attainment_at_rate']} at {FLAGS.rate}/s "
              f"{s['error'] or ''}")
    path = Path(FLAGS.json_out or "benchmarks/out/planner_search.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

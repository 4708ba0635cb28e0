"""`python -m distserve_jax.planner profile|plan|simulate`: the planner's command line.

  - `profile`: fits a latency profile of this engine on local devices (`profile_cli`, the only
    part of the planner that imports JAX, loaded only for this command).
  - `plan`: Alg. 1 (`--affinity=high`) or Alg. 2 (`--affinity=low`) plus the colocated and
    chunked baselines for a workload, SLOs, a cluster and a rate; prints the ranked candidates
    (per-GPU goodput) and the chosen placement with its predicted attainment at `--rate`, and
    writes the placement YAML the server loads (`--out`).
  - `simulate`: predicted attainment of a placement (or colocated / chunked replicas) at each of
    `--rates` and at each of `--slo_scales`; prints a table, draws a PNG (`--plot_png`).
Runs on 1-2 CPUs (`--jobs` processes score candidates in parallel).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from absl import app, flags

from distserve_jax.metrics import SLO

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", "configs/profiles/a100-opt-13b.distserve.json", "Latency profile (JSON).")
flags.DEFINE_string("workload", "sharegpt", "sharegpt, humaneval, longbench, fixed, uniform, or a .jsonl trace.")
flags.DEFINE_string("tokenizer", "demo", "Tokenizer for sharegpt/humaneval lengths (a model dir or named config).")
flags.DEFINE_integer("num_requests", 300, "Requests per simulation in the search.")
flags.DEFINE_integer("verify_requests", 1000, "Requests simulating the chosen placement at --rate.")
flags.DEFINE_integer("seed", 0, "Workload and arrival seed.")
flags.DEFINE_float("cv", 1.0, "Coefficient of variation of inter-arrival gaps (1: Poisson).")
flags.DEFINE_float("ttft_slo", 0.25, "TTFT target, seconds.")
flags.DEFINE_float("tpot_slo", 0.1, "TPOT target, seconds.")
flags.DEFINE_float("attainment", 0.9, "Attainment target (share of requests meeting both).")
flags.DEFINE_integer("num_nodes", 1, "Nodes in the cluster.")
flags.DEFINE_integer("gpus_per_node", 8, "Devices per node.")
flags.DEFINE_float("rate", 1.0, "Request rate (req/s) the placement must serve.")
flags.DEFINE_enum("affinity", "low", ["high", "low"], "high: Alg. 1; low: Alg. 2.")
flags.DEFINE_float("inter_node_gbps", None, "Override the profile's inter-node link (Gbit/s).")
flags.DEFINE_float("intra_node_gbps", None, "Override the profile's intra-node link (Gbit/s).")
flags.DEFINE_bool("baselines", True, "Also search the colocated and chunked baselines.")
flags.DEFINE_bool("exhaustive", False, "Alg. 2: score every pair and phase (no pruning).")
flags.DEFINE_bool("prune", True, "Alg. 1 and baselines: a candidate missing the target at the best per-GPU goodput "
                  "of its kind so far gets no further search (its goodput shown as an upper bound).")
flags.DEFINE_integer("jobs", 1, "Processes scoring candidates.")
flags.DEFINE_string("out", None, "Where to write the placement YAML (plan).")
flags.DEFINE_string("json_out", None, "Where to write the full result as JSON.")
flags.DEFINE_integer("block_size", 16, "KV block size (the server's flag).")
flags.DEFINE_integer("max_num_seqs", 64, "Most sequences per step (the server's flag).")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "Prefill token budget per step (the server's flag).")
flags.DEFINE_integer("max_model_len", 2048, "Context length.")
flags.DEFINE_string("placement", None, "simulate: a placement YAML.")
flags.DEFINE_enum("mode", "disaggregated", ["disaggregated", "colocated", "chunked"], "simulate: mode.")
flags.DEFINE_list("tp", ["1"], "profile: tp degrees to profile; simulate: the colocated/chunked replicas' tp.")
flags.DEFINE_list("pp", ["1"], "profile: pp degrees to profile.")
flags.DEFINE_integer("replicas", 1, "simulate: colocated/chunked replicas.")
flags.DEFINE_list("rates", ["1", "2", "4"], "simulate: request rates.")
flags.DEFINE_list("slo_scales", ["0.5", "1", "2"], "simulate: SLO scales (at the first rate).")
flags.DEFINE_string("plot_png", None, "simulate: draw attainment vs rate and vs SLO scale.")
flags.DEFINE_string("model", "llama-130m", "profile: model (HF directory or named config).")
flags.DEFINE_integer("devices", None, "profile: devices to use (default: all visible).")
flags.DEFINE_integer("repeats", 5, "profile: timed runs per shape (median kept).")
flags.DEFINE_integer("warmup", 2, "profile: untimed runs per shape.")
flags.DEFINE_integer("num_blocks", 512, "profile: KV blocks per instance.")
flags.DEFINE_string("profile_out", "configs/profiles/local.json", "profile: where to write the profile.")
flags.DEFINE_string("dtype", "float32", "profile: dtype.")


class _Bar:
    """A one-line progress bar on stderr."""

    def __call__(self, label: str, i: int, n: int) -> None:
        w = 30
        k = w * i // max(n, 1)
        sys.stderr.write(f"\r{label:<12} [{'#' * k}{'.' * (w - k)}] {i}/{n}")
        if i >= n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def load_profile(path: str):
    import dataclasses

    from distserve_jax.planner.latency_model import Profile

    p = Profile.load(path)
    hw = p.hardware
    if FLAGS.inter_node_gbps:
        hw = dataclasses.replace(hw, inter_node_gbit_s=FLAGS.inter_node_gbps)
    if FLAGS.intra_node_gbps:
        hw = dataclasses.replace(hw, intra_node_gbit_s=FLAGS.intra_node_gbps)
    p.hardware = hw
    return p


def limits() -> dict[str, Any]:
    return dict(block_size=FLAGS.block_size, max_num_seqs=FLAGS.max_num_seqs,
                max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_model_len=FLAGS.max_model_len)


def workload_for(n: int):
    """(Workload, name): a named workload's lengths with unit-rate arrivals, or a trace's (rescaled by rate)."""
    from distserve_jax.planner import goodput as g
    from distserve_jax.planner import workload as wl

    if FLAGS.workload.endswith(".jsonl"):
        reqs = wl.read_trace(FLAGS.workload)[:n]
        span = max(r.arrival_time for r in reqs) or 1.0
        rate = (len(reqs) - 1) / span if len(reqs) > 1 else 1.0
        import numpy as np
        return g.Workload(tuple((r.prompt_len, r.output_len) for r in reqs),
                          np.array([r.arrival_time * rate for r in reqs]), FLAGS.workload)
    lens = wl.lengths(FLAGS.workload, n, seed=FLAGS.seed, max_model_len=FLAGS.max_model_len, tokenizer=FLAGS.tokenizer)
    return g.Workload.make(lens, cv=FLAGS.cv, seed=FLAGS.seed, name=FLAGS.workload)


def _table(title: str, rows: Sequence[Any]) -> str:
    out = [title, f"  {'rank':>4}  {'candidate':<28} {'GPUs':>4}  {'goodput':>9}  {'per GPU':>9}  note"]
    for i, s in enumerate(rows):
        out.append(f"  {i + 1:>4}  {s.unit.describe():<28} {s.unit.num_gpus:>4}  {s.goodput:>9.3f}  "
                   f"{s.per_gpu:>9.3f}  {s.note}")
    return "\n".join(out)


def _describe_plan(plan) -> str:
    if plan.placement is None:
        return f"  {plan.algorithm}: no placement for rate {plan.rate}: {plan.error}"
    return (f"  {plan.algorithm}: {plan.placement.describe()} on {plan.placement.num_devices} GPUs, predicted "
            f"attainment {plan.attainment_at_rate:.3f} at {plan.rate} req/s ({plan.seconds:.1f}s, "
            f"{plan.num_simulations} simulations)")


def cmd_plan() -> int:
    from distserve_jax.planner import search

    prof = load_profile(FLAGS.profile)
    slo = SLO(FLAGS.ttft_slo, FLAGS.tpot_slo)
    cluster = search.Cluster(FLAGS.num_nodes, FLAGS.gpus_per_node)
    work, verify = workload_for(FLAGS.num_requests), workload_for(FLAGS.verify_requests)
    kw = dict(target=FLAGS.attainment, limits=limits(), jobs=FLAGS.jobs, verify=verify, progress=_Bar())
    if FLAGS.affinity == "high":
        plan = search.alg1(prof, cluster, work, slo, FLAGS.rate, prune=FLAGS.prune, **kw)
    else:
        plan = search.alg2(prof, cluster, work, slo, FLAGS.rate, exhaustive=FLAGS.exhaustive, **kw)
    base = search.baselines(prof, cluster, work, slo, FLAGS.rate, prune=FLAGS.prune, **kw) if FLAGS.baselines else {}
    print(f"profile {prof.name} ({prof.model.name}); workload {work.name}: {len(work.lens)} requests, mean "
          f"prompt {work.mean_prompt:.0f} / output {work.mean_output:.0f} tokens; SLO TTFT {slo.ttft_s}s TPOT "
          f"{slo.tpot_s}s at {FLAGS.attainment:.0%}; cluster {cluster.num_nodes}x{cluster.gpus_per_node}")
    if plan.algorithm == "alg1":
        print(_table("Alg. 1 prefill instances alone (TTFT):", plan.prefill))
        print(_table("Alg. 1 decode instances alone (TPOT):", plan.decode))
    else:
        print(_table("Alg. 2 segment groups (joint TTFT and TPOT):", plan.ranked))
    for mode, bp in base.items():
        print(_table(f"{mode} replicas:", bp.ranked[:5]))
    if plan.skipped:
        print("skipped: " + "; ".join(plan.skipped))
    print("chosen:")
    print(_describe_plan(plan))
    for bp in base.values():
        print(_describe_plan(bp))
    best_d = plan.best.per_gpu if plan.best else 0.0
    for mode, bp in base.items():
        if bp.best and bp.best.per_gpu > 0 and best_d > 0:
            print(f"  disaggregation buys {best_d / bp.best.per_gpu:.2f}x per-GPU goodput over the best {mode}")
    if FLAGS.out and plan.placement is not None:
        plan.placement.write_placement(FLAGS.out, header=(
            f"Planned by python -m distserve_jax.planner plan ({plan.algorithm}) for {FLAGS.rate} req/s of "
            f"{work.name}, SLO TTFT {slo.ttft_s}s / TPOT {slo.tpot_s}s at {FLAGS.attainment:.0%}, profile {prof.name}:\n"
            f"{plan.placement.describe()}, predicted attainment {plan.attainment_at_rate:.3f}"))
        print(f"wrote {FLAGS.out}")
    if FLAGS.json_out:
        from pathlib import Path
        Path(FLAGS.json_out).write_text(json.dumps({"plan": search.summary(plan),
                                                    "baselines": {k: search.summary(v) for k, v in base.items()}},
                                                   indent=1, default=str))
    return 0 if plan.placement is not None else 1


def cmd_simulate() -> int:
    from distserve_jax.planner import deployment as dp
    from distserve_jax.planner import search

    prof = load_profile(FLAGS.profile)
    slo = SLO(FLAGS.ttft_slo, FLAGS.tpot_slo)
    if FLAGS.mode == "disaggregated":
        if not FLAGS.placement:
            raise app.UsageError("simulate needs --placement=FILE.yaml (or --mode=colocated|chunked)")
        dep = dp.from_placement(FLAGS.placement, gpus_per_node=FLAGS.gpus_per_node, **limits())
    else:
        dep = dp.build(FLAGS.mode, [("colocated", int(FLAGS.tp[0]), 1)] * FLAGS.replicas, gpus_per_node=FLAGS.gpus_per_node,
                       **limits())
    rates = [float(r) for r in FLAGS.rates]
    scales = [float(s) for s in FLAGS.slo_scales]
    curve = search.attainment_curve(dep, prof, workload_for(FLAGS.num_requests), slo, rates, scales)
    print(f"{dep.describe()} ({dep.num_devices} GPUs), profile {prof.name}, SLO TTFT {slo.ttft_s}s TPOT {slo.tpot_s}s")
    print(f"  {'rate':>8}  {'attainment':>10}  {'TTFT p90':>9}  {'TPOT p90':>9}")
    for row in curve["rates"]:
        s = row["summary"]
        print(f"  {row['rate']:>8.3f}  {row['attainment']:>10.3f}  {s['ttft_s']['p90'] or 0:>9.3f}  "
              f"{s['tpot_s']['p90'] or 0:>9.3f}")
    print(f"  at {rates[0]} req/s: " + ", ".join(f"SLO x{r['scale']:g}: {r['attainment']:.3f}" for r in curve["scales"]))
    if FLAGS.plot_png:
        plot(curve, dep.describe(), FLAGS.plot_png)
    if FLAGS.json_out:
        from pathlib import Path
        Path(FLAGS.json_out).write_text(json.dumps(curve, indent=1, default=str))
    return 0


def plot(curve: dict, label: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["rate"] for r in curve["rates"]], [r["attainment"] for r in curve["rates"]], "o-", label=label)
    a.set_xlabel("rate (req/s)")
    a.set_ylabel("predicted SLO attainment")
    a.axhline(FLAGS.attainment, ls="--", c="gray")
    b.plot([r["scale"] for r in curve["scales"]], [r["attainment"] for r in curve["scales"]], "o-", label=label)
    b.set_xlabel(f"SLO scale (at {curve['rates'][0]['rate']} req/s)")
    b.axhline(FLAGS.attainment, ls="--", c="gray")
    a.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("profile", "plan", "simulate"):
        raise app.UsageError("usage: python -m distserve_jax.planner profile|plan|simulate --flags")
    if argv[1] == "profile":
        from distserve_jax.planner import profile_cli  # imports JAX: only for this command

        return profile_cli.main()
    return cmd_plan() if argv[1] == "plan" else cmd_simulate()


def run() -> None:
    app.run(main)

"""Goodput benchmark (CLI): one ShareGPT trace served disaggregated, colocated and chunked on the same devices.

In one process on the virtual CPU devices, for each mode in `--modes` it builds an engine core on
the first `--num_devices` devices (`build_core`):
  - disaggregated: `--placement` (default `P(tp=d/2) + D(tp=d/2)`, each instance on its own half);
  - colocated: `--replicas` instances of tp = num_devices / replicas (default 2: the same devices,
    split the same way, as the default placement), prefill-first continuous batching;
  - chunked: the same replicas with chunked prefill (`--chunk_tokens` per step),
compiles every bucket (`core.warmup()`), then replays (`benchmarks.replay`):
  1. calibration: `--calib_requests` requests of the trace one at a time (unloaded TTFT, TPOT);
  2. the sweep: the trace (`--num_requests` ShareGPT requests, prompt + clipped output within
     `--max_model_len`) with Poisson arrivals at each rate of `--rates` (the same requests and the
     same seeded gap pattern, scaled by 1 / rate).

SLO targets: `--ttft_slo` / `--tpot_slo` seconds, or when 0, `--ttft_scale` / `--tpot_scale`
times the largest unloaded p50 over the modes (so every mode meets them unloaded); printed.
Attainment (share of requests meeting both targets; cut-off requests miss) per rate per mode
comes from `distserve_jax.metrics`. Goodput per mode: `metrics.goodput_from_curve`, the highest
rate where the swept attainment curve (linear between rates) meets the target (a noisy dip below
it is reported, not decisive), or, with `--bisect_iters > 0`, `metrics.find_goodput` on real
re-runs at the bisection midpoints. The SLO grid (`--slo_scales`, the paper's second figure)
re-scores the same recorded latencies with every target scaled: attainment at `--scale_rate` and
goodput per scale, with the ratios, and `goodput_slo_scale.png`. Ratios disaggregated/colocated
and disaggregated/chunked are printed. Outputs under `--out_dir`: `goodput.json` (summaries,
records' latencies, SLOs, goodputs) and `goodput_attainment.png` (attainment vs rate per mode).

All devices are CPU devices of one process: they share the host's cores, so the prefill and
decode instances are not isolated in compute. This shows the schedulers' behaviour (queueing,
interference, migration), not DistServe's compute isolation.

Example (the default run: ~8 minutes on 2 cores once the compilation cache is warm; the first
run compiles ~120 step shapes, several more minutes):
  python -m benchmarks.goodput --out_dir=benchmarks/out
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from benchmarks.replay import ReplayResult, replay
from distserve_jax import metrics
from distserve_jax.engine.factory import MODES, build_core
from distserve_jax.engine.model_source import resolve_model
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.workloads import WorkloadRequest, load_workload, with_arrivals

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "demo", "Named model (configs/models/) or a model directory.")
flags.DEFINE_list("modes", list(MODES), "Serving modes to compare.")
flags.DEFINE_integer("num_devices", 4, "Devices every mode runs on (the first ones).")
flags.DEFINE_string("placement", "", "Placement YAML for the disaggregated mode (default: half/half).")
flags.DEFINE_enum("executor", "threads", ["threads", "ray"], "threads: every instance a thread of this process on "
                  "shared cores; ray: one process per instance, pinned to its own cores (real compute isolation).")
flags.DEFINE_integer("replicas", 2, "Colocated/chunked replicas, each on num_devices / replicas devices.")
flags.DEFINE_list("rates", ["1", "2", "4", "6", "8", "12"], "Request rates (requests/s) to sweep.")
flags.DEFINE_integer("num_requests", 60, "Requests per rate.")
flags.DEFINE_integer("max_model_len", 256, "Context of every engine; prompts longer than this minus "
                     "--max_output_len are filtered out.")
flags.DEFINE_integer("max_output_len", 64, "ShareGPT output lengths are clipped to this many tokens.")
flags.DEFINE_integer("max_num_seqs", 8, "Most sequences per step.")
flags.DEFINE_integer("max_num_batched_tokens", 256, "Token budget of a prefill step (colocated, disaggregated).")
flags.DEFINE_integer("chunk_tokens", 128, "Token budget of a chunked-prefill step (chunked mode).")
flags.DEFINE_integer("calib_requests", 6, "Requests run one at a time to measure unloaded TTFT/TPOT.")
flags.DEFINE_float("ttft_slo", 0.0, "TTFT target in seconds (0: --ttft_scale x unloaded p50).")
flags.DEFINE_float("tpot_slo", 0.0, "TPOT target in seconds (0: --tpot_scale x unloaded p50).")
flags.DEFINE_float("ttft_scale", 6.0, "TTFT target as a multiple of the unloaded p50 TTFT.")
flags.DEFINE_float("tpot_scale", 2.0, "TPOT target as a multiple of the unloaded p50 TPOT.")
flags.DEFINE_float("target", metrics.DEFAULT_ATTAINMENT_TARGET, "Attainment target for goodput.")
flags.DEFINE_list("slo_scales", ["0.5", "0.75", "1", "1.5", "2", "3"], "The SLO grid: multiples of the SLO "
                  "targets (both TTFT and TPOT), each scored on the same recorded latencies (no re-runs).")
flags.DEFINE_float("scale_rate", 0.0, "Rate at which attainment vs SLO scale is reported (0: the median swept rate).")
flags.DEFINE_integer("bisect_iters", 0, "Re-runs per mode bisecting the goodput (0: interpolate the sweep).")
flags.DEFINE_float("drain_s", 30.0, "A replay is cut this many seconds after its last arrival (unfinished "
                   "requests miss the SLO).")
flags.DEFINE_integer("seed", 0, "Seed of the trace and the arrivals.")
flags.DEFINE_string("out_dir", "benchmarks/out", "Where goodput.json and goodput_attainment.png go.")
flags.DEFINE_string("compilation_cache_dir", "benchmarks/out/jax_cache",
                    "JAX persistent compilation cache (re-runs skip most compilation); empty: off.")

NOTE = ("note: all modes run in one process on CPU devices that share the host's cores, so this shows "
        "scheduling behaviour (batching, queueing, prefill/decode interference, migration), not the "
        "compute isolation disaggregation gets from separate GPUs.")
RAY_NOTE = ("note: every instance is its own process pinned to its own cores (--executor=ray), so the phases "
            "are isolated in compute; goodput per core = goodput / the cores the instances were given.")


def note() -> str:
    return RAY_NOTE if FLAGS.executor == "ray" else NOTE


def parse_rates(items: list[str]) -> list[float]:
    try:
        rates = sorted(float(x) for x in items)
    except ValueError as e:
        raise ValueError(f"--rates must be numbers, got {items}") from e
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be positive request rates, got {items}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"--rates repeats a rate: {items}")
    return rates


def load_trace(tokenizer: Any) -> list[WorkloadRequest]:
    """ShareGPT requests that fit `--max_model_len`, outputs clipped to `--max_output_len`."""
    max_prompt = FLAGS.max_model_len - FLAGS.max_output_len
    if max_prompt < 4:
        raise ValueError(f"--max_model_len={FLAGS.max_model_len} leaves no room for prompts after "
                         f"--max_output_len={FLAGS.max_output_len}")
    # Filter on the prompt only (the output is clipped below), so long answers are not dropped.
    reqs = load_workload("sharegpt", FLAGS.num_requests, tokenizer=tokenizer, seed=FLAGS.seed,
                         max_model_len=1 << 30, max_prompt_len=max_prompt, max_conversations=20000)
    return [dataclasses.replace(r, max_tokens=min(r.max_tokens, FLAGS.max_output_len)) for r in reqs]


def make_core(mode: str, devices: list) -> Any:
    kw = dict(max_model_len=FLAGS.max_model_len, max_num_seqs=FLAGS.max_num_seqs, seed=FLAGS.seed,
              executor=FLAGS.executor)
    if mode == "disaggregated":
        if FLAGS.placement:
            placement = Placement.from_yaml(FLAGS.placement)
        else:
            half = len(devices) // 2
            placement = Placement((InstanceSpec(tp=half),), (InstanceSpec(tp=len(devices) - half),))
        return build_core(FLAGS.model, mode=mode, placement=placement, devices=devices,
                          max_num_batched_tokens=FLAGS.max_num_batched_tokens, **kw)
    budget = FLAGS.chunk_tokens if mode == "chunked" else FLAGS.max_num_batched_tokens
    if FLAGS.replicas < 1 or len(devices) % FLAGS.replicas:
        raise ValueError(f"--replicas={FLAGS.replicas} does not divide the {len(devices)} devices")
    return build_core(FLAGS.model, mode=mode, tp=len(devices) // FLAGS.replicas, replicas=FLAGS.replicas,
                      devices=devices, max_num_batched_tokens=budget, **kw)


def describe(core: Any) -> str:
    info = core.info()
    return info.get("placement") or ",".join(f"tp{i['tp']}" for i in info["instances"])


def calibrate(core: Any, trace: list[WorkloadRequest], mode: str) -> dict[str, float]:
    """Unloaded TTFT/TPOT p50: the first `--calib_requests` requests, one at a time."""
    recs = []
    for i, r in enumerate(trace[:FLAGS.calib_requests]):
        res = replay(core, [dataclasses.replace(r, arrival_time=0.0)], max_duration_s=FLAGS.drain_s,
                     id_prefix=f"calib{i}-")
        recs += res.records
    done = [r for r in recs if r.completed]
    if not done:
        raise RuntimeError(f"{mode}: no calibration request completed within --drain_s={FLAGS.drain_s}")
    tpots = [r.tpot for r in done if r.tpot is not None]
    return {"ttft_p50": statistics.median(r.ttft for r in done),
            "tpot_p50": statistics.median(tpots) if tpots else 0.0}


def run_rate(core: Any, trace: list[WorkloadRequest], rate: float, tag: str) -> ReplayResult:
    reqs = with_arrivals(trace, rate, seed=FLAGS.seed)
    res = replay(core, reqs, max_duration_s=reqs[-1].arrival_time + FLAGS.drain_s, id_prefix=f"{tag}-")
    logging.info("%s: %d/%d completed in %.1fs (%d steps)%s", tag, sum(r.completed for r in res.records),
                 len(res.records), res.duration_s, res.num_steps, " [cut off]" if res.timed_out else "")
    return res


def goodput_ratio(num: metrics.GoodputResult, den: metrics.GoodputResult, lowest: float) -> dict[str, Any]:
    """num / den goodput; a bound when a goodput lies outside the swept range.

    A goodput below the lowest rate is < `lowest` (so a ratio over it is a lower bound); one at
    the highest rate that still passed is >= that rate.
    """
    lo_num = num.status == "above_high"  # num is at least its rate
    hi_den = den.status == "below_low"  # den is below `lowest`
    d = lowest if hi_den else den.rate
    n = num.rate
    if n == 0.0 and num.status == "below_low":
        if hi_den:
            return {"value": None, "bound": None, "text": f"unknown (both below the lowest rate {lowest:g})"}
        return {"value": None, "bound": "upper", "text": f"< {lowest / d:.2f}x (numerator below the lowest rate)"}
    if den.status == "above_high":
        bound = None if lo_num else "upper"
    else:
        bound = "lower" if (lo_num or hi_den) else "exact"
    value = n / d
    prefix = {"lower": ">= ", "upper": "<= ", "exact": "", None: "~"}[bound]
    why = " (the baseline's goodput is below the lowest swept rate)" if hi_den else ""
    return {"value": value, "bound": bound, "text": f"{prefix}{value:.2f}x{why}"}


def parse_scales(items: list[str]) -> list[float]:
    try:
        scales = sorted(float(x) for x in items)
    except ValueError as e:
        raise ValueError(f"--slo_scales must be numbers, got {items}") from e
    if not scales or any(not 0 < x < float("inf") for x in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"--slo_scales must be distinct positive numbers, got {items}")
    return scales


def cores_of(core: Any) -> int:
    """The denominator of goodput per core: the cores the instances were pinned to (Ray), else devices."""
    insts = core.info()["instances"]
    pinned = [len(i.get("cores") or ()) for i in insts]
    return sum(pinned) if all(pinned) else sum(int(i.get("tp", 1)) * int(i.get("pp", 1)) for i in insts)


def slo_grid(runs: dict[str, dict[float, ReplayResult]], slo: metrics.SLO, scales: list[float],
             scale_rate: float) -> dict[str, Any]:
    """The paper's second view: goodput and attainment as the SLO tightens or loosens.

    For each scale s the targets are s x (TTFT, TPOT); every mode's attainment curve over the swept
    rates is re-scored on the recorded latencies, its goodput read off the curve
    (`metrics.goodput_from_curve`), and the attainment at `scale_rate` kept for the
    attainment-vs-scale plot.
    """
    out: dict[str, Any] = {"scales": scales, "rate": scale_rate, "goodput": {}, "attainment_at_rate": {},
                           "ratios": {}}
    for mode, by_rate in runs.items():
        out["goodput"][mode], out["attainment_at_rate"][mode] = {}, {}
        for s in scales:
            scaled = slo.scaled(s)
            curve = {r: metrics.attainment(res.records, scaled) for r, res in by_rate.items()}
            out["goodput"][mode][s] = metrics.goodput_from_curve(curve, target=FLAGS.target)
            out["attainment_at_rate"][mode][s] = curve[scale_rate]
    lowest = min(min(v) for v in runs.values())
    if "disaggregated" in runs:
        for base in ("colocated", "chunked"):
            if base in runs:
                out["ratios"][f"disaggregated/{base}"] = {
                    s: goodput_ratio(out["goodput"]["disaggregated"][s], out["goodput"][base][s], lowest)
                    for s in scales}
    return out


def plot_scales(path: Path, grid: dict[str, Any], slo: metrics.SLO) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot")
        return False
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in grid["attainment_at_rate"]:
        xs = grid["scales"]
        ax0.plot(xs, [100 * grid["attainment_at_rate"][mode][x] for x in xs], marker="o", label=mode)
        ax1.plot(xs, [grid["goodput"][mode][x].rate for x in xs], marker="o", label=mode)
    ax0.axhline(100 * FLAGS.target, color="gray", linestyle="--", linewidth=1, label=f"{FLAGS.target:.0%} target")
    ax0.set_xlabel("SLO scale (x TTFT and TPOT targets)")
    ax0.set_ylabel(f"SLO attainment at {grid['rate']:g} req/s (%)")
    ax0.set_ylim(-2, 102)
    ax1.set_xlabel("SLO scale (x TTFT and TPOT targets)")
    ax1.set_ylabel("goodput (req/s, from the swept curve)")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{FLAGS.model}, scale 1 = TTFT<={slo.ttft_s * 1e3:.0f} ms, TPOT<={slo.tpot_s * 1e3:.1f} ms",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(path: Path, rates: list[float], table: dict[str, dict[float, float]], slo: metrics.SLO,
         target: float) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, points in table.items():
        xs = sorted(points)
        ax.plot(xs, [100 * points[x] for x in xs], marker="o", label=mode)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{FLAGS.model}, {FLAGS.num_devices} CPU devices, TTFT<={slo.ttft_s * 1e3:.0f} ms, "
                 f"TPOT<={slo.tpot_s * 1e3:.0f} ms", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str]) -> None:
    del argv
    rates = parse_rates(FLAGS.rates)
    scales = parse_scales(FLAGS.slo_scales)
    scale_rate = FLAGS.scale_rate or rates[len(rates) // 2]
    if scale_rate not in rates:
        raise ValueError(f"--scale_rate={FLAGS.scale_rate:g} is not one of the swept --rates {rates}")
    modes = list(dict.fromkeys(FLAGS.modes))
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected some of {MODES}")
    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    devices = jax.devices()
    if not 2 <= FLAGS.num_devices <= len(devices):
        raise ValueError(f"--num_devices must be in [2, {len(devices)}], got {FLAGS.num_devices}")
    devices = devices[:FLAGS.num_devices]
    spec = resolve_model(FLAGS.model)
    if spec.tokenizer is None:
        raise ValueError(f"model {FLAGS.model!r} has no tokenizer; the ShareGPT trace needs one")
    trace = load_trace(spec.tokenizer)
    plens, olens = [r.prompt_len for r in trace], [r.max_tokens for r in trace]
    print(f"trace: {len(trace)} ShareGPT requests (seed {FLAGS.seed}), prompt mean {np.mean(plens):.0f} "
          f"p50 {np.median(plens):.0f} max {max(plens)}, output (clipped to {FLAGS.max_output_len}) mean "
          f"{np.mean(olens):.0f}; Poisson arrivals at {rates} req/s", flush=True)
    print(note(), flush=True)

    cores, calib, runs, setup = {}, {}, {}, {}
    for mode in modes:
        t0 = time.perf_counter()
        core = make_core(mode, devices)
        shapes = core.warmup(wait_background=True)  # step buckets, every KV pull size; then the deferred work
        setup[mode] = {"layout": describe(core), "warmup_shapes": shapes, "build_s": time.perf_counter() - t0}
        calib[mode] = calibrate(core, trace, mode)
        print(f"{mode:>13} [{setup[mode]['layout']}]: warm-up {shapes} shapes in {setup[mode]['build_s']:.0f}s; "
              f"unloaded TTFT p50 {calib[mode]['ttft_p50'] * 1e3:.1f} ms, TPOT p50 "
              f"{calib[mode]['tpot_p50'] * 1e3:.1f} ms", flush=True)
        runs[mode] = {rate: run_rate(core, trace, rate, f"{mode}@{rate:g}") for rate in rates}
        cores[mode] = core

    ttft = FLAGS.ttft_slo or FLAGS.ttft_scale * max(c["ttft_p50"] for c in calib.values())
    tpot = FLAGS.tpot_slo or FLAGS.tpot_scale * max(c["tpot_p50"] for c in calib.values())
    slo = metrics.SLO(ttft, tpot)
    how = "given" if FLAGS.ttft_slo and FLAGS.tpot_slo else (
        f"{FLAGS.ttft_scale:g}x / {FLAGS.tpot_scale:g}x the largest unloaded p50 over the modes")
    print(f"SLO: TTFT <= {ttft * 1e3:.0f} ms, TPOT <= {tpot * 1e3:.1f} ms ({how}); goodput = highest rate with "
          f">= {FLAGS.target:.0%} attainment")

    table = {m: {r: metrics.attainment(res.records, slo) for r, res in runs[m].items()} for m in modes}
    goodputs = {}
    for mode in modes:
        if FLAGS.bisect_iters > 0:
            known = dict(table[mode])

            def attain(rate, mode=mode, known=known):
                if rate not in known:
                    res = run_rate(cores[mode], trace, rate, f"{mode}@{rate:g}")
                    runs[mode][rate] = res
                    known[rate] = table[mode][rate] = metrics.attainment(res.records, slo)
                return known[rate]
            goodputs[mode] = metrics.find_goodput(attain, low=rates[0], high=rates[-1], target=FLAGS.target,
                                                  rel_tol=0.05, max_iters=FLAGS.bisect_iters)
        else:
            goodputs[mode] = metrics.goodput_from_curve(table[mode], target=FLAGS.target)

    all_rates = sorted({r for m in modes for r in table[m]})
    head = f"{'rate':>6} | " + " | ".join(f"{m:>24}" for m in modes)
    print("\nSLO attainment (TTFT p90 / TPOT p90 in ms) per rate:")
    print(head)
    print("-" * len(head))
    summaries: dict[str, dict[float, dict]] = {m: {} for m in modes}
    for rate in all_rates:
        cells = []
        for m in modes:
            if rate not in runs[m]:
                cells.append(f"{'-':>24}")
                continue
            s = metrics.summarize(runs[m][rate].records, slos=slo, target=FLAGS.target)
            summaries[m][rate] = s
            p90 = lambda d: "  -  " if d["p90"] is None else f"{d['p90'] * 1e3:5.0f}"
            cells.append(f"{s['slo']['slo']['attainment']:>6.0%} ({p90(s['ttft_s'])} /{p90(s['tpot_s'])})"
                         f"{'*' if runs[m][rate].timed_out else ' ':>1}".rjust(24))
        print(f"{rate:>6g} | " + " | ".join(cells))
    print(f"(* = run cut off {FLAGS.drain_s:g}s after the last arrival; unfinished requests count as misses)")
    print("\ngoodput (req/s):", ", ".join(
        f"{m} {g.rate:.2f}{'' if g.status == 'ok' else f' ({g.status})'}" for m, g in goodputs.items()))
    for m, g in goodputs.items():
        if metrics.dips_below(g):
            print(f"  {m}: attainment is not monotone in rate: misses the target at {list(metrics.dips_below(g))} "
                  f"req/s below its goodput (noise or a real dip: read the table)")
    denominators = {m: cores_of(c) for m, c in cores.items()}
    print("goodput per " + ("core" if FLAGS.executor == "ray" else "device") + " (req/s / "
          + ("the cores the instances are pinned to" if FLAGS.executor == "ray" else "devices") + "): "
          + ", ".join(f"{m} {g.rate / denominators[m]:.2f} (/{denominators[m]})" for m, g in goodputs.items()))
    ratios = {}
    if "disaggregated" in goodputs:
        for base in ("colocated", "chunked"):
            if base in goodputs:
                ratios[f"disaggregated/{base}"] = goodput_ratio(goodputs["disaggregated"], goodputs[base], rates[0])
    for name, v in ratios.items():
        print(f"  {name}: {v['text']}")
    grid = slo_grid(runs, slo, scales, scale_rate) if FLAGS.bisect_iters == 0 else None
    if grid is not None:
        print(f"\nSLO scale grid (targets x scale; scale 1 = the SLO above; attainment at {scale_rate:g} req/s | "
              f"goodput req/s):")
        head = f"{'scale':>6} | " + " | ".join(f"{m:>20}" for m in modes) + "".join(
            f" | {name:>24}" for name in grid["ratios"])
        print(head)
        print("-" * len(head))
        for sc in scales:
            cells = [f"{grid['attainment_at_rate'][m][sc]:>6.0%} | {grid['goodput'][m][sc].rate:6.2f}"
                     f"{'+' if grid['goodput'][m][sc].status == 'above_high' else ' '}"
                     f"{'!' if metrics.dips_below(grid['goodput'][m][sc]) else ' '}".rjust(20) for m in modes]
            ratio_cells = [f"{grid['ratios'][name][sc]['text']:>24}" for name in grid["ratios"]]
            print(f"{sc:>6g} | " + " | ".join(cells) + "".join(f" | {c}" for c in ratio_cells))
        print("(+ = the highest swept rate still meets the target: goodput is at least that; ! = a lower swept "
              "rate misses it: the curve is not monotone, read the goodput with care)")
    mig = getattr(cores.get("disaggregated"), "migration_seconds", None)
    if mig:
        print(f"disaggregated KV pulls: {len(mig)}, {cores['disaggregated'].migrated_bytes / 2**20:.1f} MiB, "
              f"median {statistics.median(mig) * 1e3:.2f} ms")
    print(note())

    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model": FLAGS.model, "num_devices": FLAGS.num_devices, "modes": modes, "setup": setup,
        "trace": {"num_requests": len(trace), "seed": FLAGS.seed, "max_model_len": FLAGS.max_model_len,
                  "max_output_len": FLAGS.max_output_len, "prompt_lens": plens, "output_lens": olens},
        "calibration": calib, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "target": FLAGS.target,
        "attainment": {m: {str(r): a for r, a in sorted(t.items())} for m, t in table.items()},
        "summaries": {m: {str(r): s for r, s in sorted(v.items())} for m, v in summaries.items()},
        "goodput": {m: g.to_dict() for m, g in goodputs.items()}, "ratios": ratios, "note": note(),
        "goodput_denominators": denominators,
        "slo_grid": None if grid is None else {
            "scales": scales, "rate": scale_rate,
            "attainment_at_rate": {m: {str(k): v for k, v in a.items()} for m, a in grid["attainment_at_rate"].items()},
            "goodput": {m: {str(k): g.to_dict() for k, g in a.items()} for m, a in grid["goodput"].items()},
            "ratios": {n: {str(k): v for k, v in a.items()} for n, a in grid["ratios"].items()}},
    }
    (out_dir / "goodput.json").write_text(json.dumps(result, indent=1))
    png = out_dir / "goodput_attainment.png"
    wrote = plot(png, all_rates, table, slo, FLAGS.target)
    png2 = out_dir / "goodput_slo_scale.png"
    wrote2 = grid is not None and plot_scales(png2, grid, slo)
    print(f"wrote {out_dir / 'goodput.json'}" + (f", {png}" if wrote else "") + (f", {png2}" if wrote2 else ""))


if __name__ == "__main__":
    app.run(main)

"""`python -m distserve_jax.planner profile`: fits a latency profile of this engine on local devices.

This is the one module of the planner that imports JAX and the runtime (it runs the engine's
own `ModelRunner` steps); `cli` imports it only for the `profile` command, so `import
distserve_jax.planner` and every other command stay JAX-free.

For each `--tp` x `--pp` it builds the instance's runner on the first tp*pp devices and times
`launch` + `collect` over a grid of batch shapes: prefill (batch x prompt length), decode (batch x
context), mixed (a prompt chunk over a context plus decode rows). Every shape is warmed first
(`--warmup` untimed runs: its bucket compiled), then measured in `--repeats` rounds, each round
visiting every shape once in a new shuffled order, and the median of its rounds is kept: a burst
of other load on the host lands on different shapes in different rounds instead of on all the
repeats of one shape. It fits each regime (`fit`; decode in a small- and a large-batch piece
split where the data says, the prefill and mixed square terms chosen by held-out error), reports
the held-out error per regime, records the runner's padding buckets and KV capacity, and times
KV pulls between two instances (tp=1, devices 0 and 1) for the link bandwidth. The result is one
profile JSON (`--profile_out`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Sequence

from absl import flags, logging

from distserve_jax.planner import fit
from distserve_jax.planner.latency_model import FORMAT, Hardware, ModelShape, Profile, StepCoefficients

FLAGS = flags.FLAGS
# Its flags are defined in `cli` (absl parses them before this module is imported).


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'} x {os.cpu_count()} cores"


def grid(max_seqs: int, max_tokens: int, max_len: int) -> list[tuple[str, list[tuple[int, int]]]]:
    out = []
    for b in (1, 2, 4, 8):
        for n in (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024):
            if b <= max_seqs and b * n <= max_tokens and n <= max_len:
                out.append(("prefill", [(n, 0)] * b))
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
        for c in (16, 64, 128, 256, 512, 1024):
            if b <= max_seqs and c + 2 <= max_len:
                out.append(("decode", [(1, c)] * b))
    for n, c in ((16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (96, 192), (256, 256), (64, 512)):
        for d in (0, 2, 4, 8, 16):
            if n + c <= max_len and n + d <= max_tokens and 1 + d <= max_seqs:
                out.append(("mixed", [(n, c)] + [(1, 256)] * d))
    return out


def _works(runner: Any, works_spec: list[tuple[int, int]]) -> list[Any]:
    from distserve_jax.sampling_params import SamplingParams
    from distserve_jax.step_types import SeqWork

    bs = runner.config.block_size
    greedy = SamplingParams(temperature=0.0)
    works, nxt = [], 1
    for n, c in works_spec:
        k = -(-(n + c) // bs)
        works.append(SeqWork([1] * n, c, list(range(nxt, nxt + k)), greedy))
        nxt += k
    if nxt > runner.num_blocks:
        raise ValueError(f"shape {works_spec[:2]}... needs {nxt} blocks, the runner has {runner.num_blocks}")
    return works


def measure_grid(runner: Any, shapes: Sequence[list[tuple[int, int]]], repeats: int, warmup: int,
                 seed: int = 0, clock: Any = time.perf_counter) -> list[float]:
    """Median ms of launch + collect (`runner.execute`) for each shape (a batch of (new tokens,
    context) items): `warmup` untimed runs of each shape, then `repeats` rounds over all shapes, each
    in a new shuffled order (see the module docstring)."""
    import random

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    works = [_works(runner, s) for s in shapes]
    for w in works:
        for _ in range(warmup):
            runner.execute(w)
    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in works]
    order = list(range(len(works)))
    for _ in range(repeats):
        rng.shuffle(order)
        for i in order:
            t = clock()
            runner.execute(works[i])
            times[i].append((clock() - t) * 1e3)
    return [statistics.median(ts) for ts in times]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the profile measures on: the engine limits it will serve with, and the timing protocol."""

    max_model_len: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_blocks: int = 512
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 2


def profile_config(spec: Any, devices: Sequence[Any], tp: int, pp: int, st: Settings) -> tuple[StepCoefficients, dict]:
    from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig
    from distserve_jax.runtime.sharding import make_mesh

    rc = RunnerConfig(max_model_len=min(st.max_model_len, spec.config.max_position_embeddings),
                      num_blocks=st.num_blocks, block_size=st.block_size, max_num_seqs=st.max_num_seqs,
                      max_num_batched_tokens=st.max_num_batched_tokens, dtype=st.dtype)
    meshes = [make_mesh(list(devices[s * tp:(s + 1) * tp])) for s in range(pp)]
    runner = ModelRunner(spec.config, meshes, spec.weights, rc)
    max_len = min(rc.max_model_len, (runner.num_blocks - 1) * rc.block_size // 8)
    shapes = grid(rc.max_num_seqs, rc.max_num_batched_tokens, max_len)
    measured = measure_grid(runner, [w for _, w in shapes], st.repeats, st.warmup)
    samples = [(regime, works, ms) for (regime, works), ms in zip(shapes, measured)]
    for regime, works, ms in samples:
        logging.info("tp=%d pp=%d %s %d x %s: %.2f ms", tp, pp, regime, len(works), works[0], ms)
    tb, sb = tuple(runner.token_buckets), tuple(runner.seq_buckets)

    def best_square(regime: str) -> tuple[str, list[float], dict]:
        fits = [(sq, *fit.fit_regime(samples, regime, token_buckets=tb, square=sq)) for sq in ("sum", "total")]
        return min(fits, key=lambda f: f[2]["heldout_mape"])

    square, pre, pre_err = best_square("prefill")
    mix_square, mix, mix_err = best_square("mixed")
    small, large, thr, small_err, large_err = fit.fit_decode_split(samples, seq_buckets=sb)
    errors = {"prefill": pre_err, "decode_small": small_err, "decode_large": large_err, "mixed": mix_err}
    c = StepCoefficients(prefill=tuple(pre), decode_small=tuple(small), decode_large=tuple(large),
                         decode_threshold=thr, mixed=tuple(mix), prefill_square=square, mixed_square=mix_square,
                         token_buckets=tb, seq_buckets=sb, max_num_tokens=(runner.num_blocks - 1) * rc.block_size,
                         fit_error=errors)
    return c, {"samples": len(samples), "errors": errors}


def measure_link(spec: Any, devices: Sequence[Any], st: Settings) -> float:
    """Gbit/s of a KV pull between two tp=1 instances on devices 0 and 1 (bytes / median time)."""
    from distserve_jax.runtime.kv_transfer import KVMigrator
    from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig
    from distserve_jax.runtime.sharding import make_mesh

    rc = RunnerConfig(max_model_len=512, num_blocks=80, block_size=st.block_size, dtype=st.dtype)
    a = ModelRunner(spec.config, [make_mesh([devices[0]])], spec.weights, rc)
    b = ModelRunner(spec.config, [make_mesh([devices[1]])], spec.weights, rc)
    mig = KVMigrator(a, b)
    mig.warmup()
    rates = []
    for n in (4, 8, 16):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            tr = mig.pull(list(range(1, n + 1)), list(range(1, n + 1)))
            tr.wait()
            ts.append(time.perf_counter() - t)
        rates.append(tr.num_bytes * 8 / statistics.median(ts) / 1e9)
    return statistics.median(rates)


def run_profile(model: str, tps: Sequence[int], pps: Sequence[int], st: Settings, *, num_devices: int | None = None,
                name: str = "local") -> tuple[Profile, dict]:
    """Profiles `model` at every tp x pp on the first devices; (profile, per-config fit report)."""
    import jax

    from distserve_jax.engine.model_source import resolve_model

    spec = resolve_model(model)
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    cfg = spec.config
    configs, report = {}, {}
    for tp in tps:
        for pp in pps:
            if tp * pp > len(devices):
                raise ValueError(f"tp={tp} x pp={pp} needs {tp * pp} devices, {len(devices)} visible")
            configs[(tp, pp)], report[(tp, pp)] = profile_config(spec, devices, tp, pp, st)
    link = measure_link(spec, devices, st) if len(devices) >= 2 else 100.0
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[st.dtype]
    num_params = (cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_layers * (
        cfg.hidden_size * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * cfg.head_dim
        * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size))
    shape = ModelShape(model, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       num_params, dtype_bytes, min(st.max_model_len, cfg.max_position_embeddings))
    backend = jax.default_backend()
    hw = Hardware(f"{backend}: {cpu_name() if backend == 'cpu' else devices[0].device_kind}",
                  gpus_per_node=len(devices), memory_bytes=0, intra_node_gbit_s=link, inter_node_gbit_s=link)
    prof = Profile(shape, hw, configs, pp_model="measured", name=name,
                   source=f"distserve_jax.planner profile of {model} on {len(devices)} {backend} devices ({hw.name}), "
                          f"{time.strftime('%Y-%m-%d')}, {st}; {FORMAT}")
    return prof, report


def main() -> int:
    st = Settings(max_model_len=FLAGS.max_model_len, block_size=FLAGS.block_size, max_num_seqs=FLAGS.max_num_seqs,
                  max_num_batched_tokens=FLAGS.max_num_batched_tokens, num_blocks=FLAGS.num_blocks, dtype=FLAGS.dtype,
                  repeats=FLAGS.repeats, warmup=FLAGS.warmup)
    prof, report = run_profile(FLAGS.model, [int(t) for t in FLAGS.tp], [int(p) for p in FLAGS.pp], st,
                               num_devices=FLAGS.devices,
                               name=os.path.splitext(os.path.basename(FLAGS.profile_out))[0])
    prof.save(FLAGS.profile_out)
    for (tp, pp), r in report.items():
        for regime, e in r["errors"].items():
            print(f"tp={tp} pp={pp} {regime:<12} n={e['n']:>3}  held-out MAPE {e['heldout_mape']:.1%}  "
                  f"max {e['heldout_max_ape']:.1%}")
        c = prof.configs[(tp, pp)]
        print(f"tp={tp} pp={pp} decode split at batch {c.decode_threshold}; prefill square {c.prefill_square}, "
              f"mixed square {c.mixed_square}")
    print(f"KV pull link: {prof.hardware.intra_node_gbit_s:.2f} Gbit/s; wrote {FLAGS.profile_out}")
    return 0

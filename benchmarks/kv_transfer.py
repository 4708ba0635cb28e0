"""KV-migration benchmark (CLI): pull throughput vs a plain device-to-device copy, and its share of TTFT.

For every tp pair `src:dst` in `--tp_pairs` and every prompt length in `--prompt_lens`, in one
process on the 8 virtual CPU devices, it builds a source `ModelRunner` (tp=src, devices
0..src-1) and a destination `ModelRunner` (tp=dst, the next dst devices) for `--model`, joins
them with a `KVMigrator`, prefills one prompt of that length on the source and measures:

  - prefill: `ModelRunner.execute` of the whole prompt on the source (one sequence, greedy
    sample fetched to the host), median over `--repeats` after an untimed compile run. This is
    the unloaded TTFT of the request on the source instance (no queueing);
  - pull: `KVMigrator.pull(src_blocks, dst_blocks)` followed by `Transfer.wait()`: gather on
    the source, one batched `device_put` per destination stage, scatter into the destination
    pages. Median over `--repeats` after an untimed compile pull. GB/s = `Transfer.num_bytes`
    (the request's K and V over all layers) over the time;
  - copy: one `jax.device_put` of the same arrays (per layer, K and V, each
    `[kv_heads, blocks, block_size, head_dim]`, sharded over kv heads on the source mesh) to
    the destination mesh's sharding, blocked until ready. Same bytes, same shardings, no gather
    and no scatter: the floor of the copy path. Median over `--repeats`.

  - phases: the pull's gather, `device_put` and scatter timed one at a time (the
    migrator's own jitted functions), to show where the time over a bare copy goes.

It prints, per row: bytes, pull and copy times, GB/s of both, copy/pull GB/s ratio (1.0: the
pull costs nothing over a bare copy) and pull time / prefill time (migration as a share of TTFT).

The CPU "devices" are one host's memory, so this measures the overheads of the copy path
(dispatch, gather/scatter kernels, memcpy), not an interconnect: on GPUs the same pull crosses
NVLink/PCIe and the ratios change.

Example:
  python -m benchmarks.kv_transfer --model=llama-130m --tp_pairs=1:1,2:1,2:2,4:2 \
      --prompt_lens=128,512,1024 --repeats=5 --json_out=benchmarks/out/kv_transfer.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime.kv_transfer import KVMigrator
from distserve_jax.runtime.buckets import round_up
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig, SeqWork
from distserve_jax.runtime.sharding import TP, make_mesh, replicated
from distserve_jax.sampling_params import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-130m", "Named model (configs/models/) or a model directory.")
flags.DEFINE_list("tp_pairs", ["1:1", "2:1", "2:2", "4:2"], "Pairs src_tp:dst_tp (src + dst <= 8 devices).")
flags.DEFINE_list("prompt_lens", ["128", "512", "1024"], "Prompt lengths in tokens.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")
flags.DEFINE_integer("block_size", 16, "Tokens per KV block.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and KV dtype.")
flags.DEFINE_integer("seed", 0, "Seed for the prompt token ids.")
flags.DEFINE_string("json_out", "", "If set, write the rows as JSON to this path.")

NOTE = ("note: the 8 CPU 'devices' share one host's memory and cores, so these numbers measure the copy "
        "path's overheads (dispatch, gather/scatter, memcpy), not an interconnect.")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls (fn must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_pairs(items: list[str], num_devices: int) -> list[tuple[int, int]]:
    """`["2:1", ...]` -> [(2, 1), ...]; ValueError on a malformed pair or too many devices."""
    pairs = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"tp pair {item!r} must look like SRC:DST with positive integers, e.g. 2:1")
        s, d = int(parts[0]), int(parts[1])
        if s + d > num_devices:
            raise ValueError(f"tp pair {item!r} needs {s + d} devices, only {num_devices} available")
        pairs.append((s, d))
    if not pairs:
        raise ValueError("--tp_pairs is empty")
    return pairs


def parse_lens(items: list[str]) -> list[int]:
    lens = []
    for item in items:
        if not item.strip().isdigit() or int(item) < 1:
            raise ValueError(f"prompt length {item!r} must be a positive integer")
        lens.append(int(item))
    if not lens:
        raise ValueError("--prompt_lens is empty")
    return lens


class Bench:
    """Runners (cached by device ids), prefill timings (cached by source and length) and the rows."""

    def __init__(self, model: str, max_len: int):
        self.spec = resolve_model(model)
        if max_len > self.spec.config.max_position_embeddings:
            raise ValueError(f"prompt length {max_len} exceeds the model's context "
                             f"({self.spec.config.max_position_embeddings})")
        blocks_per_seq = -(-max_len // FLAGS.block_size)
        self.rc = RunnerConfig(max_model_len=max_len, block_size=FLAGS.block_size, num_blocks=1 + blocks_per_seq,
                               max_num_seqs=1, max_num_batched_tokens=max_len, dtype=FLAGS.dtype)
        self.devices = jax.devices()
        self.runners: dict[tuple[int, ...], ModelRunner] = {}
        self.prefill_s: dict[tuple[tuple[int, ...], int], float] = {}
        self.rng = np.random.default_rng(FLAGS.seed)

    def runner(self, ids: tuple[int, ...]) -> ModelRunner:
        if ids not in self.runners:
            t = time.perf_counter()
            mesh = make_mesh([self.devices[i] for i in ids])
            self.runners[ids] = ModelRunner(self.spec.config, [mesh], self.spec.weights, self.rc)
            logging.info("runner on devices %s built in %.1fs", ids, time.perf_counter() - t)
        return self.runners[ids]

    def keep_only(self, keep: set[tuple[int, ...]]) -> None:
        for ids in [k for k in self.runners if k not in keep]:
            del self.runners[ids]

    def prefill(self, ids: tuple[int, ...], prompt_len: int) -> tuple[float, list[int]]:
        """Prefills one prompt into blocks 1..n of the runner on `ids`; returns (median seconds, blocks)."""
        runner = self.runner(ids)
        blocks = list(range(1, 1 + -(-prompt_len // FLAGS.block_size)))
        tokens = self.rng.integers(3, self.spec.config.vocab_size, prompt_len).tolist()
        work = SeqWork(tokens, 0, blocks, SamplingParams(temperature=0.0, max_tokens=1))
        key = (ids, prompt_len)
        runner.execute([work])  # compile this bucket (and fill the blocks)
        if key not in self.prefill_s:
            self.prefill_s[key] = median_seconds(lambda: runner.execute([work]), FLAGS.repeats)
        return self.prefill_s[key], blocks

    def row(self, src_tp: int, dst_tp: int, prompt_len: int) -> dict:
        src_ids = tuple(range(src_tp))
        dst_ids = tuple(range(src_tp, src_tp + dst_tp))
        src, dst = self.runner(src_ids), self.runner(dst_ids)
        prefill_s, blocks = self.prefill(src_ids, prompt_len)
        migrator = KVMigrator(src, dst)

        def pull():
            transfer = migrator.pull(blocks, blocks)
            transfer.wait()
            return transfer

        num_bytes = pull().num_bytes  # compile gather/scatter for this bucket
        pull()
        pull_s = median_seconds(pull, FLAGS.repeats)

        # The same bytes as plain arrays, laid out like the gathered K/V, moved by one device_put.
        heads, cfg = dst.cfg.num_kv_heads, dst.cfg
        shape = (heads, len(blocks), FLAGS.block_size, cfg.head_dim)
        src_mesh, dst_mesh = src.stages[0].mesh, dst.stages[0].mesh
        src_sharding = NamedSharding(src_mesh, P(TP) if heads % src_mesh.shape[TP] == 0 else P())
        dst_sharding = NamedSharding(dst_mesh, P(TP))
        make = jax.jit(lambda: jnp.ones(shape, FLAGS.dtype), out_shardings=src_sharding)
        arrays = [make() for _ in range(2 * cfg.num_layers)]
        copy_bytes = sum(a.nbytes for a in arrays)
        if copy_bytes != num_bytes:
            raise RuntimeError(f"copy baseline moves {copy_bytes} bytes but the pull reports {num_bytes}")

        def copy():
            jax.block_until_ready(jax.device_put(arrays, [dst_sharding] * len(arrays)))

        copy()
        copy_s = median_seconds(copy, FLAGS.repeats)
        del arrays
        pull_gbs, copy_gbs = num_bytes / pull_s / 1e9, num_bytes / copy_s / 1e9
        return {"src_tp": src_tp, "dst_tp": dst_tp, "prompt_len": prompt_len, "bytes": num_bytes,
                "pull_s": pull_s, "copy_s": copy_s, "pull_gbs": pull_gbs, "copy_gbs": copy_gbs,
                "pull_over_copy": pull_s / copy_s, "prefill_s": prefill_s, "pull_share_of_ttft": pull_s / prefill_s,
                **pull_phases(migrator, src, dst, blocks)}


def pull_phases(migrator: KVMigrator, src: ModelRunner, dst: ModelRunner, blocks: list[int]) -> dict[str, float]:
    """Median seconds of the three phases of `KVMigrator.pull` run one at a time (pp=1 instances).

    Mirrors `pull` step by step with the migrator's own jitted gather and scatter: gather on the
    source, per-layer `device_put` to the destination's kv-head sharding, scatter into the pages.
    """
    n = round_up(len(blocks), migrator.buckets)
    ids = np.zeros(n, np.int32)
    ids[:len(blocks)] = blocks
    s_st, d_st = src.stages[0], dst.stages[0]
    src_ids, dst_ids = jax.device_put(ids, replicated(s_st.mesh)), jax.device_put(ids, replicated(d_st.mesh))
    target = NamedSharding(d_st.mesh, P(TP))
    gather = lambda: jax.block_until_ready(migrator._gathers[0](s_st.pages, src_ids))
    gathered = gather()
    put = lambda: jax.block_until_ready(jax.device_put(gathered, jax.tree.map(lambda _: target, gathered)))
    moved = put()

    def scatter():
        d_st.pages, marker = migrator._scatters[0](d_st.pages, moved, dst_ids)
        jax.block_until_ready(marker)

    scatter()
    return {"gather_s": median_seconds(gather, FLAGS.repeats), "put_s": median_seconds(put, FLAGS.repeats),
            "scatter_s": median_seconds(scatter, FLAGS.repeats)}


def format_table(rows: list[dict]) -> str:
    head = (f"{'tp':>5} {'prompt':>6} {'MiB':>7} {'pull ms':>8} {'copy ms':>8} {'pull GB/s':>9} "
            f"{'copy GB/s':>9} {'pull/copy':>9} {'prefill ms':>10} {'pull/TTFT':>9} | {'gather':>6} {'put':>6} "
            f"{'scatter':>7} ms")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['src_tp']}:{r['dst_tp']:<3} {r['prompt_len']:>6} {r['bytes'] / 2**20:>7.2f} "
                     f"{r['pull_s'] * 1e3:>8.2f} {r['copy_s'] * 1e3:>8.2f} {r['pull_gbs']:>9.2f} "
                     f"{r['copy_gbs']:>9.2f} {r['pull_over_copy']:>8.2f}x {r['prefill_s'] * 1e3:>10.1f} "
                     f"{r['pull_share_of_ttft']:>8.1%} | {r['gather_s'] * 1e3:>6.2f} {r['put_s'] * 1e3:>6.2f} "
                     f"{r['scatter_s'] * 1e3:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {FLAGS.repeats}")
    pairs = parse_pairs(FLAGS.tp_pairs, len(jax.devices()))
    lens = parse_lens(FLAGS.prompt_lens)
    bench = Bench(FLAGS.model, max(lens))
    for s, d in pairs:
        bench.spec.config.validate_tp(s)
        bench.spec.config.validate_tp(d)
    cfg = bench.spec.config
    print(f"model {FLAGS.model}: {cfg.num_layers} layers, {cfg.num_kv_heads} kv heads x {cfg.head_dim}, "
          f"{FLAGS.dtype}, block {FLAGS.block_size}; {len(jax.devices())} {jax.devices()[0].platform} devices; "
          f"median of {FLAGS.repeats}")
    print(NOTE, flush=True)
    rows = []
    for i, (s, d) in enumerate(pairs):
        for n in lens:
            rows.append(bench.row(s, d, n))
            logging.info("tp %d:%d len %d: pull %.2f ms, copy %.2f ms", s, d, n,
                         rows[-1]["pull_s"] * 1e3, rows[-1]["copy_s"] * 1e3)
        later = {ids for s2, d2 in pairs[i + 1:] for ids in (tuple(range(s2)), tuple(range(s2, s2 + d2)))}
        bench.keep_only(later)
    print(format_table(rows))
    print("pull/copy: pull time over plain device_put time of the same bytes (1.00x = no overhead); "
          "pull/TTFT: pull time over the unloaded prefill time on the source instance; gather/put/scatter: "
          "the pull's three phases timed one at a time.")
    print(NOTE)
    if FLAGS.json_out:
        path = Path(FLAGS.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": FLAGS.model, "dtype": FLAGS.dtype, "block_size": FLAGS.block_size,
                                    "repeats": FLAGS.repeats, "note": NOTE, "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

"""Attention kernel benchmark (CLI): paged decode bandwidth and ragged prefill throughput.

For each backend in `--backends` it times `pallas_kernels.dispatch` on one set of shapes and
reports time per call, achieved GB/s for paged decode (K/V bytes of the valid tokens plus the
queries and outputs, over the time) and TFLOP/s for ragged prefill (4 * head_dim * num_q_heads
per causal query/key pair: the QK^T and PV multiply-adds).

On a GPU it also measures, in the same run:
  - the device's copy bandwidth (a jitted `x + 1` over `--copy_mib` MiB: one read and one
    write per element) and prints decode bandwidth as a fraction of it;
  - `jax.nn.dot_product_attention(implementation="cudnn")` on the same prompts (padded batch
    of equal lengths, so the FLOPs are the same), and the Pallas ops bundled with JAX:
    `jax.experimental.pallas.ops.gpu.attention.mha` (causal flash attention, kv heads
    repeated to the query heads since it has no GQA) and
    `jax.experimental.pallas.ops.gpu.paged_attention.paged_attention`, printing ratios.

Example (CPU, reference path, small shapes):
  python -m benchmarks.attention --num_seqs=4 --context_len=256 --prompt_len=128 \
      --num_q_heads=8 --num_kv_heads=2 --head_dim=64 --dtype=float32 --iters=5
"""

from __future__ import annotations

import time
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch

FLAGS = flags.FLAGS
flags.DEFINE_enum("kernel", "both", ["decode", "prefill", "both"], "Which kernel to measure.")
flags.DEFINE_list("backends", ["reference", "auto"], "Backends to time (see pallas_kernels.dispatch.BACKENDS); "
                  "the default puts the jnp reference beside what the dispatcher picks here.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Activation and cache dtype.")
flags.DEFINE_integer("num_seqs", 32, "Sequences per batch (decode slots; prefill prompts).")
flags.DEFINE_integer("context_len", 2048, "Decode: tokens in the cache per sequence.")
flags.DEFINE_integer("prompt_len", 1024, "Prefill: tokens per prompt.")
flags.DEFINE_integer("prefill_seqs", 0, "Prefill: prompts per batch (0: --num_seqs).")
flags.DEFINE_integer("num_q_heads", 32, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("page_size", 16, "Tokens per cache page.")
flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
flags.DEFINE_integer("warmup", 2, "Untimed calls (after compilation) per measurement.")
flags.DEFINE_integer("copy_mib", 1024, "GPU only: MiB per copy-bandwidth measurement.")
flags.DEFINE_bool("baselines", True, "GPU only: also time cuDNN and JAX's bundled Pallas ops.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")


def time_call(fn: Callable, *args) -> float:
    """Seconds per call of the jitted `fn(*args)` (compile and warm-up excluded)."""
    jax.block_until_ready(fn(*args))
    for _ in range(FLAGS.warmup):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / FLAGS.iters


def copy_bandwidth_gbs() -> float:
    """Device streaming bandwidth: bytes read + written by a jitted elementwise `x + 1`."""
    n = FLAGS.copy_mib * 2**20 // 4
    x = jnp.zeros((n,), jnp.float32)
    seconds = time_call(jax.jit(lambda a: a + 1), x)
    return 2 * x.nbytes / seconds / 1e9


def decode_inputs(rng: np.random.Generator):
    n, ctx, ps = FLAGS.num_seqs, FLAGS.context_len, FLAGS.page_size
    hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim
    dtype = jnp.dtype(FLAGS.dtype)
    blocks = -(-ctx // ps)
    num_pages = n * blocks + 1  # page 0 is the null page
    tables = rng.permutation(np.arange(1, num_pages)).reshape(n, blocks).astype(np.int32)
    key = jax.random.key(FLAGS.seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (n, hq, d), dtype)
    k_pages = jax.random.normal(kk, (hkv, num_pages, ps, d), dtype)
    v_pages = jax.random.normal(kv, (hkv, num_pages, ps, d), dtype)
    lengths = jnp.full((n,), ctx, jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(tables), lengths


def decode_bytes(q, lengths) -> int:
    item = jnp.dtype(FLAGS.dtype).itemsize
    kv = 2 * int(np.sum(np.asarray(lengths))) * FLAGS.num_kv_heads * FLAGS.head_dim * item
    return kv + 2 * q.size * item


def prefill_inputs():
    n, t = FLAGS.prefill_seqs or FLAGS.num_seqs, FLAGS.prompt_len
    hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim
    dtype = jnp.dtype(FLAGS.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(FLAGS.seed + 1), 3)
    q = jax.random.normal(kq, (n * t, hq, d), dtype)
    k = jax.random.normal(kk, (n * t, hkv, d), dtype)
    v = jax.random.normal(kv, (n * t, hkv, d), dtype)
    qsl = jnp.arange(n + 1, dtype=jnp.int32) * t
    return q, k, v, qsl, jnp.zeros((n,), jnp.int32)


def prefill_flops() -> float:
    n, t = FLAGS.prefill_seqs or FLAGS.num_seqs, FLAGS.prompt_len
    pairs = n * t * (t + 1) / 2
    return 4.0 * pairs * FLAGS.num_q_heads * FLAGS.head_dim


def run_decode(on_gpu: bool) -> None:
    q, k_pages, v_pages, tables, lengths = decode_inputs(np.random.default_rng(FLAGS.seed))
    scale = FLAGS.head_dim ** -0.5
    nbytes = decode_bytes(q, lengths)
    print(f"\n== paged decode: {FLAGS.num_seqs} seqs x {FLAGS.context_len} ctx, "
          f"heads {FLAGS.num_q_heads}/{FLAGS.num_kv_heads}, head_dim {FLAGS.head_dim}, "
          f"page {FLAGS.page_size}, {FLAGS.dtype}; {nbytes / 1e6:.3f} MB read+written per call")
    copy = copy_bandwidth_gbs() if on_gpu else None
    if copy is not None:
        print(f"device copy bandwidth (x + 1, {FLAGS.copy_mib} MiB): {copy:8.1f} GB/s")
    results = {}
    for backend in FLAGS.backends:
        name = dispatch.resolve_backend(backend)
        fn = jax.jit(lambda *a, name=name: dispatch.paged_decode_attention(
            *a, scale=scale, backend=name))
        results[name] = time_call(fn, q, k_pages, v_pages, tables, lengths)
    if on_gpu and FLAGS.baselines:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
        blocks = tables.shape[1]
        splits = max(s for s in (16, 8, 4, 2, 1) if blocks % s == 0)
        per_split = blocks // splits
        ppcb = max(p for p in (8, 4, 2, 1) if per_split % p == 0)
        fn = jax.jit(lambda *a: jax_paged.paged_attention(
            a[0] * scale, *a[1:], k_splits=splits, pages_per_compute_block=ppcb))
        results["jax.pallas.ops.gpu.paged_attention"] = time_call(
            fn, q, k_pages, v_pages, tables, lengths)
    for name, seconds in results.items():
        gbs = nbytes / seconds / 1e9
        line = f"{name:>38}: {seconds * 1e6:10.1f} us/call {gbs:9.2f} GB/s"
        if copy is not None:
            line += f"  {gbs / copy:6.1%} of copy bandwidth"
        print(line + _speedup(results, name))


def run_prefill(on_gpu: bool) -> None:
    q, k, v, qsl, ctx = prefill_inputs()
    n, t = FLAGS.prefill_seqs or FLAGS.num_seqs, FLAGS.prompt_len
    scale = FLAGS.head_dim ** -0.5
    flops = prefill_flops()
    print(f"\n== ragged prefill: {n} prompts x {t} tokens, heads {FLAGS.num_q_heads}/"
          f"{FLAGS.num_kv_heads}, head_dim {FLAGS.head_dim}, {FLAGS.dtype}; "
          f"{flops / 1e9:.4f} GFLOP per call (causal)")
    results = {}
    for backend in FLAGS.backends:
        name = dispatch.resolve_backend(backend)
        fn = jax.jit(lambda *a, name=name: dispatch.ragged_prefill_attention(
            *a, scale=scale, backend=name))
        results[name] = time_call(fn, q, k, v, qsl, ctx)
    if on_gpu and FLAGS.baselines:
        hq, hkv, d = FLAGS.num_q_heads, FLAGS.num_kv_heads, FLAGS.head_dim
        qb, kb, vb = (x.reshape(n, t, x.shape[1], d) for x in (q, k, v))
        if FLAGS.dtype == "float32":
            logging.warning("cuDNN attention needs fp16/bf16; skipping it for float32")
        else:
            fn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
                a, b, c, scale=scale, is_causal=True, implementation="cudnn"))
            results["jax.nn.dot_product_attention[cudnn]"] = time_call(fn, qb, kb, vb)
        from jax.experimental.pallas.ops.gpu import attention as jax_flash
        if t % min(128, t):
            logging.warning("mha needs prompt_len to be a multiple of min(128, prompt_len); "
                            "skipping it")
        else:
            rep = hq // hkv  # mha has no GQA: give it one kv head per query head
            kr, vr = jnp.repeat(kb, rep, axis=2), jnp.repeat(vb, rep, axis=2)
            fn = jax.jit(lambda a, b, c: jax_flash.mha(a, b, c, segment_ids=None,
                                                       sm_scale=scale, causal=True))
            results["jax.pallas.ops.gpu.attention.mha"] = time_call(fn, qb, kr, vr)
    for name, seconds in results.items():
        line = f"{name:>38}: {seconds * 1e6:10.1f} us/call {flops / seconds / 1e12:9.4f} TFLOP/s"
        print(line + _speedup(results, name))


def _speedup(results: dict[str, float], name: str) -> str:
    """' (pallas is N.NNx faster)' when the pallas backend was timed and `name` is another."""
    ours = results.get("pallas")
    if ours is None or name == "pallas":
        return ""
    return f"  (pallas is {results[name] / ours:5.2f}x faster)"


def main(argv):
    del argv
    for backend in FLAGS.backends:
        dispatch.resolve_backend(backend)  # fail fast on a bad name
    if FLAGS.num_q_heads % FLAGS.num_kv_heads:
        raise app.UsageError("--num_q_heads must be a multiple of --num_kv_heads")
    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}; "
          f"backends {[dispatch.resolve_backend(b) for b in FLAGS.backends]}")
    if FLAGS.kernel in ("decode", "both"):
        run_decode(on_gpu)
    if FLAGS.kernel in ("prefill", "both"):
        run_prefill(on_gpu)


if __name__ == "__main__":
    app.run(main)

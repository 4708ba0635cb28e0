"""The in-process KV pull (`runtime/kv_transfer.KVMigrator`): its compile-only warm-up touches
neither cache and leaves every bucket's pull compiled, and a pull copies the blocks exactly
(converting kv heads between tp layouts and pipeline stages)."""

import jax
import numpy as np
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime import compile_counter
from distserve_jax.runtime.kv_transfer import KVMigrator
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig
from distserve_jax.runtime.sharding import make_mesh


def _runner(spec, devices, pp: int) -> ModelRunner:
    tp = len(devices) // pp
    meshes = [make_mesh(devices[i * tp:(i + 1) * tp]) for i in range(pp)]
    return ModelRunner(spec.config, meshes, spec.weights,
                       RunnerConfig(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64))


def _layers(runner: ModelRunner) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's (K, V) pages as host arrays `[kv_heads, pages, page_size, head_dim]`, stages in order."""
    return [(np.asarray(k), np.asarray(v)) for st in runner.stages for k, v in st.pages]


def _fill(runner: ModelRunner, rng) -> None:
    for st in runner.stages:
        st.pages = jax.tree.map(lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding),
                                st.pages)


@pytest.mark.parametrize("src_layout,dst_layout", [((1, 1), (2, 2)), ((4, 1), (1, 1))],
                         ids=["tp1-to-tp1pp2", "tp4-to-tp1"])
def test_warmup_compiles_every_bucket_without_touching_the_caches(hf_checkpoint, src_layout, dst_layout):
    spec = resolve_model(str(hf_checkpoint("llama3")))  # 2 kv heads: tp=4 replicates each twice
    devs = jax.devices()
    (sn, sp), (dn, dp) = src_layout, dst_layout
    src, dst = _runner(spec, devs[:sn], sp), _runner(spec, devs[sn:sn + dn], dp)
    rng = np.random.default_rng(0)
    _fill(src, rng)
    _fill(dst, rng)
    before_src, before_dst = _layers(src), _layers(dst)
    mig = KVMigrator(src, dst)
    assert mig.warmup() == len(mig.buckets)
    for got, want in ((_layers(src), before_src), (_layers(dst), before_dst)):  # compile-only: nothing ran
        assert all(np.array_equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))
    count = compile_counter.count()
    expected = [[k.copy(), v.copy()] for k, v in before_dst]
    dst_free = list(range(1, dst.config.num_blocks))
    for n in mig.buckets:
        if n > len(dst_free):
            break
        src_blocks = [int(b) for b in rng.choice(np.arange(1, src.config.num_blocks), n, replace=False)]
        dst_blocks = dst_free[:n]
        mig.pull(src_blocks, dst_blocks).wait()
        for layer, (k, v) in enumerate(before_src):
            for e, x in zip(expected[layer], (k, v)):
                # Destination kv head j holds the source's head `mig.head_index[j]`.
                e[:, dst_blocks] = x[mig.head_index][:, src_blocks]
        dst_free = dst_free[n:] + dst_free[:n]
    assert compile_counter.count() == count, "a pull of a warmed bucket compiled"
    assert all(f._cache_size() == 0 for f in mig._gathers + mig._scatters), "a warmed pull went through jit"
    for layer, (got, want) in enumerate(zip(_layers(dst), expected)):
        for g, w in zip(got, want):
            # A pull copies bytes (gather + scatter, no arithmetic): exact.
            np.testing.assert_array_equal(g, w, err_msg=f"layer {layer}")
    assert _layers(src) and all(np.array_equal(a, b) for g, w in zip(_layers(src), before_src)
                                for a, b in zip(g, w)), "a pull changed the source cache"

"""Tests for `pallas_kernels/cpu_native.py`: the C++ decode attention, KV write and page
gather/scatter against the jnp references and float64 numpy, in-place writes, shard_map over tp,
bad inputs, and the build."""

import functools
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pallas_kernels import cpu_native, dispatch, reference
from tests.pallas_kernels.test_pallas_attention import (DECODE_SPECS, HEADS, REF_DECODE, _sharded, decode_case,
                                                        np_decode, np_inputs, rel_err)

NATIVE_DECODE = jax.jit(cpu_native.paged_decode_attention, static_argnames=("scale", "sliding_window"))


def test_kernels_build_and_auto_picks_native_on_cpu(monkeypatch):
    assert cpu_native.available(), "the C++ kernels must build on the CI machine (gcc is there)"
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend() == "native"
    assert dispatch.resolve_backend("native") == "native"


@pytest.mark.parametrize("kv_heads,group,head_dim,window", [
    (2, 1, 64, None), (2, 4, 80, 10), (1, 8, 128, None), (3, 2, 64, 1), (2, 1, 20, 33),
    (1, 12, 64, None)])  # 12 query heads per kv head: two head blocks of the kernel
def test_native_decode_matches_references(kv_heads, group, head_dim, window):
    scale = head_dim ** -0.5
    for seed in range(3):
        args = decode_case(3000 + 100 * head_dim + 10 * group + seed, dtype=jnp.float32, kv_heads=kv_heads,
                           group=group, head_dim=head_dim, nan_garbage=seed == 2)
        out = NATIVE_DECODE(**args, scale=scale, sliding_window=window)
        assert out.shape == args["q"].shape and out.dtype == jnp.float32
        a = np_inputs(args)
        exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"], scale, window)
        assert rel_err(out, exact) <= 2e-6
        if seed < 2:  # the reference reads the NaN slots of the third case through its masked gather
            assert rel_err(out, REF_DECODE(**args, scale=scale, sliding_window=window)) <= 2e-6
        empty = np.asarray(args["lengths"]) == 0
        assert empty.any() and not np.asarray(out)[empty].any(), "empty slot != 0"


def test_native_decode_large_logits_do_not_overflow():
    args = decode_case(41, dtype=jnp.float32, kv_heads=1, group=2, head_dim=64)
    args["q"] = args["q"] * 300.0  # scores in the thousands: a naive exp overflows
    out = NATIVE_DECODE(**args, scale=1.0, sliding_window=None)
    a = np_inputs(args)
    exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"], 1.0, None)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, exact) <= 1e-5


def test_native_decode_clamps_page_ids_like_the_reference():
    """Under jit, out-of-range page ids are clamped into the cache on every backend (the index contract)."""
    args = decode_case(42, dtype=jnp.float32, kv_heads=2, group=1, head_dim=64)
    bad = np.array(args["block_tables"])
    longest = np.argmax(np.asarray(args["lengths"]))
    bad[longest][0], bad[longest][1] = 10_000, -7
    clamped = np.clip(bad, 0, args["k_pages"].shape[1] - 1)
    got = NATIVE_DECODE(**{**args, "block_tables": jnp.asarray(bad)}, scale=0.1)
    want = REF_DECODE(**{**args, "block_tables": jnp.asarray(clamped)}, scale=0.1)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(REF_DECODE(**{**args, "block_tables": jnp.asarray(bad)}, scale=0.1), want) == 0.0


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_native_write_matches_reference_and_updates_donated_pages_in_place(num_tokens):
    rng = np.random.default_rng(num_tokens)
    kp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((num_tokens, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_tokens, 2, 16)), jnp.float32)
    slots = jnp.asarray(rng.choice(24, num_tokens, replace=False).astype(np.int32))
    want_k, want_v = reference.write_kv_pages_ref(kp, vp, k, v, slots)
    ptrs = (kp.unsafe_buffer_pointer(), vp.unsafe_buffer_pointer())
    write = jax.jit(cpu_native.write_kv_pages, donate_argnums=(0, 1))
    new_k, new_v = write(kp, vp, k, v, slots)
    np.testing.assert_array_equal(new_k, want_k)
    np.testing.assert_array_equal(new_v, want_v)
    assert (new_k.unsafe_buffer_pointer(), new_v.unsafe_buffer_pointer()) == ptrs, "the cache was copied"
    assert kp.is_deleted() and vp.is_deleted()


def test_native_write_drops_slots_outside_the_cache_like_the_reference():
    kp = vp = jnp.zeros((1, 2, 4, 8), jnp.float32)
    k = v = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 1, 8) + 1
    slots = jnp.array([8, 3, -1], jnp.int32)  # only slot 3 exists
    got = jax.jit(cpu_native.write_kv_pages)(kp, vp, k, v, slots)
    want = jax.jit(reference.write_kv_pages_ref)(kp, vp, k, v, slots)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    flat = np.asarray(want[0]).reshape(8, 8)
    np.testing.assert_array_equal(flat[3], np.asarray(k[1, 0]))
    assert not np.delete(flat, 3, axis=0).any(), "an out-of-range slot was written"


def test_native_page_gather_and_in_place_scatter_match_references():
    rng = np.random.default_rng(7)
    src = jnp.asarray(rng.standard_normal((3, 9, 4, 16)), jnp.float32)
    ids = jnp.asarray([5, 0, 8, 2, 5], jnp.int32)  # repeats are fine for a gather
    got = jax.jit(cpu_native.gather_pages)(src, ids)
    np.testing.assert_array_equal(got, reference.gather_pages_ref(src, ids))
    assert got.shape == (3, 5, 4, 16)

    dst = jnp.asarray(rng.standard_normal((3, 7, 4, 16)), jnp.float32)
    dst_ids = jnp.asarray([6, 1, 3, 0, 4], jnp.int32)
    want = reference.scatter_pages_ref(dst, got, dst_ids)
    ptr = dst.unsafe_buffer_pointer()
    new = jax.jit(cpu_native.scatter_pages, donate_argnums=(0,))(dst, got, dst_ids)
    np.testing.assert_array_equal(new, want)
    assert new.unsafe_buffer_pointer() == ptr and dst.is_deleted(), "the destination pages were copied"


def test_native_page_ops_follow_the_index_contract_and_reject_bad_shapes():
    rng = np.random.default_rng(9)
    pages = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    ids = jnp.array([1, 4, -2], jnp.int32)  # a gather clamps: pages 1, 3, 0
    got = jax.jit(cpu_native.gather_pages)(pages, ids)
    np.testing.assert_array_equal(got, jax.jit(reference.gather_pages_ref)(pages, ids))
    np.testing.assert_array_equal(got, np.asarray(pages)[:, [1, 3, 0]])
    blocks = jnp.ones((2, 3, 2, 8), jnp.float32)
    got = jax.jit(cpu_native.scatter_pages)(pages, blocks, ids)  # a scatter drops ids 4 and -2
    want = np.asarray(pages).copy()
    want[:, 1] = 1.0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.jit(reference.scatter_pages_ref)(pages, blocks, ids), want)
    with pytest.raises(ValueError, match="blocks"):
        dispatch.scatter_pages(pages, jnp.ones((2, 2, 2, 8), jnp.float32), jnp.array([1], jnp.int32), backend="native")
    with pytest.raises(ValueError, match="page_ids"):
        dispatch.gather_pages(pages, jnp.array([1.0]), backend="native")
    with pytest.raises(ValueError, match=r"page_ids\[1\] = 4 is outside \[0, 3\]"):
        dispatch.gather_pages(pages, np.array([1, 4], np.int32), backend="native")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_page_ops_under_shard_map_over_tp(backend):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    rng = np.random.default_rng(8)
    src = jnp.asarray(rng.standard_normal((4, 6, 2, 8)), jnp.float32)
    dst = jnp.asarray(rng.standard_normal((4, 5, 2, 8)), jnp.float32)
    heads, rep = jax.sharding.PartitionSpec("tp"), jax.sharding.PartitionSpec()
    take = jax.shard_map(functools.partial(dispatch.gather_pages, backend=backend), mesh=mesh,
                         in_specs=(heads, rep), out_specs=heads)
    put = jax.shard_map(functools.partial(dispatch.scatter_pages, backend=backend), mesh=mesh,
                        in_specs=(heads, heads, rep), out_specs=heads)
    ids, dst_ids = jnp.asarray([3, 1], jnp.int32), jnp.asarray([0, 4], jnp.int32)
    moved = jax.jit(lambda s, d: put(d, take(s, ids), dst_ids))(src, dst)
    want = np.asarray(dst).copy()
    want[:, [0, 4]] = np.asarray(src)[:, [3, 1]]
    np.testing.assert_array_equal(moved, want)


def test_native_kernels_take_float32_only():
    args = decode_case(43, dtype=jnp.bfloat16, kv_heads=2, group=1, head_dim=64)
    with pytest.raises(ValueError, match="float32"):
        cpu_native.paged_decode_attention(**args, scale=0.1)


def test_native_backend_falls_back_to_xla_for_bfloat16():
    args = decode_case(44, dtype=jnp.bfloat16, kv_heads=2, group=4, head_dim=80)
    out = dispatch.paged_decode_attention(**args, scale=80 ** -0.5, sliding_window=10, backend="native")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, REF_DECODE(**args, scale=80 ** -0.5, sliding_window=10)) <= 2e-2


def test_native_decode_and_write_under_shard_map_over_tp():
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    args = decode_case(45, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80)
    scale = 80 ** -0.5

    def local(kw):
        return dispatch.paged_decode_attention(**kw, scale=scale, sliding_window=10, backend="native")

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(DECODE_SPECS,), out_specs=HEADS))
    out = fn(_sharded(mesh, args, DECODE_SPECS))
    assert rel_err(out, REF_DECODE(**args, scale=scale, sliding_window=10)) <= 2e-6


def test_build_is_cached_and_reports_compiler_failures(tmp_path, monkeypatch):
    first = cpu_native.build()
    mtime = first.stat().st_mtime_ns
    assert cpu_native.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(cpu_native.NativeBuildError, match="compiling cpu_kernels.cc failed"):
        cpu_native.build()
    assert not list(tmp_path.rglob("*.so")), "a failed build left a library behind"

"""Tests for `pallas_kernels/cpu_native.py`: the C++ decode attention, KV write and page
gather/scatter against the jnp references and float64 numpy, in-place writes, shard_map over tp,
bad inputs, and the build.

Every kernel test runs once per distinct SIMD path this host can build (`cpu_native.distinct_builds`)
and names it in its id: ``native-<path>`` is the build the kernels serve with (-march=native; on
an AVX-512 host ``native-avx512``), ``forced-<path>`` the same source capped at AVX2, AVX or the
x86-64 baseline (SSE2), i.e. the paths other hosts' -march=native selects. The paths round
differently (FMA contraction, the AVX horizontal adds), so the float comparisons use the
reordering bound of `tests/tolerances.py`.
"""

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
from tests.pallas_kernels.test_pallas_attention import (DECODE_SPECS, HEADS, REF_DECODE, _cached, _sharded,
                                                        decode_case, decode_keys, np_decode, np_inputs, rel_err)
from tests.tolerances import assert_close_reordered, attention_reduction_len

NATIVE_DECODE = jax.jit(cpu_native.paged_decode_attention, static_argnames=("scale", "sliding_window", "build"))

# Build -> SIMD path, native first. If nothing builds, one "unbuilt" native entry makes every
# kernel test fail (a missing compiler must not turn into skipped tests).
PATHS = cpu_native.distinct_builds() or {cpu_native.NATIVE: "unbuilt"}


def _build_id(build: str) -> str:
    return f"{'native' if build == cpu_native.NATIVE else 'forced'}-{PATHS[build]}"


each_build = pytest.mark.parametrize("build", list(PATHS), ids=[_build_id(b) for b in PATHS])
native_build = pytest.mark.parametrize("build", [cpu_native.NATIVE], ids=[_build_id(cpu_native.NATIVE)])


def _host_simd_path() -> str:
    """The path -march=native must select on this host, from /proc/cpuinfo's flags."""
    flags = set(cpu_native._cpu_features().split())
    if not cpu_native._X86_64:
        return "generic"
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    if "avx2" in flags:
        return "avx2-nofma"
    return "avx" if "avx" in flags else "sse2"


@native_build
def test_kernels_build_and_auto_picks_native_on_cpu(monkeypatch, build):
    assert cpu_native.available(build), "the C++ kernels must build on the CI machine (gcc is there)"
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend() == "native"
    assert dispatch.resolve_backend("native") == "native"


@native_build
def test_native_build_compiles_the_hosts_simd_path(build):
    host = _host_simd_path()
    assert cpu_native.simd_path(build) == host, "-march=native did not target this host's CPU"
    if cpu_native._X86_64:  # a capped build compiles its cap, or the host's path where that is narrower
        order = ["sse2", "avx", "avx2-nofma", "avx2", "avx512"]
        for name in ("avx2", "avx", "sse2"):
            want = name if order.index(name) <= order.index(host) else host
            assert cpu_native.simd_path(name) == want, (name, cpu_native.simd_path(name), host)
        assert list(PATHS.values())[0] == host and "sse2" in PATHS.values(), PATHS


@pytest.mark.parametrize("kv_heads,group,head_dim,window", [
    (2, 1, 64, None), (2, 4, 80, 10), (1, 8, 128, None), (3, 2, 64, 1), (2, 1, 20, 33),
    (1, 12, 64, None)])  # 12 query heads per kv head: two head blocks of the kernel
@each_build
def test_native_decode_matches_references(build, kv_heads, group, head_dim, window):
    scale = head_dim ** -0.5
    for seed in range(3):
        args = decode_case(3000 + 100 * head_dim + 10 * group + seed, dtype=jnp.float32, kv_heads=kv_heads,
                           group=group, head_dim=head_dim, nan_garbage=seed == 2)
        out = NATIVE_DECODE(**args, scale=scale, sliding_window=window, build=build)
        assert out.shape == args["q"].shape and out.dtype == jnp.float32
        a = np_inputs(args)
        exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"], scale, window)
        # q.k over head_dim, then softmax and p.V over the keys, in float32 (observed <= 0.1x the
        # bound against float64 on every path here; a wrong key or head is O(1) off).
        n = attention_reduction_len(head_dim, decode_keys(args, window))
        assert_close_reordered(out, exact, reduction_len=n, what=f"{build} vs float64, seed {seed}")
        if seed < 2:  # the reference reads the NaN slots of the third case through its masked gather
            # Another float32 order of the same sums (observed <= 0.19x the bound).
            assert_close_reordered(out, REF_DECODE(**args, scale=scale, sliding_window=window), reduction_len=n,
                                   what=f"{build} vs the jnp reference, seed {seed}")
        empty = np.asarray(args["lengths"]) == 0
        assert empty.any() and not np.asarray(out)[empty].any(), "empty slot != 0"


def _score_sensitivity(a, scale: float) -> float:
    """How much the outputs can move per unit of relative score error: max over rows of
    (1 - p_max) * max |score| * 2 max |v|. A score s rounds by ~eps32 * sqrt(head_dim) * |s|; only
    the weight off the top key (1 - p_max) turns that into output, at most 2 max |v| per unit."""
    worst = 0.0
    q, kp, vp = (np.asarray(a[n], np.float64) for n in ("q", "k_pages", "v_pages"))
    group = q.shape[1] // kp.shape[0]
    for s, n in enumerate(a["lengths"]):
        if n == 0:
            continue
        keys = _cached(kp, a["block_tables"][s], int(n))
        for h in range(q.shape[1]):
            sc = keys[:, h // group] @ q[s, h] * scale
            p = np.exp(sc - sc.max())
            worst = max(worst, (1 - p.max() / p.sum()) * np.abs(sc).max())
    return worst * 2 * np.abs(vp).max()


@each_build
def test_native_decode_large_logits_do_not_overflow(build):
    args = decode_case(41, dtype=jnp.float32, kv_heads=1, group=2, head_dim=64)
    args["q"] = args["q"] * 300.0  # scores in the thousands: a naive exp overflows
    out = NATIVE_DECODE(**args, scale=1.0, sliding_window=None, build=build)
    a = np_inputs(args)
    exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"], 1.0, None)
    assert np.isfinite(np.asarray(out)).all()
    # Scores ~5e3 round by ~5e-3 absolute; one row has a top-two gap of only 5, so its second key
    # keeps weight 6e-3 and those rounding errors reach the output: the bound's scale adds that
    # sensitivity (observed <= 0.01x the bound; a wrong max or rescale is O(1) off).
    sens = _score_sensitivity(a, 1.0)
    assert_close_reordered(out, exact, reduction_len=attention_reduction_len(64, decode_keys(args, None)),
                           scale=np.abs(exact).max() + sens, what=f"{build} vs float64, large scores")


@each_build
def test_native_decode_clamps_page_ids_like_the_reference(build):
    """Under jit, out-of-range page ids are clamped into the cache on every backend (the index contract)."""
    args = decode_case(42, dtype=jnp.float32, kv_heads=2, group=1, head_dim=64)
    bad = np.array(args["block_tables"])
    longest = np.argmax(np.asarray(args["lengths"]))
    bad[longest][0], bad[longest][1] = 10_000, -7
    clamped = np.clip(bad, 0, args["k_pages"].shape[1] - 1)
    got = NATIVE_DECODE(**{**args, "block_tables": jnp.asarray(bad)}, scale=0.1, build=build)
    want = REF_DECODE(**{**args, "block_tables": jnp.asarray(clamped)}, scale=0.1)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(REF_DECODE(**{**args, "block_tables": jnp.asarray(bad)}, scale=0.1), want) == 0.0


@pytest.mark.parametrize("num_tokens", [1, 5])
@each_build
def test_native_write_matches_reference_and_updates_donated_pages_in_place(build, num_tokens):
    rng = np.random.default_rng(num_tokens)
    kp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((num_tokens, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_tokens, 2, 16)), jnp.float32)
    slots = jnp.asarray(rng.choice(24, num_tokens, replace=False).astype(np.int32))
    want_k, want_v = reference.write_kv_pages_ref(kp, vp, k, v, slots)
    ptrs = (kp.unsafe_buffer_pointer(), vp.unsafe_buffer_pointer())
    write = jax.jit(functools.partial(cpu_native.write_kv_pages, build=build), donate_argnums=(0, 1))
    new_k, new_v = write(kp, vp, k, v, slots)
    # Copies of rows, no arithmetic: exact on every path.
    np.testing.assert_array_equal(new_k, want_k)
    np.testing.assert_array_equal(new_v, want_v)
    assert (new_k.unsafe_buffer_pointer(), new_v.unsafe_buffer_pointer()) == ptrs, "the cache was copied"
    assert kp.is_deleted() and vp.is_deleted()


@each_build
def test_native_write_drops_slots_outside_the_cache_like_the_reference(build):
    kp = vp = jnp.zeros((1, 2, 4, 8), jnp.float32)
    k = v = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 1, 8) + 1
    slots = jnp.array([8, 3, -1], jnp.int32)  # only slot 3 exists
    got = jax.jit(functools.partial(cpu_native.write_kv_pages, build=build))(kp, vp, k, v, slots)
    want = jax.jit(reference.write_kv_pages_ref)(kp, vp, k, v, slots)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    flat = np.asarray(want[0]).reshape(8, 8)
    np.testing.assert_array_equal(flat[3], np.asarray(k[1, 0]))
    assert not np.delete(flat, 3, axis=0).any(), "an out-of-range slot was written"


@each_build
def test_native_page_gather_and_in_place_scatter_match_references(build):
    rng = np.random.default_rng(7)
    src = jnp.asarray(rng.standard_normal((3, 9, 4, 16)), jnp.float32)
    ids = jnp.asarray([5, 0, 8, 2, 5], jnp.int32)  # repeats are fine for a gather
    got = jax.jit(functools.partial(cpu_native.gather_pages, build=build))(src, ids)
    np.testing.assert_array_equal(got, reference.gather_pages_ref(src, ids))  # memcpy of pages: exact
    assert got.shape == (3, 5, 4, 16)

    dst = jnp.asarray(rng.standard_normal((3, 7, 4, 16)), jnp.float32)
    dst_ids = jnp.asarray([6, 1, 3, 0, 4], jnp.int32)
    want = reference.scatter_pages_ref(dst, got, dst_ids)
    ptr = dst.unsafe_buffer_pointer()
    new = jax.jit(functools.partial(cpu_native.scatter_pages, build=build), donate_argnums=(0,))(dst, got, dst_ids)
    np.testing.assert_array_equal(new, want)  # memcpy of pages: exact
    assert new.unsafe_buffer_pointer() == ptr and dst.is_deleted(), "the destination pages were copied"


@each_build
def test_native_page_ops_follow_the_index_contract_and_reject_bad_shapes(build):
    rng = np.random.default_rng(9)
    pages = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    ids = jnp.array([1, 4, -2], jnp.int32)  # a gather clamps: pages 1, 3, 0
    got = jax.jit(functools.partial(cpu_native.gather_pages, build=build))(pages, ids)
    np.testing.assert_array_equal(got, jax.jit(reference.gather_pages_ref)(pages, ids))
    np.testing.assert_array_equal(got, np.asarray(pages)[:, [1, 3, 0]])
    blocks = jnp.ones((2, 3, 2, 8), jnp.float32)
    got = jax.jit(functools.partial(cpu_native.scatter_pages, build=build))(pages, blocks, ids)  # a scatter drops ids 4 and -2
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


@pytest.mark.parametrize("build", [None, *PATHS], ids=["reference", *(_build_id(b) for b in PATHS)])
def test_page_ops_under_shard_map_over_tp(build):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    rng = np.random.default_rng(8)
    src = jnp.asarray(rng.standard_normal((4, 6, 2, 8)), jnp.float32)
    dst = jnp.asarray(rng.standard_normal((4, 5, 2, 8)), jnp.float32)
    heads, rep = jax.sharding.PartitionSpec("tp"), jax.sharding.PartitionSpec()
    if build is None:
        gather = functools.partial(dispatch.gather_pages, backend="reference")
        scatter = functools.partial(dispatch.scatter_pages, backend="reference")
    elif build == cpu_native.NATIVE:  # what the engine calls
        gather = functools.partial(dispatch.gather_pages, backend="native")
        scatter = functools.partial(dispatch.scatter_pages, backend="native")
    else:
        gather = functools.partial(cpu_native.gather_pages, build=build)
        scatter = functools.partial(cpu_native.scatter_pages, build=build)
    take = jax.shard_map(gather, mesh=mesh, in_specs=(heads, rep), out_specs=heads)
    put = jax.shard_map(scatter, mesh=mesh, in_specs=(heads, heads, rep), out_specs=heads)
    ids, dst_ids = jnp.asarray([3, 1], jnp.int32), jnp.asarray([0, 4], jnp.int32)
    moved = jax.jit(lambda s, d: put(d, take(s, ids), dst_ids))(src, dst)
    want = np.asarray(dst).copy()
    want[:, [0, 4]] = np.asarray(src)[:, [3, 1]]
    np.testing.assert_array_equal(moved, want)  # pages copied, not computed: exact


@native_build
def test_native_kernels_take_float32_only(build):
    args = decode_case(43, dtype=jnp.bfloat16, kv_heads=2, group=1, head_dim=64)
    with pytest.raises(ValueError, match="float32"):
        cpu_native.paged_decode_attention(**args, scale=0.1, build=build)


def test_native_backend_falls_back_to_xla_for_bfloat16():
    args = decode_case(44, dtype=jnp.bfloat16, kv_heads=2, group=4, head_dim=80)
    out = dispatch.paged_decode_attention(**args, scale=80 ** -0.5, sliding_window=10, backend="native")
    assert out.dtype == jnp.bfloat16
    # bfloat16 rounding, not reordering: outputs carry 8 significant bits (one rounding is up to
    # 2^-9 = 2e-3 relative) and the two paths round p and the output at different points; 2e-2 is
    # ~2.5 bf16 ulps of the output scale (observed ~2e-3).
    assert rel_err(out, REF_DECODE(**args, scale=80 ** -0.5, sliding_window=10)) <= 2e-2


@each_build
def test_native_decode_and_write_under_shard_map_over_tp(build):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    args = decode_case(45, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80)
    scale = 80 ** -0.5

    def local(kw):
        if build == cpu_native.NATIVE:  # through the dispatcher, as the engine calls it
            return dispatch.paged_decode_attention(**kw, scale=scale, sliding_window=10, backend="native")
        return cpu_native.paged_decode_attention(**kw, scale=scale, sliding_window=10, build=build)

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(DECODE_SPECS,), out_specs=HEADS))
    out = fn(_sharded(mesh, args, DECODE_SPECS))
    # Each shard attends its own heads whole: the same float32 sums as unsharded (reordering bound).
    assert_close_reordered(out, REF_DECODE(**args, scale=scale, sliding_window=10),
                           reduction_len=attention_reduction_len(80, decode_keys(args, 10)),
                           what=f"{build} under shard_map vs the jnp reference")


@native_build
def test_build_is_cached_and_reports_compiler_failures(tmp_path, monkeypatch, build):
    first = cpu_native.build()
    mtime = first.stat().st_mtime_ns
    assert cpu_native.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(cpu_native.NativeBuildError, match="compiling cpu_kernels.cc failed"):
        cpu_native.build()
    assert not list(tmp_path.rglob("*.so")), "a failed build left a library behind"

"""Tests for `pallas_kernels`: the Pallas kernels (interpret mode) against the jnp reference
and against a float64 numpy implementation written here, the dispatcher, and shard_map over tp.

Interpret mode compiles slowly on CPU, so each parametrization is one compile with small static
shapes; every case draws fresh data (lengths, contexts, page orders) from its own seed.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import dispatch, paged_decode, ragged_prefill, reference
from pallas_kernels.lowering import Launch
from tests.tolerances import assert_close_reordered, attention_reduction_len

INTERPRET = Launch(lowering="interpret")
REF_PREFILL = jax.jit(reference.ragged_prefill_attention_ref, static_argnames=("scale", "sliding_window"))
REF_DECODE = jax.jit(reference.paged_decode_attention_ref, static_argnames=("scale", "sliding_window"))
# bfloat16 outputs carry 8 significant bits (one rounding: up to 2^-9 = 2e-3 relative) and the
# kernels round p to bfloat16 before p.V where the reference does not: rounding, not the order of
# the sums, sets this bound; 2e-2 of the output scale is ~2.5 bf16 ulps (observed <= 5.2e-3).
BF16_REL_TOL = 2e-2
NUM_PAGES, PAGE_SIZE = 40, 8


# ----------------------------------------------------------------------------- float64 numpy
def _softmax_attend(q, keys, values, allowed, scale):
    """q [n, d], keys/values [c, d], allowed [n, c] -> [n, d]; rows with no key get zeros."""
    s = np.where(allowed, q @ keys.T * scale, -np.inf)
    out = np.zeros((q.shape[0], values.shape[1]))
    for i in range(q.shape[0]):
        if allowed[i].any():
            p = np.exp(s[i] - s[i].max())
            out[i] = (p / p.sum()) @ values
    return out


def _cached(pages, table, n):
    """[kv_heads, num_pages, page_size, d] pages, one block table row -> [n, kv_heads, d]."""
    seq = pages[:, table].reshape(pages.shape[0], -1, pages.shape[-1])[:, :n]
    return np.swapaxes(seq, 0, 1)


def np_prefill(q, k, v, qsl, ctx, kp, vp, bt, scale, window):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    num_tokens, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros_like(q)
    for s in range(len(ctx)):
        a, b, c = int(qsl[s]), int(qsl[s + 1]), int(ctx[s])
        keys, values = k[a:b], v[a:b]
        if c:
            keys = np.concatenate([_cached(np.asarray(kp, np.float64), bt[s], c), keys])
            values = np.concatenate([_cached(np.asarray(vp, np.float64), bt[s], c), values])
        kpos, qpos = np.arange(c + b - a), c + np.arange(b - a)
        allowed = kpos[None, :] <= qpos[:, None]
        if window is not None:
            allowed &= kpos[None, :] > qpos[:, None] - window
        for h in range(hq):
            out[a:b, h] = _softmax_attend(q[a:b, h], keys[:, h // group], values[:, h // group],
                                          allowed, scale)
    return out


def np_decode(q, kp, vp, bt, lengths, scale, window):
    q = np.asarray(q, np.float64)
    kp, vp = np.asarray(kp, np.float64), np.asarray(vp, np.float64)
    num_seqs, hq, d = q.shape
    group = hq // kp.shape[0]
    out = np.zeros_like(q)
    for s in range(num_seqs):
        n = int(lengths[s])
        if n == 0:
            continue
        keys, values = _cached(kp, bt[s], n), _cached(vp, bt[s], n)
        kpos = np.arange(n)
        allowed = np.ones((1, n), bool) if window is None else (kpos > n - 1 - window)[None]
        for h in range(hq):
            out[s, h] = _softmax_attend(q[s, h][None], keys[:, h // group], values[:, h // group],
                                        allowed, scale)[0]
    return out


# ----------------------------------------------------------------------------- inputs
def _split(rng, total, parts, low=1):
    """Random `parts` positive-ish ints (>= low) summing to <= total."""
    cuts = np.sort(rng.choice(np.arange(1, total - parts * low + 1), parts - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [total - parts * low]])) + low
    return sizes


def _tables(rng, num_seqs, max_blocks):
    """Block tables drawing every sequence's pages in random order from pages 1.. (page 0 is
    the null page), never reusing a page."""
    ids = rng.permutation(np.arange(1, NUM_PAGES))[: num_seqs * max_blocks]
    return ids.reshape(num_seqs, max_blocks).astype(np.int32)


def _poison_unused(rng, pages, bt, lengths, value):
    """Fills every cache slot no sequence owns (page 0, slots past a length) with `value`."""
    pages = np.array(pages, np.float32)
    used = np.zeros(pages.shape[1:3], bool)
    for s, n in enumerate(lengths):
        for t in range(int(n)):
            used[bt[s, t // PAGE_SIZE], t % PAGE_SIZE] = True
    pages[:, ~used] = value
    return pages


def prefill_case(seed, *, dtype, kv_heads, group, head_dim, chunked, num_tokens=48, num_seqs=4,
                 nan_garbage=False):
    """A packed batch: one length-1 sequence, one empty sequence, a padding tail, lengths off
    the block/page grid; with `chunked`, contexts that include 0 and an exact page multiple."""
    rng = np.random.default_rng(seed)
    lens = _split(rng, num_tokens - 5, num_seqs - 2, low=2)
    lens = list(rng.permutation(np.concatenate([lens, [1, 0]])))
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    max_blocks = 5
    ctx = np.zeros(num_seqs, np.int32)
    if chunked:
        choices = [0, PAGE_SIZE * int(rng.integers(1, 4)), int(rng.integers(1, 40)),
                   int(rng.integers(1, 40))]
        ctx = np.array(rng.permutation(choices), np.int32)
    bt = _tables(rng, num_seqs, max_blocks)
    hq = kv_heads * group
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q, k, v = draw(num_tokens, hq, head_dim), draw(num_tokens, kv_heads, head_dim), draw(
        num_tokens, kv_heads, head_dim)
    kp = draw(kv_heads, NUM_PAGES, PAGE_SIZE, head_dim)
    vp = draw(kv_heads, NUM_PAGES, PAGE_SIZE, head_dim)
    if nan_garbage:
        kp, vp = (_poison_unused(rng, x, bt, ctx, np.nan) for x in (kp, vp))
    cast = lambda x: jnp.asarray(x, dtype)
    args = dict(q=cast(q), k=cast(k), v=cast(v), query_start_loc=jnp.asarray(qsl),
                context_lens=jnp.asarray(ctx))
    if chunked:
        args.update(k_pages=cast(kp), v_pages=cast(vp), block_tables=jnp.asarray(bt))
    return args


def decode_case(seed, *, dtype, kv_heads, group, head_dim, num_seqs=6, max_blocks=6,
                nan_garbage=False):
    """Lengths: 1, 0 (empty slot), a full table, an exact page multiple, two off-grid ones."""
    rng = np.random.default_rng(seed)
    full = max_blocks * PAGE_SIZE
    lengths = [1, 0, full, PAGE_SIZE * int(rng.integers(1, max_blocks)),
               int(rng.integers(2, full)), int(rng.integers(2, full))]
    lengths = np.array(rng.permutation(lengths)[:num_seqs], np.int32)
    bt = _tables(rng, num_seqs, max_blocks)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    kp = draw(kv_heads, NUM_PAGES, PAGE_SIZE, head_dim)
    vp = draw(kv_heads, NUM_PAGES, PAGE_SIZE, head_dim)
    if nan_garbage:
        kp, vp = (_poison_unused(rng, x, bt, lengths, np.nan) for x in (kp, vp))
    cast = lambda x: jnp.asarray(x, dtype)
    return dict(q=cast(draw(num_seqs, kv_heads * group, head_dim)), k_pages=cast(kp),
                v_pages=cast(vp), block_tables=jnp.asarray(bt), lengths=jnp.asarray(lengths))


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def prefill_keys(args, window) -> int:
    """The most keys any query of a prefill case attends (its context plus its own prompt)."""
    qsl, ctx = np.asarray(args["query_start_loc"]), np.asarray(args["context_lens"])
    longest = int(np.max(ctx + np.diff(qsl)))
    return min(longest, window) if window else longest


def decode_keys(args, window) -> int:
    """The most keys any sequence of a decode case attends."""
    longest = int(np.max(np.asarray(args["lengths"])))
    return min(longest, window) if window else longest


def assert_attention_close(out, want, *, dtype, head_dim: int, keys: int, what: str) -> None:
    """float32: two orders of the same sums (q.k over head_dim, softmax and p.V over `keys`), so
    the reordering bound of `tests/tolerances.py` (observed <= 0.16x it; a wrong key, head or
    mask is O(1) off). bfloat16: `BF16_REL_TOL` of the output scale."""
    if dtype == jnp.float32:
        assert_close_reordered(out, want, reduction_len=attention_reduction_len(head_dim, keys), what=what)
    else:
        assert rel_err(out, want) <= BF16_REL_TOL, what


def np_inputs(args):
    return {name: (np.asarray(jnp.asarray(x, jnp.float32)) if jnp.issubdtype(x.dtype, jnp.floating)
                   else np.asarray(x)) for name, x in args.items()}


# ----------------------------------------------------------------------------- prefill kernel
# Each row is one interpret-mode compile; together they cover GQA 1/4/8, head_dim 64/80/128,
# float32/bfloat16, plain and chunked (paged context) prefill, with and without a window.
PREFILL_CONFIGS = [
    # dtype, kv_heads, group, head_dim, chunked, window
    (jnp.float32, 2, 1, 64, False, None),
    (jnp.float32, 2, 4, 80, True, 11),
    (jnp.bfloat16, 1, 8, 128, True, 5),
    (jnp.bfloat16, 1, 8, 64, False, 7),
]


@pytest.mark.parametrize("dtype,kv_heads,group,head_dim,chunked,window", PREFILL_CONFIGS)
def test_ragged_prefill_matches_references(dtype, kv_heads, group, head_dim, chunked, window):
    scale = head_dim ** -0.5
    for seed in range(2):
        args = prefill_case(100 * head_dim + 10 * group + seed, dtype=dtype, kv_heads=kv_heads,
                            group=group, head_dim=head_dim, chunked=chunked)
        out = ragged_prefill.ragged_prefill_attention(
            **args, scale=scale, sliding_window=window, block_q=16, block_k=16,
            launch=INTERPRET, poison_output=True)
        assert out.shape == args["q"].shape and out.dtype == dtype
        assert not np.isnan(np.asarray(out, np.float32)).any(), "kernel left unwritten outputs"
        ref = REF_PREFILL(**args, scale=scale, sliding_window=window)
        a = np_inputs(args)
        exact = np_prefill(a["q"], a["k"], a["v"], a["query_start_loc"], a["context_lens"],
                           a.get("k_pages"), a.get("v_pages"), a.get("block_tables"), scale, window)
        keys = prefill_keys(args, window)
        assert_attention_close(out, ref, dtype=dtype, head_dim=head_dim, keys=keys, what="vs the jnp reference")
        assert_attention_close(out, exact, dtype=dtype, head_dim=head_dim, keys=keys, what="vs float64")
        tail = int(args["query_start_loc"][-1])
        assert tail < out.shape[0] and not np.asarray(out[tail:], np.float32).any(), "padding != 0"


def test_ragged_prefill_ignores_non_finite_stale_cache_slots():
    """NaN in page 0 and in slots past each context must not reach the output."""
    args = prefill_case(7, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80, chunked=True,
                        nan_garbage=True)
    scale = 80 ** -0.5  # the static arguments of a PREFILL_CONFIGS row: no new compile
    out = ragged_prefill.ragged_prefill_attention(**args, scale=scale, sliding_window=11,
                                                  block_q=16, block_k=16, launch=INTERPRET,
                                                  poison_output=True)
    a = np_inputs(args)
    exact = np_prefill(a["q"], a["k"], a["v"], a["query_start_loc"], a["context_lens"],
                       a["k_pages"], a["v_pages"], a["block_tables"], scale, 11)
    assert_attention_close(out, exact, dtype=jnp.float32, head_dim=80, keys=prefill_keys(args, 11), what="vs float64")


def test_build_schedule_covers_every_token_once():
    qsl = jnp.array([0, 17, 17, 18, 40], jnp.int32)
    build = jax.jit(ragged_prefill.build_schedule, static_argnums=(2, 3))
    sched = np.asarray(build(qsl, jnp.array([3, 0, 9, 0]), 45, 16))
    covered = np.zeros(45, int)
    for q0, qend, start, ctx, seq, live, _, _ in sched:
        rows = np.arange(q0, min(qend, q0 + 16))
        covered[rows] += 1
        assert np.all(rows >= start)
        if live:
            assert qsl[seq] == start and ctx == [3, 0, 9, 0][seq]
        else:
            assert ctx == 0
    assert np.all(covered == 1)


# ----------------------------------------------------------------------------- decode kernel
DECODE_CONFIGS = [
    # dtype, kv_heads, group, head_dim, window, num_splits
    (jnp.float32, 2, 1, 64, None, 3),
    (jnp.float32, 2, 4, 80, 10, 3),
    (jnp.bfloat16, 1, 8, 128, None, 2),
]


@pytest.mark.parametrize("dtype,kv_heads,group,head_dim,window,num_splits", DECODE_CONFIGS)
def test_paged_decode_matches_references(dtype, kv_heads, group, head_dim, window, num_splits):
    scale = head_dim ** -0.5
    for seed in range(2):
        args = decode_case(1000 + 100 * head_dim + 10 * group + seed, dtype=dtype,
                           kv_heads=kv_heads, group=group, head_dim=head_dim)
        out = paged_decode.paged_decode_attention(
            **args, scale=scale, sliding_window=window, block_k=16, num_splits=num_splits,
            launch=INTERPRET, poison_output=True)
        assert out.shape == args["q"].shape and out.dtype == dtype
        ref = REF_DECODE(**args, scale=scale, sliding_window=window)
        a = np_inputs(args)
        exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"],
                          scale, window)
        keys = decode_keys(args, window)
        assert_attention_close(out, ref, dtype=dtype, head_dim=head_dim, keys=keys, what="vs the jnp reference")
        assert_attention_close(out, exact, dtype=dtype, head_dim=head_dim, keys=keys, what="vs float64")
        empty = np.asarray(args["lengths"]) == 0
        assert empty.any() and not np.asarray(out, np.float32)[empty].any(), "empty slot != 0"


def test_paged_decode_ignores_non_finite_stale_cache_slots():
    args = decode_case(11, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80, nan_garbage=True)
    scale = 80 ** -0.5  # the static arguments of a DECODE_CONFIGS row: no new compile
    out = paged_decode.paged_decode_attention(**args, scale=scale, sliding_window=10, block_k=16,
                                              num_splits=3, launch=INTERPRET, poison_output=True)
    a = np_inputs(args)
    exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"],
                      scale, 10)
    assert_attention_close(out, exact, dtype=jnp.float32, head_dim=80, keys=decode_keys(args, 10), what="vs float64")


def test_combine_splits_is_stable_for_large_logits():
    """Splits whose maxima differ by ~1e4 (base 2) combine without overflow."""
    rng = np.random.default_rng(3)
    acc = jnp.asarray(rng.standard_normal((3, 1, 4)), jnp.float32)
    m = jnp.array([[1e4], [0.0], [-1e30]], jnp.float32)
    l = jnp.array([[2.0], [5.0], [0.0]], jnp.float32)
    out = np.asarray(paged_decode.combine_splits(acc, m, l))
    # Weights exp2(0) = 1 and two exact zeros: nothing is reordered, and rtol 1e-6 (8 ulps) leaves
    # room only for exp2's own rounding at 0; an overflow gives inf or NaN.
    np.testing.assert_allclose(out, np.asarray(acc[0]) / 2.0, rtol=1e-6)
    empty = paged_decode.combine_splits(jnp.zeros((2, 1, 4)), jnp.full((2, 1), -1e30),
                                        jnp.zeros((2, 1)))
    assert np.all(np.asarray(empty) == 0)


@pytest.mark.parametrize("dtype,kv_heads,group,head_dim,window,num_splits", DECODE_CONFIGS)
def test_xla_paged_decode_matches_references(dtype, kv_heads, group, head_dim, window, num_splits):
    from pallas_kernels import xla_decode
    scale = head_dim ** -0.5
    for seed in range(2):
        args = decode_case(2000 + 100 * head_dim + 10 * group + seed, dtype=dtype,
                           kv_heads=kv_heads, group=group, head_dim=head_dim)
        out = jax.jit(functools.partial(xla_decode.paged_decode_attention_xla, scale=scale,
                                        sliding_window=window))(**args)
        assert out.shape == args["q"].shape and out.dtype == dtype
        a = np_inputs(args)
        exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"],
                          scale, window)
        keys = decode_keys(args, window)
        assert_attention_close(out, REF_DECODE(**args, scale=scale, sliding_window=window), dtype=dtype,
                               head_dim=head_dim, keys=keys, what="vs the jnp reference")
        assert_attention_close(out, exact, dtype=dtype, head_dim=head_dim, keys=keys, what="vs float64")
        empty = np.asarray(args["lengths"]) == 0
        assert empty.any() and not np.asarray(out, np.float32)[empty].any(), "empty slot != 0"


# ----------------------------------------------------------------------------- dispatcher
def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend() == "native"  # auto on CPU (the C++ kernels build here)
    monkeypatch.setenv(dispatch.ENV_VAR, "pallas_interpret")
    assert dispatch.resolve_backend() == "pallas_interpret"
    assert dispatch.resolve_backend("reference") == "reference"  # argument overrides env
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        dispatch.resolve_backend()
    with pytest.raises(ValueError, match="needs a GPU"):
        dispatch.resolve_backend("pallas")
    monkeypatch.setattr(dispatch.cpu_native, "supported_on_default_backend", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.resolve_backend() == "xla"  # auto on CPU without the C++ kernels
    with pytest.raises(ValueError, match="'native' needs the CPU platform"):
        dispatch.resolve_backend("native")


def test_dispatch_routes_to_reference_from_env(monkeypatch):
    """The env var picks the backend (pallas_interpret is exercised by the shard_map tests)."""
    args = decode_case(5, dtype=jnp.float32, kv_heads=2, group=1, head_dim=64)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    out = dispatch.paged_decode_attention(**args, scale=np.float32(0.125))  # numpy scalars ok
    want = reference.paged_decode_attention_ref(**args, scale=0.125)
    np.testing.assert_array_equal(out, want)  # the same function on the same inputs: exact


def test_write_kv_pages_writes_exactly_the_slots():
    rng = np.random.default_rng(9)
    kp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, 2, 16)), jnp.float32)
    slots = np.array([13, 4, 23, 7, 8], np.int32)  # page 3 slot 1, page 1 slot 0, ...
    new_k, new_v = dispatch.write_kv_pages(kp, vp, k, v, jnp.asarray(slots))
    want_k, want_v = np.array(kp), np.array(vp)
    for i, s in enumerate(slots):
        want_k[:, s // 4, s % 4] = np.asarray(k[i])
        want_v[:, s // 4, s % 4] = np.asarray(v[i])
    np.testing.assert_array_equal(new_k, want_k)  # rows copied, not computed: exact
    np.testing.assert_array_equal(new_v, want_v)


def test_bad_inputs_raise_clear_errors():
    args = prefill_case(1, dtype=jnp.float32, kv_heads=2, group=1, head_dim=64, chunked=True)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dispatch.ragged_prefill_attention(**{**args, "q": args["q"][:, :1].repeat(3, 1)}, scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc has"):
        dispatch.ragged_prefill_attention(**{**args, "query_start_loc": args["query_start_loc"][:3]},
                                          scale=1.0)
    with pytest.raises(ValueError, match="given together"):
        dispatch.ragged_prefill_attention(**{**args, "block_tables": None}, scale=1.0)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        dispatch.ragged_prefill_attention(**args, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        ragged_prefill.ragged_prefill_attention(**args, scale=1.0, block_q=24, launch=INTERPRET)
    dec = decode_case(1, dtype=jnp.float32, kv_heads=2, group=1, head_dim=64)
    with pytest.raises(ValueError, match="lengths has"):
        dispatch.paged_decode_attention(**{**dec, "lengths": dec["lengths"][:2]}, scale=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        dispatch.paged_decode_attention(**{**dec, "q": dec["q"][..., :32]}, scale=1.0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        dispatch.paged_decode_attention(**dec, scale=-1.0)
    with pytest.raises(ValueError, match="slot_mapping has"):
        dispatch.write_kv_pages(dec["k_pages"], dec["v_pages"], dec["q"][:3, :2],
                                dec["q"][:3, :2], jnp.zeros(2, jnp.int32))


# ----------------------------------------------------------------------------- shard_map over tp
# Local shards: kv heads (and the query heads that share them) split over `tp`, metadata
# replicated. The interpreted kernels run with check_vma=False: JAX 0.10's Pallas HLO
# interpreter mixes varying and invariant values inside its grid loop and fails the vma check.
# The Triton path is checked with check_vma=True by lowering it for CUDA below.
HEADS, REPLICATED, PAGES = P(None, "tp", None), P(), P("tp")
PREFILL_SPECS = dict(q=HEADS, k=HEADS, v=HEADS, query_start_loc=REPLICATED,
                     context_lens=REPLICATED, k_pages=PAGES, v_pages=PAGES, block_tables=REPLICATED)
DECODE_SPECS = dict(q=HEADS, k_pages=PAGES, v_pages=PAGES, block_tables=REPLICATED,
                    lengths=REPLICATED)


@pytest.fixture(scope="module")
def tp_mesh():
    return Mesh(np.array(jax.devices()[:2]), ("tp",))


def _sharded(mesh, args, specs):
    return {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in args.items()}


def test_prefill_under_shard_map_over_tp(tp_mesh):
    args = prefill_case(21, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80, chunked=True)
    scale = 80 ** -0.5

    def local(kw):
        return dispatch.ragged_prefill_attention(**kw, scale=scale, sliding_window=11,
                                                 backend="pallas_interpret")

    fn = jax.jit(jax.shard_map(local, mesh=tp_mesh, in_specs=(PREFILL_SPECS,), out_specs=HEADS,
                               check_vma=False))
    out = fn(_sharded(tp_mesh, args, PREFILL_SPECS))
    assert out.sharding.is_equivalent_to(NamedSharding(tp_mesh, HEADS), out.ndim)
    assert_attention_close(out, REF_PREFILL(**args, scale=scale, sliding_window=11), dtype=jnp.float32,
                           head_dim=80, keys=prefill_keys(args, 11), what="under shard_map vs the jnp reference")


def test_decode_under_shard_map_over_tp(tp_mesh):
    args = decode_case(22, dtype=jnp.float32, kv_heads=2, group=4, head_dim=80)
    scale = 80 ** -0.5

    def local(kw):
        return dispatch.paged_decode_attention(**kw, scale=scale, sliding_window=10,
                                               backend="pallas_interpret")

    fn = jax.jit(jax.shard_map(local, mesh=tp_mesh, in_specs=(DECODE_SPECS,), out_specs=HEADS,
                               check_vma=False))
    out = fn(_sharded(tp_mesh, args, DECODE_SPECS))
    assert_attention_close(out, REF_DECODE(**args, scale=scale, sliding_window=10), dtype=jnp.float32,
                           head_dim=80, keys=decode_keys(args, 10), what="under shard_map vs the jnp reference")


@pytest.mark.parametrize("dtype,head_dim", [(jnp.bfloat16, 80), (jnp.float32, 128)])
def test_triton_lowering_under_shard_map(tp_mesh, dtype, head_dim):
    """The GPU kernels lower to Triton (power-of-two tiles, supported ops) under
    shard_map(check_vma=True); lowering for CUDA needs no GPU."""
    triton_call = "__gpu$xla.gpu.triton"
    pre = prefill_case(23, dtype=dtype, kv_heads=2, group=4, head_dim=head_dim, chunked=True)
    dec = decode_case(24, dtype=dtype, kv_heads=2, group=4, head_dim=head_dim)
    prefill = lambda kw: ragged_prefill.ragged_prefill_attention(**kw, scale=0.1, sliding_window=9)
    decode = lambda kw: paged_decode.paged_decode_attention(**kw, scale=0.1)
    for fn, args, specs in ((prefill, pre, PREFILL_SPECS), (decode, dec, DECODE_SPECS)):
        mapped = jax.jit(jax.shard_map(fn, mesh=tp_mesh, in_specs=(specs,), out_specs=HEADS))
        text = mapped.trace(args).lower(lowering_platforms=("cuda",)).as_text()
        assert triton_call in text

"""Kernel isolation and the index contract, on every backend (reference, xla, native C++, Pallas
interpret mode):
- NaN/Inf in cache slots a query does not attend (past each sequence's length, other pages, page 0)
  and in another sequence's tokens of the same batch never reach its output;
- outside `jit`, out-of-range index values raise ValueError naming the array and entry; under
  `jit` every backend clamps (or drops, for writes) the same way;
- zero-size shapes and non-arrays are refused up front; numpy inputs work.

The Pallas kernels are called with the static arguments of the rows in test_pallas_attention.py,
so they reuse those compiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_native, dispatch, paged_decode, ragged_prefill, reference, xla_decode
from tests.pallas_kernels.test_pallas_attention import (INTERPRET, NUM_PAGES, PAGE_SIZE, decode_case, np_decode,
                                                        np_inputs, np_prefill, prefill_case, rel_err)

HD, KVH, GROUP = 80, 2, 4  # the shapes of the Pallas rows reused here
SCALE = HD ** -0.5
DECODE_WINDOW, PREFILL_WINDOW = 10, 11
BAD = (np.nan, np.inf, -np.inf)


def _poison(rng, pages, bt, lengths):
    """Every slot no sequence owns (page 0, pages of nobody, slots past a length) set to NaN/+Inf/-Inf."""
    pages = np.array(pages, np.float32)
    used = np.zeros(pages.shape[1:3], bool)
    for s, n in enumerate(lengths):
        for t in range(int(n)):
            used[bt[s, t // PAGE_SIZE], t % PAGE_SIZE] = True
    free = np.argwhere(~used)
    for p, o in free:
        pages[:, p, o] = rng.choice(BAD, size=pages.shape[-1])
    return pages


def _decode(backend):
    if backend == "pallas_interpret":
        return functools.partial(paged_decode.paged_decode_attention, block_k=16, num_splits=3, launch=INTERPRET)
    if backend == "xla":
        return xla_decode.paged_decode_attention_xla
    if backend == "native":
        return cpu_native.paged_decode_attention
    return reference.paged_decode_attention_ref


def _prefill(backend):
    if backend == "pallas_interpret":
        return functools.partial(ragged_prefill.ragged_prefill_attention, block_q=16, block_k=16, launch=INTERPRET)
    return reference.ragged_prefill_attention_ref  # xla and native prefill through the reference


BACKENDS = ["reference", "xla", "native", "pallas_interpret"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_ignores_nan_and_inf_in_slots_past_each_length(backend):
    args = decode_case(11, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD)
    rng = np.random.default_rng(5)
    a = np_inputs(args)
    kp, vp = (_poison(rng, x, a["block_tables"], a["lengths"]) for x in (a["k_pages"], a["v_pages"]))
    assert np.isnan(kp).any() and np.isinf(vp).any()
    exact = np_decode(a["q"], a["k_pages"], a["v_pages"], a["block_tables"], a["lengths"], SCALE, DECODE_WINDOW)
    fn = jax.jit(functools.partial(_decode(backend), scale=SCALE, sliding_window=DECODE_WINDOW))
    out = np.asarray(fn(args["q"], jnp.asarray(kp), jnp.asarray(vp), args["block_tables"], args["lengths"]))
    assert np.isfinite(out).all(), f"{backend}: stale NaN/Inf reached the output"
    assert rel_err(out, exact) <= 2e-5


@pytest.mark.parametrize("backend", ["reference", "pallas_interpret"])
def test_prefill_isolates_other_sequences_and_stale_context(backend):
    """One sequence's chunk overflows to NaN/Inf and every unowned cache slot is poisoned: the other
    sequences' outputs are exact. (xla and native prefill run the reference.)"""
    args = prefill_case(7, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD, chunked=True)
    a = np_inputs(args)
    rng = np.random.default_rng(6)
    kp, vp = (_poison(rng, x, a["block_tables"], a["context_lens"]) for x in (a["k_pages"], a["v_pages"]))
    qsl = a["query_start_loc"]
    sizes = np.diff(qsl)
    sick = int(np.argmax(sizes))  # the longest sequence's activations overflowed
    k, v = a["k"].copy(), a["v"].copy()
    k[qsl[sick]:qsl[sick + 1], :, ::3] = np.inf
    v[qsl[sick]:qsl[sick + 1], :, 1::4] = np.nan
    v[qsl[-1]:] = np.nan  # and the padding tail
    exact = np_prefill(a["q"], a["k"], a["v"], qsl, a["context_lens"], a["k_pages"], a["v_pages"],
                       a["block_tables"], SCALE, PREFILL_WINDOW)
    fn = jax.jit(functools.partial(_prefill(backend), scale=SCALE, sliding_window=PREFILL_WINDOW))
    out = np.asarray(fn(args["q"], jnp.asarray(k), jnp.asarray(v), args["query_start_loc"], args["context_lens"],
                        k_pages=jnp.asarray(kp), v_pages=jnp.asarray(vp), block_tables=args["block_tables"]))
    healthy = np.ones(out.shape[0], bool)
    healthy[qsl[sick]:qsl[sick + 1]] = False
    assert np.isfinite(out[healthy]).all(), f"{backend}: another sequence's NaN/Inf leaked"
    assert rel_err(out[healthy], exact[healthy]) <= 2e-5
    assert not np.isfinite(out[qsl[sick]:qsl[sick + 1]]).all()  # the sick one does see its own values
    assert not out[qsl[-1]:].any()  # padding tokens get zeros


# ----------------------------------------------------------------------------- index contract under jit
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_clamps_out_of_range_indices_the_same_way(backend):
    args = decode_case(11, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD)
    bt, lengths = np.array(args["block_tables"]), np.array(args["lengths"])
    capacity = bt.shape[1] * PAGE_SIZE
    bt[0, 0], bt[1, -1], bt[2, 1] = -3, NUM_PAGES + 5, 10**6
    lengths[0], lengths[1] = -4, capacity + 9
    clamped = dict(args, block_tables=jnp.asarray(np.clip(bt, 0, NUM_PAGES - 1)),
                   lengths=jnp.asarray(np.clip(lengths, 0, capacity)))
    want = reference.paged_decode_attention_ref(**clamped, scale=SCALE, sliding_window=DECODE_WINDOW)
    fn = jax.jit(functools.partial(_decode(backend), scale=SCALE, sliding_window=DECODE_WINDOW))
    got = fn(args["q"], args["k_pages"], args["v_pages"], jnp.asarray(bt), jnp.asarray(lengths))
    assert rel_err(got, want) <= 2e-5
    assert not np.asarray(got)[0].any(), "a negative length is an empty slot"


@pytest.mark.parametrize("backend", ["reference", "pallas_interpret"])
def test_prefill_clamps_out_of_range_indices_the_same_way(backend):
    args = prefill_case(7, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD, chunked=True)
    num_tokens = args["q"].shape[0]
    qsl, ctx, bt = (np.array(args[n]) for n in ("query_start_loc", "context_lens", "block_tables"))
    capacity = bt.shape[1] * PAGE_SIZE
    bad_qsl = qsl.copy()
    bad_qsl[0], bad_qsl[2], bad_qsl[-1] = 3, bad_qsl[1] - 2, num_tokens + 50
    ctx[0], ctx[1] = -5, capacity + 30
    bt[0, 0], bt[1, 2] = -1, NUM_PAGES
    fixed_qsl = np.maximum.accumulate(np.clip(np.concatenate([[0], bad_qsl[1:]]), 0, num_tokens))
    want = reference.ragged_prefill_attention_ref(
        args["q"], args["k"], args["v"], jnp.asarray(fixed_qsl), jnp.asarray(np.clip(ctx, 0, capacity)),
        k_pages=args["k_pages"], v_pages=args["v_pages"], block_tables=jnp.asarray(np.clip(bt, 0, NUM_PAGES - 1)),
        scale=SCALE, sliding_window=PREFILL_WINDOW)
    fn = jax.jit(functools.partial(_prefill(backend), scale=SCALE, sliding_window=PREFILL_WINDOW))
    got = fn(args["q"], args["k"], args["v"], jnp.asarray(bad_qsl), jnp.asarray(ctx), k_pages=args["k_pages"],
             v_pages=args["v_pages"], block_tables=jnp.asarray(bt))
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(got, want) <= 2e-5


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_writes_outside_the_cache_are_dropped(backend):
    kp = vp = jnp.zeros((2, 3, 4, 8), jnp.float32)
    k = v = jnp.ones((4, 2, 8), jnp.float32)
    slots = jnp.array([5, -1, 12, 40], jnp.int32)
    fn = jax.jit(functools.partial(dispatch.write_kv_pages, backend=backend))
    new_k, _ = fn(kp, vp, k, v, slots)
    flat = np.asarray(new_k).reshape(2, 12, 8)
    assert flat[:, 5].all() and not np.delete(flat, 5, axis=1).any()


# ----------------------------------------------------------------------------- concrete values: ValueError
def _decode_args():
    return decode_case(11, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD)


def _with(args, name, edit):
    x = np.array(args[name])
    edit(x)
    return dict(args, **{name: x})


def _set(idx, value):
    def edit(x):
        x[idx] = value
    return edit


DECODE_BAD = [
    ("lengths", _set(0, -1), r"lengths\[0\] = -1 is outside \[0, 48\]"),
    ("lengths", _set(2, 49), r"lengths\[2\] = 49 is outside \[0, 48\]"),
    ("block_tables", _set((1, 3), NUM_PAGES), rf"block_tables\[\[1, 3\]\] = {NUM_PAGES} is outside"),
    ("block_tables", _set((0, 0), -2), r"block_tables\[\[0, 0\]\] = -2 is outside"),
]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("name,edit,message", DECODE_BAD)
def test_decode_with_concrete_bad_indices_raises(backend, name, edit, message):
    with pytest.raises(ValueError, match=message):
        dispatch.paged_decode_attention(**_with(_decode_args(), name, edit), scale=SCALE, backend=backend)


PREFILL_BAD = [
    ("query_start_loc", _set(0, 2), "query_start_loc must start at 0"),
    ("query_start_loc", _set(3, -1), "query_start_loc must be non-decreasing"),
    ("query_start_loc", _set(-1, 1000), r"query_start_loc\[4\] = 1000 is outside \[0, 48\]"),
    ("context_lens", _set(1, -1), r"context_lens\[1\] = -1 is outside"),
    ("context_lens", _set(0, 41), r"context_lens\[0\] = 41 is outside \[0, 40\]"),
    ("block_tables", _set((2, 4), -1), r"block_tables\[\[2, 4\]\] = -1 is outside"),
]


@pytest.mark.parametrize("name,edit,message", PREFILL_BAD)
def test_prefill_with_concrete_bad_indices_raises(name, edit, message):
    args = prefill_case(7, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD, chunked=True)
    with pytest.raises(ValueError, match=message):
        dispatch.ragged_prefill_attention(**_with(args, name, edit), scale=SCALE, backend="reference")


def test_other_bad_inputs_are_refused_up_front():
    plain = prefill_case(3, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD, chunked=False)
    with pytest.raises(ValueError, match="a context needs the paged cache"):
        dispatch.ragged_prefill_attention(**dict(plain, context_lens=np.array([0, 4, 0, 0], np.int32)),
                                          scale=SCALE, backend="reference")
    empty = dict(plain, q=plain["q"][:0], k=plain["k"][:0], v=plain["v"][:0],
                 query_start_loc=jnp.zeros(5, jnp.int32))
    for backend in ("reference", "pallas_interpret"):
        with pytest.raises(ValueError, match="q needs >= 1 token"):  # was a ZeroDivisionError
            dispatch.ragged_prefill_attention(**empty, scale=SCALE, backend=backend)
    dec = _decode_args()
    with pytest.raises(ValueError, match="q needs >= 1 sequence, query head"):
        dispatch.paged_decode_attention(**dict(dec, q=dec["q"][:, :0]), scale=SCALE, backend="reference")
    with pytest.raises(ValueError, match="q needs >= 1 sequence"):
        dispatch.paged_decode_attention(**dict(dec, q=dec["q"][:0], block_tables=dec["block_tables"][:0],
                                               lengths=dec["lengths"][:0]), scale=SCALE, backend="reference")
    with pytest.raises(ValueError, match="lengths must be a JAX or numpy array, got list"):
        dispatch.paged_decode_attention(**dict(dec, lengths=[1] * 6), scale=SCALE, backend="reference")
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = -3 is outside"):
        dispatch.write_kv_pages(dec["k_pages"], dec["v_pages"], dec["q"][:2, :KVH], dec["q"][:2, :KVH],
                                np.array([4, -3], np.int32), backend="native")
    with pytest.raises(ValueError, match=rf"page_ids\[0\] = {NUM_PAGES} is outside"):
        dispatch.scatter_pages(dec["k_pages"], dec["k_pages"][:, :1], np.array([NUM_PAGES], np.int32),
                               backend="reference")


@pytest.mark.parametrize("backend", ["reference", "xla", "native"])
def test_numpy_inputs_work(backend):
    dec = _decode_args()
    want = dispatch.paged_decode_attention(**dec, scale=SCALE, backend=backend)
    got = dispatch.paged_decode_attention(**np_inputs(dec), scale=SCALE, backend=backend)
    np.testing.assert_array_equal(got, want)
    pre = prefill_case(7, dtype=jnp.float32, kv_heads=KVH, group=GROUP, head_dim=HD, chunked=True)
    want = dispatch.ragged_prefill_attention(**pre, scale=SCALE, backend=backend)
    got = dispatch.ragged_prefill_attention(**np_inputs(pre), scale=SCALE, backend=backend)
    np.testing.assert_array_equal(got, want)
    a = np_inputs(dec)
    new = dispatch.write_kv_pages(a["k_pages"], a["v_pages"], a["q"][:2, :KVH], a["q"][:2, :KVH],
                                  np.array([9, 17], np.int32), backend=backend)
    assert np.asarray(new[0]).reshape(KVH, -1, HD)[:, 17].tolist() == a["q"][1, :KVH].tolist()

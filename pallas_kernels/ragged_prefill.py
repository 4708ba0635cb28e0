"""Ragged (packed, unpadded) causal prefill attention as a Pallas kernel, with paged context.

Owns the kernel `ragged_prefill_kernel`, its block schedule (`build_schedule`) and the jitted
wrapper `ragged_prefill_attention`. The numerical contract is
`reference.ragged_prefill_attention_ref`.

Work decomposition. The packed token axis is cut into *query blocks* of `block_q` rows that
never straddle two sequences: sequence s (tokens `query_start_loc[s]:query_start_loc[s+1]`)
owns `cdiv(len_s, block_q)` blocks, and the padding tail (tokens past `query_start_loc[-1]`)
owns blocks that only write zeros. The grid is `(num_blocks, num_q_heads)` with the static
bound `num_blocks = cdiv(num_tokens, block_q) + num_seqs`; unused trailing programs write
nothing. Each program runs two flash-attention loops over `block_k` keys at a time:
  1. the sequence's cached context (positions `[0, context_len)`), gathered slot by slot
     through its block table from the flattened cache `[num_kv_heads * num_pages * page_size,
     head_dim]`, so any page size works;
  2. the chunk's own keys up to the block's last query (causal), starting at the sliding
     window's left edge when a window is set.
GQA maps query head `h` to kv head `h // (num_q_heads // num_kv_heads)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import lowering, reference, validation
from pallas_kernels.lowering import MASK_VALUE, LOG2E, Launch

# Columns of the per-block schedule (`build_schedule`).
_Q0, _QEND, _SEQ_START, _CTX, _SEQ, _LIVE = range(6)
_SCHED_COLS = 8  # padded to a power of two


def build_schedule(query_start_loc: jax.Array, context_lens: jax.Array, num_tokens: int,
                   block_q: int) -> jax.Array:
    """Assigns query blocks to sequences.

    Args:
      query_start_loc: `[num_seqs + 1]` int32 token offsets.
      context_lens: `[num_seqs]` int32 cached tokens per sequence.
      num_tokens: packed token count (static).
      block_q: rows per query block (static).

    Returns:
      `[num_blocks, 8]` int32 with, per block: first row, end row (exclusive; equal to the
      first row for idle blocks), the sequence's first token, its cached context length (0
      for padding/idle), its block-table row, and 1 if the block belongs to a real sequence.
    """
    num_seqs = context_lens.shape[0]
    qsl = reference.clamp_query_start_loc(query_start_loc, num_tokens)  # the index contract
    # Segments 0..num_seqs-1 are the sequences, segment num_seqs is the padding tail.
    seg_start = qsl
    seg_end = jnp.concatenate([qsl[1:], jnp.array([num_tokens], jnp.int32)])
    seg_len = jnp.maximum(seg_end - seg_start, 0)
    seg_blocks = (seg_len + block_q - 1) // block_q
    seg_first = jnp.cumsum(seg_blocks) - seg_blocks
    num_blocks = pl.cdiv(num_tokens, block_q) + num_seqs
    blk = jnp.arange(num_blocks, dtype=jnp.int32)
    seg = jnp.searchsorted(jnp.cumsum(seg_blocks), blk, side="right").astype(jnp.int32)
    used = seg <= num_seqs
    segc = jnp.minimum(seg, num_seqs)
    q0 = seg_start[segc] + (blk - seg_first[segc]) * block_q
    q0 = jnp.where(used, q0, 0)
    qend = jnp.where(used, seg_end[segc], 0)
    live = seg < num_seqs
    seq = jnp.minimum(seg, num_seqs - 1)
    ctx = jnp.where(live, jnp.maximum(context_lens.astype(jnp.int32)[seq], 0), 0)
    zeros = jnp.zeros_like(blk)
    return jnp.stack([q0, qend, jnp.where(used, seg_start[segc], 0), ctx, seq,
                      live.astype(jnp.int32), zeros, zeros], axis=1)


def ragged_prefill_kernel(sched_ref, q_ref, k_ref, v_ref, *refs, scale: float,
                          sliding_window: int | None, group: int, head_dim: int,
                          page_size: int, num_pages: int, block_q: int, block_k: int,
                          has_context: bool):
    """One (query block, query head) program.

    Refs:
      sched_ref: `[num_blocks, 8]` int32 schedule (see `build_schedule`).
      q_ref: `[num_tokens, num_q_heads * head_dim]`.
      k_ref, v_ref: `[num_tokens, num_kv_heads * head_dim]`.
      refs: with context `block_tables_ref [num_seqs, max_blocks]`, `k_pages_ref`,
        `v_pages_ref [num_kv_heads * num_pages * page_size, head_dim]`; then (optionally the
        aliased poison input and) `o_ref [num_tokens, num_q_heads * head_dim]` last.
    """
    o_ref = refs[-1]
    blk = pl.program_id(0)
    head = pl.program_id(1)
    kv_head = lax.div(head, jnp.int32(group))
    q0 = sched_ref[blk, _Q0]
    qend = sched_ref[blk, _QEND]
    seq_start = sched_ref[blk, _SEQ_START]
    ctx = sched_ref[blk, _CTX]
    seq = sched_ref[blk, _SEQ]
    live = sched_ref[blk, _LIVE] > 0

    dp = lowering.padded_dim(head_dim)
    cols = jnp.arange(dp, dtype=jnp.int32)
    col_ok = (cols < head_dim)[None, :]
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    row_ok = rows < qend
    q_cols = head * head_dim + cols
    kv_cols = kv_head * head_dim + cols
    q = lowering.load_tile(q_ref, (rows[:, None], q_cols[None, :]), row_ok[:, None] & col_ok)
    q_pos = ctx + rows - seq_start
    scale_log2 = scale * LOG2E

    last_row = jnp.minimum(qend, q0 + block_q) - 1
    first_pos = ctx + q0 - seq_start
    carry = (jnp.zeros((block_q, dp), jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))

    if has_context:
        bt_ref, kp_ref, vp_ref = refs[:3]
        c_lo = jnp.int32(0)
        if sliding_window is not None:
            c_lo = jnp.maximum(first_pos - sliding_window + 1, 0)
        c_hi = jnp.where(live & (last_row >= q0), ctx, 0)

        def ctx_body(j, carry):
            kpos = c_lo + j * block_k + jnp.arange(block_k, dtype=jnp.int32)
            k_ok = kpos < c_hi
            kb, vb = lowering.load_paged_kv(bt_ref, kp_ref, vp_ref, seq=seq, kv_head=kv_head, kpos=kpos,
                                            k_ok=k_ok, cols=cols, col_ok=col_ok, num_pages=num_pages,
                                            page_size=page_size, dtype=q.dtype)
            mask = k_ok[None, :]
            if sliding_window is not None:
                mask &= kpos[None, :] > q_pos[:, None] - sliding_window
            return lowering.online_softmax_step(carry, q, kb, vb, mask, scale_log2)

        n_ctx = lowering.cdiv(jnp.maximum(c_hi - c_lo, 0), block_k)
        carry = lax.fori_loop(0, n_ctx, ctx_body, carry)

    t_lo = seq_start
    if sliding_window is not None:
        t_lo = jnp.maximum(seq_start, q0 - sliding_window + 1)
    t_hi = jnp.where(live, last_row + 1, t_lo)

    def chunk_body(j, carry):
        t = t_lo + j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        t_ok = t < t_hi
        tile_ok = t_ok[:, None] & col_ok
        kb = lowering.load_tile(k_ref, (t[:, None], kv_cols[None, :]), tile_ok)
        vb = lowering.load_tile(v_ref, (t[:, None], kv_cols[None, :]), tile_ok)
        k_pos = ctx + t - seq_start
        mask = t_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        return lowering.online_softmax_step(carry, q, kb.astype(q.dtype), vb.astype(q.dtype),
                                            mask, scale_log2)

    n_chunk = lowering.cdiv(jnp.maximum(t_hi - t_lo, 0), block_k)
    acc, _, l = lax.fori_loop(0, n_chunk, chunk_body, carry)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    lowering.store_tile(o_ref, (rows[:, None], q_cols[None, :]), out.astype(o_ref.dtype),
                        row_ok[:, None] & col_ok)


@functools.partial(jax.jit, static_argnames=(
    "scale", "sliding_window", "block_q", "block_k", "launch", "poison_output"))
def ragged_prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    k_pages: jax.Array | None = None,
    v_pages: jax.Array | None = None,
    block_tables: jax.Array | None = None,
    *,
    scale: float,
    sliding_window: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
    launch: Launch = Launch(),
    poison_output: bool = False,
) -> jax.Array:
    """Causal attention over a packed batch of prompt chunks (Pallas).

    Args:
      q: `[num_tokens, num_q_heads, head_dim]` packed queries; tokens past
        `query_start_loc[-1]` are padding and get zeros.
      k, v: `[num_tokens, num_kv_heads, head_dim]`.
      query_start_loc: `[num_seqs + 1]` int32 non-decreasing offsets starting at 0 (padded
        sequences repeat the last).
      context_lens: `[num_seqs]` int32 cached tokens before this chunk (0 for plain prefill).
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]` cache holding the
        earlier context, or None when no sequence has context.
      block_tables: `[num_seqs, max_blocks]` int32 page ids (with the pages).
      scale: softmax scale.
      sliding_window: optional window; query at position p sees keys in `(p - window, p]`.
      block_q, block_k: query rows / keys per tile (powers of two >= 16).
      launch: lowering and Triton launch parameters.
      poison_output: fill the output with NaN (aliased into the kernel) before the kernel
        runs, so an element the kernel fails to write shows up (tests).

    Returns:
      `[num_tokens, num_q_heads, head_dim]` in q's dtype.
    """
    validation.check_prefill(q, k, v, query_start_loc, context_lens, k_pages, v_pages,
                             block_tables, scale, sliding_window)
    lowering.check_block("block_q", block_q)
    lowering.check_block("block_k", block_k)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    has_context = k_pages is not None
    if has_context:  # the index contract: a context never reads past its block table row
        context_lens = reference.clamp_lengths(context_lens, block_tables.shape[1] * k_pages.shape[2])
    sched = build_schedule(query_start_loc, context_lens, num_tokens, block_q)
    num_blocks = sched.shape[0]

    args = [sched, q.reshape(num_tokens, num_q_heads * head_dim),
            k.reshape(num_tokens, num_kv_heads * head_dim),
            v.reshape(num_tokens, num_kv_heads * head_dim)]
    page_size = num_pages = 1
    if has_context:
        _, num_pages, page_size, _ = k_pages.shape
        args += [block_tables.astype(jnp.int32),
                 k_pages.reshape(num_kv_heads * num_pages * page_size, head_dim),
                 v_pages.reshape(num_kv_heads * num_pages * page_size, head_dim)]
    aliases = {}
    if poison_output:
        aliases = {len(args): 0}
        args.append(jnp.full((num_tokens, num_q_heads * head_dim), jnp.nan, q.dtype))
    axes = lowering.varying_axes(*args)  # non-empty inside shard_map, e.g. ("tp",)
    args = [lowering.vary(x, axes) for x in args]
    out_shape = lowering.out_struct((num_tokens, num_q_heads * head_dim), q.dtype, axes)

    kernel = functools.partial(
        ragged_prefill_kernel, scale=scale, sliding_window=sliding_window,
        group=num_q_heads // num_kv_heads, head_dim=head_dim, page_size=page_size,
        num_pages=num_pages, block_q=block_q, block_k=block_k, has_context=has_context)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_blocks, num_q_heads),
        input_output_aliases=aliases,
        name=f"ragged_prefill_bq{block_q}_bk{block_k}",
        **lowering.pallas_call_kwargs(launch),
    )(*args)
    return out.reshape(num_tokens, num_q_heads, head_dim)

"""Paged decode attention as a Pallas kernel: flash-decoding split over the context.

Owns the kernel `paged_decode_kernel`, the cross-split combine `combine_splits` and the jitted
wrapper `paged_decode_attention`. The numerical contract is
`reference.paged_decode_attention_ref`.

Work decomposition. The grid is `(num_seqs, num_kv_heads, num_splits)`. A program takes the
`group = num_q_heads // num_kv_heads` query heads that share one kv head (padded to a
power-of-two tile of >= 16 rows, so the score and value products are tensor-core matmuls and
K/V is read once per group), and the tokens `[split * split_len, (split + 1) * split_len)` of
its sequence, clipped to the sequence length and to the sliding window. It walks them
`block_k` tokens at a time, gathering each token's slot through the block table from the
flattened cache `[num_kv_heads * num_pages * page_size, head_dim]` (any page size works), and
keeps a base-2 online softmax. It writes its unnormalised float32 accumulator and its running
max and sum; `combine_splits` rescales the splits to a common max and normalises (the
numerically stable flash-decoding combine). Empty splits and empty slots (length 0) write
`acc = 0, l = 0`, so they weigh nothing and an empty slot comes out as zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import lowering, validation
from pallas_kernels.lowering import MASK_VALUE, LOG2E, Launch


def paged_decode_kernel(lengths_ref, bt_ref, q_ref, kp_ref, vp_ref, *refs, scale: float,
                        sliding_window: int | None, group: int, head_dim: int,
                        page_size: int, num_pages: int, split_len: int, block_k: int,
                        group_rows: int):
    """One (sequence, kv head, context split) program.

    Refs:
      lengths_ref: `[num_seqs]` int32.
      bt_ref: `[num_seqs, max_blocks]` int32 page ids.
      q_ref: `[num_seqs, num_q_heads * head_dim]`.
      kp_ref, vp_ref: `[num_kv_heads * num_pages * page_size, head_dim]`.
      refs: (optionally three aliased poison inputs, then) the outputs
        `acc_ref [num_seqs, num_kv_heads, num_splits, group_rows, dp]` f32,
        `m_ref`, `l_ref [num_seqs, num_kv_heads, num_splits, group_rows]` f32.
    """
    acc_ref, m_ref, l_ref = refs[-3:]
    seq = pl.program_id(0)
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    length = jnp.clip(lengths_ref[seq], 0, bt_ref.shape[1] * page_size)

    dp = lowering.padded_dim(head_dim)
    cols = jnp.arange(dp, dtype=jnp.int32)
    col_ok = (cols < head_dim)[None, :]
    g = jnp.arange(group_rows, dtype=jnp.int32)
    g_ok = (g < group)[:, None]
    q_cols = (kv_head * group + g)[:, None] * head_dim + cols[None, :]
    q = lowering.load_tile(q_ref, (seq, q_cols), g_ok & col_ok)

    lo = split * split_len
    hi = jnp.minimum(lo + split_len, length)
    if sliding_window is not None:
        # The newest token is at position length - 1; it sees (length - 1 - window, length - 1].
        lo = jnp.maximum(lo, length - sliding_window)
    scale_log2 = scale * LOG2E

    def body(j, carry):
        kpos = lo + j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        k_ok = kpos < hi
        kb, vb = lowering.load_paged_kv(bt_ref, kp_ref, vp_ref, seq=seq, kv_head=kv_head, kpos=kpos,
                                        k_ok=k_ok, cols=cols, col_ok=col_ok, num_pages=num_pages,
                                        page_size=page_size, dtype=q.dtype)
        return lowering.online_softmax_step(carry, q, kb, vb, k_ok[None, :], scale_log2)

    carry = (jnp.zeros((group_rows, dp), jnp.float32),
             jnp.full((group_rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((group_rows,), jnp.float32))
    n_blocks = lowering.cdiv(jnp.maximum(hi - lo, 0), block_k)
    acc, m, l = lax.fori_loop(0, n_blocks, body, carry)
    acc_ref[seq, kv_head, split, :, :] = acc
    m_ref[seq, kv_head, split, :] = m
    l_ref[seq, kv_head, split, :] = l


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges per-split partial softmaxes (base 2) into normalised outputs.

    Args:
      acc: `[..., num_splits, rows, dp]` unnormalised float32 accumulators.
      m, l: `[..., num_splits, rows]` running max (base-2 logits) and sum.

    Returns:
      `[..., rows, dp]` float32; rows whose splits are all empty get zeros.
    """
    m_max = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_max)  # <= 1; empty splits have l == 0 and acc == 0 whatever w is
    l_tot = jnp.sum(w * l, axis=-2)
    out = jnp.sum(w[..., None] * acc, axis=-3)
    return out / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, *,
                       target_programs: int = 512, min_split_tokens: int = 256) -> int:
    """Splits enough to give the GPU ~`target_programs` programs, never under
    `min_split_tokens` tokens per split."""
    by_occupancy = pl.cdiv(target_programs, max(1, num_seqs * num_kv_heads))
    by_length = max(1, pl.cdiv(max_context, min_split_tokens))
    return max(1, min(by_occupancy, by_length))


@functools.partial(jax.jit, static_argnames=(
    "scale", "sliding_window", "block_k", "num_splits", "launch", "poison_output"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    block_k: int = 64,
    num_splits: int | None = None,
    launch: Launch = Launch(),
    poison_output: bool = False,
) -> jax.Array:
    """One query token per sequence against its paged K/V (Pallas, flash-decoding).

    Args:
      q: `[num_seqs, num_q_heads, head_dim]`.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      lengths: `[num_seqs]` int32 cached tokens per sequence, newest included; 0 = empty slot.
      scale: softmax scale.
      sliding_window: optional window size.
      block_k: tokens per tile (power of two >= 16).
      num_splits: context splits per sequence (None: `default_num_splits`).
      launch: lowering and Triton launch parameters.
      poison_output: NaN-fill the partial-result buffers (aliased into the kernel) so a
        program that fails to write its split shows up as NaN in the output (tests).

    Returns:
      `[num_seqs, num_q_heads, head_dim]` in q's dtype; empty slots get zeros.
    """
    validation.check_decode(q, k_pages, v_pages, block_tables, lengths, scale, sliding_window)
    lowering.check_block("block_k", block_k)
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_context = block_tables.shape[1] * page_size
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_context)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split_len = pl.cdiv(pl.cdiv(max_context, num_splits), block_k) * block_k
    group_rows = lowering.padded_dim(group)
    dp = lowering.padded_dim(head_dim)

    flat = (num_kv_heads * num_pages * page_size, head_dim)
    args = [lengths.astype(jnp.int32), block_tables.astype(jnp.int32),
            q.reshape(num_seqs, num_q_heads * head_dim), k_pages.reshape(flat),
            v_pages.reshape(flat)]
    part = (num_seqs, num_kv_heads, num_splits, group_rows)
    aliases = {}
    if poison_output:
        aliases = {len(args) + i: i for i in range(3)}
        args += [jnp.full(shape, jnp.nan, jnp.float32) for shape in ((*part, dp), part, part)]
    axes = lowering.varying_axes(*args)  # non-empty inside shard_map, e.g. ("tp",)
    args = [lowering.vary(x, axes) for x in args]
    out_shape = tuple(lowering.out_struct(shape, jnp.float32, axes)
                      for shape in ((*part, dp), part, part))

    kernel = functools.partial(
        paged_decode_kernel, scale=scale, sliding_window=sliding_window, group=group,
        head_dim=head_dim, page_size=page_size, num_pages=num_pages, split_len=split_len,
        block_k=block_k, group_rows=group_rows)
    acc, m, l = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_seqs, num_kv_heads, num_splits),
        input_output_aliases=aliases,
        name=f"paged_decode_bk{block_k}_splits{num_splits}",
        **lowering.pallas_call_kwargs(launch),
    )(*args)
    out = combine_splits(acc, m, l)[:, :, :group, :head_dim]
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)

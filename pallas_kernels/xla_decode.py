"""Paged decode attention written for XLA on CPU: a scan over block-table columns with an online softmax.

The reference (`reference.paged_decode_attention_ref`) gathers every sequence's whole context
into one `[kv_heads, num_seqs, max_blocks * page_size, head_dim]` copy before attending; XLA's
CPU gather does that slowly and the copy doubles the bytes moved. Here each scan step gathers one
page per sequence (`[kv_heads, num_seqs, page_size, head_dim]`, contiguous pages) and folds it
into a running max / sum / accumulator, flash-decoding style, so the cache is read once and
nothing the size of the context is materialised. Same semantics as the reference (tested
against it), including its isolation (slots past a sequence's length are selected away, so stale
NaN/Inf in a page never reaches the output) and its index contract (page ids and lengths
clamped); this is the `xla` backend of `dispatch.py` and the CPU fallback of `native`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import clamp_lengths, clamp_page_ids

_MASK = -1e30


def paged_decode_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                               lengths: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    """One query token per sequence against its paged K/V.

    Args:
      q: `[num_seqs, num_q_heads, head_dim]`.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      lengths: `[num_seqs]` int32 tokens in the cache, the newest included; 0 = empty slot.
    Returns:
      `[num_seqs, num_q_heads, head_dim]`; empty slots get zeros.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim) * scale
    block_tables = clamp_page_ids(block_tables, k_pages.shape[1])
    lengths = clamp_lengths(lengths, block_tables.shape[1] * page_size)
    offsets = jnp.arange(page_size, dtype=jnp.int32)

    def step(carry, j):
        m, l, acc = carry
        ids = block_tables[:, j]
        k = k_pages[:, ids].astype(jnp.float32)  # [kv_heads, num_seqs, page_size, head_dim]
        v = v_pages[:, ids].astype(jnp.float32)
        s = jnp.einsum("bhgd,hbpd->bhgp", qf, k)
        pos = j * page_size + offsets
        mask = pos[None, :] < lengths[:, None]
        if sliding_window is not None:
            mask &= pos[None, :] > lengths[:, None] - 1 - sliding_window
        v = jnp.where(mask[None, :, :, None], v, 0.0)  # selected: never 0 * a stale NaN
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bhgp,hbpd->bhgd", p, v)
        return (m_new, l, acc), None

    shape = (num_seqs, num_kv_heads, group)
    init = (jnp.full(shape, _MASK, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, jnp.arange(block_tables.shape[1]))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)

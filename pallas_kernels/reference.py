"""Pure-jnp reference attention for serving: ragged prefill and paged decode.

These functions define the numerical contract every kernel in `pallas_kernels/` is tested
against, and they are the `reference` backend of the dispatcher (`dispatch.py`).

Cache layout (shared by the runtime and every kernel): one K and one V array per layer,
`[num_kv_heads, num_pages, page_size, head_dim]`. Page 0 is never handed to a request: padded
tokens write there and padded sequences read nothing.

Sliding window (Mistral): a query at position p attends to keys at positions k with
`p - window < k <= p`.

Isolation: a query's output depends only on the keys and values it attends. Masked entries
(slots past a sequence's length, other sequences' tokens, padding, stale data in a page) are
*selected* away (`jnp.where`), never multiplied by a zero probability, so a NaN or Inf left in one
of them (by a request whose activations overflowed, or in a freed page) cannot reach another
request's output (0 * NaN would be NaN). Freed pages are therefore not scrubbed: every reader
masks by its own lengths, on every backend, which is what the isolation tests check.

Index contract. Outside `jit` the dispatcher (`dispatch.py`) checks the index arrays' values and
raises ValueError. Inside `jit` they cannot be checked, and every backend treats out-of-range
values the same way (the `clamp_*` functions here; the Pallas kernels and the C++ kernels do the same):
page ids are clamped into `[0, num_pages - 1]`; decode lengths and context lengths into
`[0, max_blocks * page_size]` (the block table's capacity); `query_start_loc` into
`[0, num_tokens]`, made non-decreasing, with its first entry taken as 0; KV writes to slots
outside `[0, num_pages * page_size)` and page scatters to ids outside `[0, num_pages)` are dropped.
The results are then wrong but the same on every backend, and nothing outside the arrays is read
or written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK = -1e30
_QUERY_BLOCK = 128  # query tokens attended together by the ragged prefill reference


def clamp_page_ids(block_tables: jax.Array, num_pages: int) -> jax.Array:
    """Page ids clamped into `[0, num_pages - 1]` (the index contract)."""
    return jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1)


def clamp_query_start_loc(query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """`query_start_loc` clamped into `[0, num_tokens]`, non-decreasing, starting at 0 (the index contract)."""
    qsl = jnp.clip(query_start_loc.astype(jnp.int32), 0, num_tokens)
    return jax.lax.cummax(qsl.at[0].set(0))


def clamp_lengths(lengths: jax.Array, capacity: int) -> jax.Array:
    """Lengths clamped into `[0, capacity]` (the index contract; capacity = max_blocks * page_size)."""
    return jnp.clip(lengths.astype(jnp.int32), 0, capacity)


def _window_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Causal (and optional sliding-window) mask of shape q_pos.shape + k_pos.shape[-1:]."""
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def ragged_prefill_attention_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    *,
    k_pages: jax.Array | None = None,
    v_pages: jax.Array | None = None,
    block_tables: jax.Array | None = None,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention over a packed batch of prompt chunks.

    Args:
      q: `[num_tokens, num_q_heads, head_dim]` queries of all sequences, packed; tokens past
        `query_start_loc[-1]` are padding.
      k, v: `[num_tokens, num_kv_heads, head_dim]` keys/values of the same tokens.
      query_start_loc: `[num_seqs + 1]` int32 offsets of each sequence's tokens in `q`;
        padded sequences repeat the last offset (zero tokens).
      context_lens: `[num_seqs]` int32 tokens of each sequence already in the paged cache
        before this chunk (0 for a plain prefill). Query i of sequence s has position
        `context_lens[s] + i`.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]` paged cache holding the
        earlier context; required when any context length is > 0.
      block_tables: `[num_seqs, max_blocks]` int32 page ids of each sequence.
      scale: softmax scale.
      sliding_window: optional window size.

    Returns:
      `[num_tokens, num_q_heads, head_dim]`; padding tokens get zeros.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    query_start_loc = clamp_query_start_loc(query_start_loc, num_tokens)
    if k_pages is not None:
        context_lens = clamp_lengths(context_lens, block_tables.shape[1] * k_pages.shape[2])
        block_tables = clamp_page_ids(block_tables, k_pages.shape[1])
    else:
        context_lens = jnp.maximum(context_lens.astype(jnp.int32), 0)

    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # Sequence id of every token (num_seqs for padding tokens).
    seq_id = jnp.searchsorted(query_start_loc[1:], tok, side="right").astype(jnp.int32)
    valid = tok < query_start_loc[-1]
    seq_c = jnp.minimum(seq_id, num_seqs - 1)
    ctx = jnp.where(valid, context_lens[seq_c], 0)
    pos = ctx + tok - query_start_loc[seq_c]

    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    # The chunk's values are shared by every query block, so masking them per query would cost a
    # [block, tokens, heads, head_dim] copy: non-finite values are zeroed instead, and a query that
    # attends one of them is set to NaN at the end (what multiplying would have given it).
    v_bad = ~jnp.all(jnp.isfinite(vf), axis=-1)  # [num_tokens, kv_heads]
    vf = jnp.where(v_bad[..., None], 0.0, vf)
    if k_pages is not None:
        # Each sequence's cached context, gathered once: [kv_heads, num_seqs, C, head_dim].
        page_size, max_blocks = k_pages.shape[2], block_tables.shape[1]
        c = max_blocks * page_size
        kc = k_pages[:, block_tables].reshape(num_kv_heads, num_seqs, c, head_dim).astype(jnp.float32)
        vc = v_pages[:, block_tables].reshape(num_kv_heads, num_seqs, c, head_dim).astype(jnp.float32)
        cpos = jnp.arange(c, dtype=jnp.int32)

    def attend(qb, posb, seqb, ctxb, validb):
        """Queries `[B, Hq, D]` of one block of tokens against the chunk (and their contexts)."""
        qg = qb.astype(jnp.float32).reshape(-1, num_kv_heads, group, head_dim)
        same = (seqb[:, None] == seq_id[None, :]) & validb[:, None] & valid[None, :]
        mask = same & _window_mask(posb[:, None], pos[None, :], sliding_window)
        s = jnp.where(mask[None, None], jnp.einsum("qhgd,khd->hgqk", qg, kf) * scale, _MASK)
        if k_pages is not None:
            kcb, vcb = kc[:, jnp.minimum(seqb, num_seqs - 1)], vc[:, jnp.minimum(seqb, num_seqs - 1)]
            mask_c = (cpos[None, :] < ctxb[:, None]) & validb[:, None]
            mask_c &= _window_mask(posb[:, None], cpos[None, :], sliding_window)
            s_c = jnp.where(mask_c[None, None], jnp.einsum("qhgd,hqcd->hgqc", qg, kcb) * scale, _MASK)
            s = jnp.concatenate([s, s_c], axis=-1)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(m <= _MASK / 2, 0.0, jnp.exp(s - m))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom == 0, 1.0, denom)
        out = jnp.einsum("hgqk,khd->qhgd", p[..., :num_tokens], vf)
        sees_bad = jnp.einsum("qk,kh->qh", mask.astype(jnp.float32), v_bad.astype(jnp.float32)) > 0
        if k_pages is not None:
            # Per query, so selected: slots past the context (stale pages) never reach the output.
            vcb = jnp.where(mask_c[None, :, :, None], vcb, 0.0)
            out = out + jnp.einsum("hgqc,hqcd->qhgd", p[..., num_tokens:], vcb)
        out = jnp.where(sees_bad[:, :, None, None], jnp.nan, out)
        return out.reshape(-1, num_q_heads, head_dim)

    # Query tokens in blocks, so the per-token context never materialises for the whole batch.
    if num_tokens == 0:
        return jnp.zeros_like(q)
    block = min(num_tokens, _QUERY_BLOCK)
    if num_tokens % block:
        block = num_tokens
    nb = num_tokens // block
    split = lambda x: x.reshape((nb, block) + x.shape[1:])  # noqa: E731
    out = jax.lax.map(lambda xs: attend(*xs), (split(q), split(pos), split(seq_id), split(ctx), split(valid)))
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def paged_decode_attention_ref(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """One query token per sequence against its paged K/V.

    Args:
      q: `[num_seqs, num_q_heads, head_dim]`, the query of each sequence's newest token.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      lengths: `[num_seqs]` int32 tokens in the cache for each sequence, the newest token
        included (its K/V already written); 0 marks an empty slot.
      scale: softmax scale.
      sliding_window: optional window size.

    Returns:
      `[num_seqs, num_q_heads, head_dim]`; empty slots get zeros.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    ctx = max_blocks * page_size
    block_tables = clamp_page_ids(block_tables, k_pages.shape[1])
    lengths = clamp_lengths(lengths, ctx)

    k = k_pages[:, block_tables].reshape(num_kv_heads, num_seqs, ctx, head_dim)
    v = v_pages[:, block_tables].reshape(num_kv_heads, num_seqs, ctx, head_dim)
    qf = q.astype(jnp.float32).reshape(num_seqs, num_kv_heads, group, head_dim)
    s = jnp.einsum("bhgd,hbcd->bhgc", qf, k.astype(jnp.float32)) * scale
    cpos = jnp.arange(ctx, dtype=jnp.int32)
    pos = lengths - 1
    mask = _window_mask(pos[:, None], cpos[None, :], sliding_window) & (cpos[None, :] < lengths[:, None])
    s = jnp.where(mask[:, None, None, :], s, _MASK)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(m <= _MASK / 2, 0.0, jnp.exp(s - m))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    v = jnp.where(mask[None, :, :, None], v.astype(jnp.float32), 0.0)  # selected, never 0 * stale
    out = jnp.einsum("bhgc,hbcd->bhgd", p, v)
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(q.dtype)


def write_kv_pages_ref(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write new K/V into pages with an in-place scatter (donate the pages to avoid a copy).

    Args:
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      k, v: `[num_tokens, num_kv_heads, head_dim]` new keys/values.
      slot_mapping: `[num_tokens]` int32 flat slot `page * page_size + offset` of every token;
        padding tokens point into page 0.
    Returns:
      The updated `(k_pages, v_pages)`.
    """
    h, n, ps, d = k_pages.shape
    slots = _drop_outside(slot_mapping, n * ps)
    kf = k_pages.reshape(h, n * ps, d).at[:, slots].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop")
    vf = v_pages.reshape(h, n * ps, d).at[:, slots].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop")
    return kf.reshape(h, n, ps, d), vf.reshape(h, n, ps, d)


def _drop_outside(idx: jax.Array, size: int) -> jax.Array:
    """`idx` with entries outside `[0, size)` moved to `size` (dropped by a `mode="drop"` scatter;
    JAX would otherwise wrap negative ones around)."""
    idx = idx.astype(jnp.int32)
    return jnp.where((idx >= 0) & (idx < size), idx, size)


def gather_pages_ref(pages: jax.Array, page_ids: jax.Array) -> jax.Array:
    """Whole pages by id: `[num_kv_heads, num_pages, page_size, head_dim]` pages, `[n]` ids ->
    `[num_kv_heads, n, page_size, head_dim]` (ids clamped into `[0, num_pages - 1]`)."""
    return pages[:, clamp_page_ids(page_ids, pages.shape[1])]


def scatter_pages_ref(pages: jax.Array, blocks: jax.Array, page_ids: jax.Array) -> jax.Array:
    """`pages` with `blocks` `[num_kv_heads, n, page_size, head_dim]` written at pages `page_ids`
    (in place when the pages are donated). Which block lands on a repeated id is unspecified; ids
    outside `[0, num_pages)` are dropped."""
    return pages.at[:, _drop_outside(page_ids, pages.shape[1])].set(blocks.astype(pages.dtype), mode="drop")

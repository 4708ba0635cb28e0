"""The attention call site every model layer goes through, and the ragged-batch metadata it takes.

A step packs the new tokens of several sequences into one flat batch. `AttentionMetadata` says
where each token sits (its position, its KV slot), where each sequence's tokens start, how long
each sequence is and which pages hold it. The model never looks inside: it hands q/k/v and its
layer's KV pages to `paged_attention`, which writes the new K/V into the pages and attends.

Modes (static, part of the pytree structure so each compiles once):
  - ``prefill``: every sequence starts at position 0; attend within the chunk only.
  - ``decode``: one token per sequence; attend over its pages.
  - ``mixed``: chunks that continue a sequence already in the cache (chunked prefill, mixed
    with decodes); attend over the pages plus the chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from pallas_kernels import dispatch

MODES = ("prefill", "decode", "mixed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Ragged batch description for one step.

    Attributes:
      positions: `[num_tokens]` int32 position of each token in its sequence (padding: 0).
      slot_mapping: `[num_tokens]` int32 flat KV slot (`page * page_size + offset`); padding
        tokens point into page 0.
      query_start_loc: `[num_seqs + 1]` int32 offsets of each sequence's tokens.
      context_lens: `[num_seqs]` int32 tokens already in the cache before this step.
      seq_lens: `[num_seqs]` int32 tokens in the cache after this step (0 for padded rows).
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      logits_indices: `[num_logit_rows]` int32 index of each sequence's last token in the batch (rows
        past the last sequence are padding: the runner rounds the row count up to a bucket).
      mode: one of `MODES` (static).
    """

    positions: jax.Array
    slot_mapping: jax.Array
    query_start_loc: jax.Array
    context_lens: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
    logits_indices: jax.Array
    mode: str = dataclasses.field(default="prefill", metadata=dict(static=True))


KVPages = tuple[jax.Array, jax.Array]
# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], pages, meta) -> (out [T, Hq, D], new pages)
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, KVPages, AttentionMetadata],
                       tuple[jax.Array, KVPages]]


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, pages: KVPages, meta: AttentionMetadata,
                    *, scale: float, sliding_window: int | None, backend: str | None = None
                    ) -> tuple[jax.Array, KVPages]:
    """Writes this step's K/V into `pages` and attends for every query token.

    Args:
      q: `[num_tokens, num_q_heads, head_dim]`.
      k, v: `[num_tokens, num_kv_heads, head_dim]`.
      pages: `(k_pages, v_pages)`, each `[num_kv_heads, num_pages, page_size, head_dim]`.
    Returns:
      `([num_tokens, num_q_heads, head_dim], updated pages)`.
    """
    k_pages, v_pages = dispatch.write_kv_pages(pages[0], pages[1], k, v, meta.slot_mapping, backend=backend)
    if meta.mode == "decode":
        out = dispatch.paged_decode_attention(q, k_pages, v_pages, meta.block_tables, meta.seq_lens,
                                              scale=scale, sliding_window=sliding_window, backend=backend)
    elif meta.mode == "prefill":
        out = dispatch.ragged_prefill_attention(q, k, v, meta.query_start_loc, meta.context_lens,
                                                scale=scale, sliding_window=sliding_window, backend=backend)
    elif meta.mode == "mixed":
        out = dispatch.ragged_prefill_attention(q, k, v, meta.query_start_loc, meta.context_lens,
                                                k_pages=k_pages, v_pages=v_pages,
                                                block_tables=meta.block_tables, scale=scale,
                                                sliding_window=sliding_window, backend=backend)
    else:
        raise ValueError(f"unknown attention mode {meta.mode!r}; expected one of {MODES}")
    return out, (k_pages, v_pages)

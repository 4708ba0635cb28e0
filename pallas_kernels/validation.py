"""Argument checks shared by every attention backend, so bad inputs fail the same clear way.

Static properties (array-ness, ranks, non-empty shapes, dtypes, Python scalars) are always
checked. The values inside `query_start_loc`, `context_lens`, `lengths`, `block_tables`,
`slot_mapping` and `page_ids` are checked too when they are concrete (numpy arrays, or JAX arrays
outside `jit`): out-of-range values raise ValueError. Under `jit` they are tracers and cannot be
checked; then the index contract of `reference.py` says what every backend does with them.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _rank(name: str, x, rank: int) -> None:
    if x is None:
        raise ValueError(f"{name} is required")
    if not hasattr(x, "ndim") or not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise ValueError(f"{name} must be a JAX or numpy array, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def _integer(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")


def _floating(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def static_scale_and_window(scale, sliding_window) -> tuple[float, int | None]:
    """Checks the static softmax scale and window and returns them as `(float, int | None)`.

    Both must be concrete numbers (they select the compiled kernel), not traced arrays.
    """
    if isinstance(scale, jax.Array) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a static real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    if sliding_window is not None:
        if (isinstance(sliding_window, (bool, jax.Array))
                or not isinstance(sliding_window, numbers.Integral)):
            raise ValueError(f"sliding_window must be a static int or None, got {sliding_window!r}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        sliding_window = int(sliding_window)
    return float(scale), sliding_window


def check_scale_and_window(scale, sliding_window) -> None:
    static_scale_and_window(scale, sliding_window)


def check_pages(k_pages, v_pages, num_kv_heads: int, head_dim: int) -> None:
    """Checks `[num_kv_heads, num_pages, page_size, head_dim]` K/V page arrays."""
    _rank("k_pages", k_pages, 4)
    _rank("v_pages", v_pages, 4)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} differ")
    _floating("k_pages", k_pages)
    _floating("v_pages", v_pages)
    if k_pages.shape[0] != num_kv_heads:
        raise ValueError(f"pages have {k_pages.shape[0]} kv heads, expected {num_kv_heads}")
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"pages have head_dim {k_pages.shape[3]}, expected {head_dim}")
    if k_pages.shape[1] < 1 or k_pages.shape[2] < 1:
        raise ValueError(f"pages need >= 1 page of >= 1 slot, got shape {tuple(k_pages.shape)}")


def check_block_tables(block_tables, num_seqs: int) -> None:
    _rank("block_tables", block_tables, 2)
    _integer("block_tables", block_tables)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected num_seqs={num_seqs}")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables needs at least one column")


def check_prefill(q, k, v, query_start_loc, context_lens, k_pages, v_pages, block_tables,
                  scale: float, sliding_window: int | None) -> None:
    """Checks the arguments of `ragged_prefill_attention` (see `reference.py` for shapes)."""
    _rank("q", q, 3)
    _rank("k", k, 3)
    _rank("v", v, 3)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _floating(name, x)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens < 1 or num_q_heads < 1 or head_dim < 1:
        raise ValueError(f"q needs >= 1 token, query head and head_dim, got shape {tuple(q.shape)}")
    if k.shape[0] != num_tokens:
        raise ValueError(f"k has {k.shape[0]} tokens, q has {num_tokens}")
    if k.shape[2] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[2]}, q has {head_dim}")
    if k.shape[1] < 1 or num_q_heads % k.shape[1]:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={k.shape[1]}")
    _rank("context_lens", context_lens, 1)
    _rank("query_start_loc", query_start_loc, 1)
    _integer("context_lens", context_lens)
    _integer("query_start_loc", query_start_loc)
    num_seqs = context_lens.shape[0]
    if num_seqs < 1:
        raise ValueError("need at least one sequence (context_lens is empty)")
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries, "
                         f"expected num_seqs + 1 = {num_seqs + 1}")
    given = [x is not None for x in (k_pages, v_pages, block_tables)]
    if any(given) and not all(given):
        raise ValueError("k_pages, v_pages and block_tables must be given together (paged context)")
    if all(given):
        check_pages(k_pages, v_pages, k.shape[1], head_dim)
        check_block_tables(block_tables, num_seqs)
    check_scale_and_window(scale, sliding_window)


def check_decode(q, k_pages, v_pages, block_tables, lengths, scale: float,
                 sliding_window: int | None) -> None:
    """Checks the arguments of `paged_decode_attention` (see `reference.py` for shapes)."""
    _rank("q", q, 3)
    _floating("q", q)
    num_seqs, num_q_heads, head_dim = q.shape
    if num_seqs < 1 or num_q_heads < 1 or head_dim < 1:
        raise ValueError(f"q needs >= 1 sequence, query head and head_dim, got shape {tuple(q.shape)}")
    if k_pages is None or v_pages is None:
        raise ValueError("k_pages and v_pages are required")
    _rank("k_pages", k_pages, 4)
    num_kv_heads = k_pages.shape[0]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    check_pages(k_pages, v_pages, num_kv_heads, head_dim)
    check_block_tables(block_tables, num_seqs)
    _rank("lengths", lengths, 1)
    _integer("lengths", lengths)
    if lengths.shape[0] != num_seqs:
        raise ValueError(f"lengths has {lengths.shape[0]} entries, expected num_seqs={num_seqs}")
    check_scale_and_window(scale, sliding_window)


def check_write(k_pages, v_pages, k, v, slot_mapping) -> None:
    """Checks the arguments of `write_kv_pages`."""
    _rank("k", k, 3)
    _rank("v", v, 3)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    check_pages(k_pages, v_pages, k.shape[1], k.shape[2])
    _rank("slot_mapping", slot_mapping, 1)
    _integer("slot_mapping", slot_mapping)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries, k has {k.shape[0]} tokens")


def check_page_blocks(pages, page_ids, blocks=None) -> None:
    """Checks the arguments of `gather_pages` / `scatter_pages`."""
    _rank("pages", pages, 4)
    _rank("page_ids", page_ids, 1)
    _integer("page_ids", page_ids)
    if blocks is not None:
        _rank("blocks", blocks, 4)
        want = (pages.shape[0], page_ids.shape[0], pages.shape[2], pages.shape[3])
        if tuple(blocks.shape) != want:
            raise ValueError(f"blocks {tuple(blocks.shape)} must be {want} (heads, ids, page_size, head_dim)")


# ----------------------------------------------------------------------------- concrete values
def _concrete(*xs) -> bool:
    """True when no array is a tracer (its values can be read)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _first_bad(name: str, values: np.ndarray, lo: int, hi: int, what: str) -> None:
    """Raises naming the first entry of `values` outside `[lo, hi]`."""
    bad = np.argwhere((values < lo) | (values > hi))
    if bad.size:
        idx = tuple(int(i) for i in bad[0])
        where = idx[0] if len(idx) == 1 else list(idx)
        raise ValueError(f"{name}[{where}] = {int(values[idx])} is outside [{lo}, {hi}] ({what})")


def check_prefill_values(q, query_start_loc, context_lens, k_pages, block_tables) -> None:
    """Value checks of `ragged_prefill_attention` (concrete arrays only; see the module docstring)."""
    if not _concrete(query_start_loc, context_lens, block_tables):
        return
    num_tokens = q.shape[0]
    qsl = np.asarray(query_start_loc).astype(np.int64)
    if qsl[0] != 0:
        raise ValueError(f"query_start_loc must start at 0, got {int(qsl[0])}")
    steps = np.diff(qsl)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"query_start_loc must be non-decreasing, got {int(qsl[i])} then {int(qsl[i + 1])} "
                         f"at entries {i}, {i + 1}")
    _first_bad("query_start_loc", qsl, 0, num_tokens, f"q has {num_tokens} tokens")
    ctx = np.asarray(context_lens).astype(np.int64)
    if k_pages is None:
        _first_bad("context_lens", ctx, 0, 0, "a context needs the paged cache: pass k_pages, v_pages and "
                   "block_tables")
        return
    capacity = block_tables.shape[1] * k_pages.shape[2]
    _first_bad("context_lens", ctx, 0, capacity, "the block table holds max_blocks * page_size tokens")
    _first_bad("block_tables", np.asarray(block_tables).astype(np.int64), 0, k_pages.shape[1] - 1,
               f"page ids of a cache of {k_pages.shape[1]} pages")


def check_decode_values(k_pages, block_tables, lengths) -> None:
    """Value checks of `paged_decode_attention` (concrete arrays only)."""
    if not _concrete(block_tables, lengths):
        return
    capacity = block_tables.shape[1] * k_pages.shape[2]
    _first_bad("lengths", np.asarray(lengths).astype(np.int64), 0, capacity,
               "the block table holds max_blocks * page_size tokens")
    _first_bad("block_tables", np.asarray(block_tables).astype(np.int64), 0, k_pages.shape[1] - 1,
               f"page ids of a cache of {k_pages.shape[1]} pages")


def check_write_values(k_pages, slot_mapping) -> None:
    """Value checks of `write_kv_pages` (concrete arrays only)."""
    if not _concrete(slot_mapping):
        return
    slots = k_pages.shape[1] * k_pages.shape[2]
    _first_bad("slot_mapping", np.asarray(slot_mapping).astype(np.int64), 0, slots - 1,
               f"slots of a cache of {k_pages.shape[1]} pages of {k_pages.shape[2]}")


def check_page_id_values(pages, page_ids) -> None:
    """Value checks of `gather_pages` / `scatter_pages` (concrete arrays only)."""
    if not _concrete(page_ids):
        return
    _first_bad("page_ids", np.asarray(page_ids).astype(np.int64), 0, pages.shape[1] - 1,
               f"a cache of {pages.shape[1]} pages")

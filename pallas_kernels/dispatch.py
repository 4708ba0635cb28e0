"""The one entry point the runtime calls for attention: picks a backend and calls it.

Backends:
  - ``reference``: the pure-jnp functions in `reference.py` (XLA fuses them).
  - ``pallas``: the Pallas kernels (`ragged_prefill.py`, `paged_decode.py`) lowered for the GPU
    through Triton (see `lowering.py`); requires a GPU.
  - ``pallas_interpret``: the same kernels run by the Pallas interpreter (`interpret=True`) on
    any platform. Far too slow to serve with; tests and a flag choose it explicitly.
  - ``xla``: decode through the blocked scan of `xla_decode.py` (reads the cache once, no
    context-sized gather), prefill through the reference.
  - ``native``: CPU only. Decode attention, the KV write and the page gather/scatter of a KV
    pull through the C++ kernels of `cpu_native.py` (compiled on first use with the system
    compiler), prefill through the reference. float32 only: other dtypes take the ``xla`` path.
  - ``auto``: ``pallas`` on GPU; on CPU ``native`` when its kernels build, else ``xla``.

The backend is chosen per call by the ``backend`` argument, else by the environment variable
``DISTSERVE_ATTENTION_BACKEND``, else ``auto``. The functions work on local shards inside
`shard_map` (kv heads sharded over the ``tp`` axis, query heads sharded the same way, metadata
replicated): every kernel program only reads its own kv head's pages. The Pallas kernels
declare their outputs' mesh-axis variance, so they run under `shard_map(check_vma=True)`; the
exception is ``pallas_interpret``, whose interpreter (JAX 0.10) fails JAX's variance check
inside `shard_map`, so interpret-mode runs under `shard_map` need `check_vma=False`.

Every entry point checks its arguments first (`validation.py`): shapes and dtypes always, the
values of the index arrays when they are concrete (outside `jit`: out-of-range page ids, lengths
beyond a block table's capacity, a bad `query_start_loc` raise ValueError); under `jit` every
backend follows the index contract of `reference.py`. numpy arrays are accepted and converted.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_native, paged_decode, ragged_prefill, reference, validation, xla_decode
from pallas_kernels.lowering import Launch, padded_dim

BACKENDS = ("auto", "reference", "xla", "native", "pallas", "pallas_interpret")
ENV_VAR = "DISTSERVE_ATTENTION_BACKEND"

# Tile sizes used by the dispatcher (tuned for Ampere/Hopper-class GPUs; the interpreter uses
# the same tiles so the tests exercise the shapes the GPU runs).
PREFILL_BLOCK_Q = 64
PREFILL_BLOCK_K = 64
DECODE_BLOCK_K = 64


def resolve_backend(backend: str | None = None) -> str:
    """Returns the concrete backend name for `backend` (None reads the environment).

    Raises:
      ValueError: for an unknown name, ``pallas`` when JAX's default backend is not a GPU, or
        ``native`` when it is not the CPU or the C++ kernels did not build.
    """
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    on_gpu = jax.default_backend() == "gpu"
    if name == "auto":
        if on_gpu:
            return "pallas"
        return "native" if cpu_native.supported_on_default_backend() else "xla"
    if name == "native" and not cpu_native.supported_on_default_backend():
        raise ValueError(f"attention backend 'native' needs the CPU platform and its C++ kernels (JAX's "
                         f"default backend is {jax.default_backend()!r}; kernels available: "
                         f"{cpu_native.available()}); use 'xla' or 'reference'")
    if name == "pallas" and not on_gpu:
        raise ValueError(f"attention backend 'pallas' needs a GPU but JAX's default backend is "
                         f"{jax.default_backend()!r}; use 'pallas_interpret' or 'reference'")
    return name


def _launch(backend: str, head_dim: int) -> Launch:
    lowering = "interpret" if backend == "pallas_interpret" else "triton"
    return Launch(lowering=lowering, num_warps=4 if padded_dim(head_dim) <= 64 else 8, num_stages=2)


def ragged_prefill_attention(q, k, v, query_start_loc, context_lens, *, k_pages=None, v_pages=None,
                             block_tables=None, scale: float, sliding_window: int | None = None,
                             backend: str | None = None) -> jax.Array:
    """Causal attention over a packed batch of prompt chunks, optionally with paged context.

    See `reference.ragged_prefill_attention_ref` for shapes and semantics.
    """
    name = resolve_backend(backend)
    validation.check_prefill(q, k, v, query_start_loc, context_lens, k_pages, v_pages,
                             block_tables, scale, sliding_window)
    validation.check_prefill_values(q, query_start_loc, context_lens, k_pages, block_tables)
    scale, sliding_window = validation.static_scale_and_window(scale, sliding_window)
    q, k, v, query_start_loc, context_lens, k_pages, v_pages, block_tables = _arrays(
        q, k, v, query_start_loc, context_lens, k_pages, v_pages, block_tables)
    if name in ("reference", "xla", "native"):
        return reference.ragged_prefill_attention_ref(
            q, k, v, query_start_loc, context_lens, k_pages=k_pages, v_pages=v_pages,
            block_tables=block_tables, scale=scale, sliding_window=sliding_window)
    return ragged_prefill.ragged_prefill_attention(
        q, k, v, query_start_loc, context_lens, k_pages, v_pages, block_tables, scale=scale,
        sliding_window=sliding_window, block_q=PREFILL_BLOCK_Q, block_k=PREFILL_BLOCK_K,
        launch=_launch(name, q.shape[-1]))


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, scale: float,
                           sliding_window: int | None = None, backend: str | None = None) -> jax.Array:
    """One query token per sequence against its paged K/V.

    See `reference.paged_decode_attention_ref` for shapes and semantics.
    """
    name = resolve_backend(backend)
    validation.check_decode(q, k_pages, v_pages, block_tables, lengths, scale, sliding_window)
    validation.check_decode_values(k_pages, block_tables, lengths)
    scale, sliding_window = validation.static_scale_and_window(scale, sliding_window)
    q, k_pages, v_pages, block_tables, lengths = _arrays(q, k_pages, v_pages, block_tables, lengths)
    if name == "reference":
        return reference.paged_decode_attention_ref(
            q, k_pages, v_pages, block_tables, lengths, scale=scale, sliding_window=sliding_window)
    if name == "native" and _all_f32(q, k_pages, v_pages):
        return cpu_native.paged_decode_attention(
            q, k_pages, v_pages, block_tables, lengths, scale=scale, sliding_window=sliding_window)
    if name in ("xla", "native"):
        return xla_decode.paged_decode_attention_xla(
            q, k_pages, v_pages, block_tables, lengths, scale=scale, sliding_window=sliding_window)
    return paged_decode.paged_decode_attention(
        q, k_pages, v_pages, block_tables, lengths, scale=scale, sliding_window=sliding_window,
        block_k=DECODE_BLOCK_K, launch=_launch(name, q.shape[-1]))


def write_kv_pages(k_pages, v_pages, k, v, slot_mapping, *, backend: str | None = None):
    """Writes new K/V into their page slots; see `reference.write_kv_pages_ref`.

    ``native`` (float32) writes with the C++ kernel, whose outputs alias the pages: XLA's CPU
    scatter of a single token becomes a select + dynamic-update-slice that copies the whole
    page array. Every other backend uses the in-place `.at[].set` scatter of
    `reference.write_kv_pages_ref`: with the pages donated to the enclosing jit, XLA updates the
    cache in place and moves only the new tokens' bytes, which a Pallas scatter kernel could at
    best match on a GPU; add one only with a benchmark that shows it does.
    """
    name = resolve_backend(backend)
    validation.check_write(k_pages, v_pages, k, v, slot_mapping)
    validation.check_write_values(k_pages, slot_mapping)
    k_pages, v_pages, k, v, slot_mapping = _arrays(k_pages, v_pages, k, v, slot_mapping)
    if writes_kv_in_place(name, k_pages.dtype) and _all_f32(v_pages, k, v):
        return cpu_native.write_kv_pages(k_pages, v_pages, k, v, slot_mapping)
    return reference.write_kv_pages_ref(k_pages, v_pages, k, v, slot_mapping)


def writes_kv_in_place(backend: str | None, dtype) -> bool:
    """True when `write_kv_pages` (and the page gather/scatter of a KV pull) use the native kernels
    for a cache of `dtype` (in place at any token count; XLA's scatter copies the page array for a
    single token)."""
    return resolve_backend(backend) == "native" and jnp.dtype(dtype) == jnp.float32


def gather_pages(pages, page_ids, *, backend: str | None = None):
    """Whole pages by id, `[H, P, PS, D]` -> `[H, n, PS, D]`; see `reference.gather_pages_ref`.

    ``native`` (float32) copies each page with one memcpy; XLA's CPU gather moves them element
    block by element block (RESULTS.md: the KV pull's gather cost 1-6x the copy itself).
    """
    validation.check_page_blocks(pages, page_ids)
    validation.check_page_id_values(pages, page_ids)
    pages, page_ids = _arrays(pages, page_ids)
    if writes_kv_in_place(backend, pages.dtype):
        return cpu_native.gather_pages(pages, page_ids)
    return reference.gather_pages_ref(pages, page_ids)


def scatter_pages(pages, blocks, page_ids, *, backend: str | None = None):
    """`pages.at[:, page_ids].set(blocks)`, in place when the pages are donated; see
    `reference.scatter_pages_ref` (``native``: one memcpy per page into the aliased pages)."""
    validation.check_page_blocks(pages, page_ids, blocks)
    validation.check_page_id_values(pages, page_ids)
    pages, blocks, page_ids = _arrays(pages, blocks, page_ids)
    if writes_kv_in_place(backend, pages.dtype) and _all_f32(blocks):
        return cpu_native.scatter_pages(pages, blocks, page_ids)
    return reference.scatter_pages_ref(pages, blocks, page_ids)


def _arrays(*xs):
    """numpy inputs as JAX arrays (tracers and JAX arrays pass through; None stays None)."""
    return tuple(x if x is None or isinstance(x, jax.Array) else jnp.asarray(x) for x in xs)


def _all_f32(*xs) -> bool:
    return all(x.dtype == jnp.float32 for x in xs)

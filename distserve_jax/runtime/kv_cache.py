"""The device-side paged KV cache of one mesh: allocation and sizing from a memory budget.

One `(k_pages, v_pages)` pair per layer, each `[num_kv_heads, num_blocks, block_size, head_dim]`,
sharded over kv heads on the mesh's ``tp`` axis. Block accounting lives in the scheduler's
`BlockManager`; this module only owns the arrays.

Freed blocks are not scrubbed. Whatever a request leaves in its pages (NaN or Inf from activations
that overflowed included) can only be read by a later owner through slots past that owner's own
lengths, and every attention backend selects those away rather than multiplying them by a zero
probability (`pallas_kernels/reference.py`, "Isolation"; tested with every page NaN/Inf-filled).
Scrubbing would cost a write of every freed page on the step loop and still not cover pages in
use by another request of the same batch, which the masking covers too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh

from distserve_jax.models.config import ModelConfig
from distserve_jax.runtime.sharding import kv_pages_sharding

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def block_bytes(cfg: ModelConfig, block_size: int, dtype: str, num_layers: int | None = None) -> int:
    """Bytes one block takes over all layers (K and V), summed over the whole tp group."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * cfg.num_kv_heads * block_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def blocks_from_memory(cfg: ModelConfig, mesh: Mesh, *, block_size: int, dtype: str, fraction: float,
                       weight_bytes: int, num_layers: int | None = None) -> int | None:
    """Blocks that fit in `fraction` of the mesh's device memory after the weights.

    Returns None when the devices do not report their memory (CPU).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
    limits = []
    for d in mesh.devices.flat:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(stats["bytes_limit"])
    budget = min(limits) * mesh.size * fraction - weight_bytes
    n = int(budget // block_bytes(cfg, block_size, dtype, num_layers))
    if n < 2:
        raise ValueError(f"no room for the KV cache: {fraction:.0%} of device memory minus "
                         f"{weight_bytes / 2**30:.2f} GiB of weights leaves {budget / 2**30:.2f} GiB")
    logging.info("KV cache: %d blocks of %d tokens from %.2f GiB", n, block_size, budget / 2**30)
    return n


def allocate(cfg: ModelConfig, mesh: Mesh, *, num_blocks: int, block_size: int, dtype: str,
             num_layers: int | None = None) -> KVCache:
    """Zero-filled pages for `num_layers` layers (default: all), created directly sharded."""
    layers = cfg.num_layers if num_layers is None else num_layers
    shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
    sharding = kv_pages_sharding(mesh)
    zeros = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(dtype)), out_shardings=sharding)
    return tuple((zeros(), zeros()) for _ in range(layers))

"""How the Pallas attention kernels are lowered: the one place that names a Pallas GPU backend.

Owns the lowering choice (`LOWERINGS`), the `pallas_call` keyword arguments each lowering needs
(`pallas_call_kwargs`), and the few memory/matmul primitives the kernel bodies use
(`load_tile`, `store_tile`, `dot`), so that the kernel bodies themselves hold only the
attention math.

Lowerings:
  - ``triton``: `pl.pallas_call` lowered through Triton on a GPU (`compiler_params` is a
    `jax.experimental.pallas.triton.CompilerParams`).
  - ``interpret``: the same kernel body run by the Pallas HLO interpreter (`interpret=True`),
    on any platform; this is what the CPU tests exercise.

Mosaic GPU (which JAX 0.11 makes the default GPU lowering, deprecating Triton) needs a kernel
body in its own programming model (warpgroup arrays, explicit SMEM pipelines), not just other
parameters. It would be a third entry of `LOWERINGS` with its own kernel modules next to
`ragged_prefill.py` / `paged_decode.py`, selected through `pallas_call_kwargs`.

Tile rules the kernel bodies follow so that they compile for Triton: every loaded, stored or
multiplied tile has power-of-two dimensions (head_dim is padded up to `padded_dim(head_dim)`
and masked), matmul operands are at least 16 x 16, and every memory access goes through
`load_tile`/`store_tile` with integer index arrays and a mask, so out-of-range rows are never
touched on the GPU and are clamped-then-masked by the interpreter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

LOWERINGS = ("triton", "interpret")

# Finite "minus infinity" for running maxima and masked logits: exp2(MASK - x) == 0 for any
# finite score, and MASK - MASK == 0 never produces the NaN that -inf - -inf would.
MASK_VALUE = -1e30
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Launch:
    """Static launch configuration shared by the kernels.

    Attributes:
      lowering: one of `LOWERINGS`.
      num_warps: Triton warps per program (ignored by the interpreter).
      num_stages: Triton software-pipelining stages (ignored by the interpreter).
    """

    lowering: str = "triton"
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.lowering not in LOWERINGS:
            raise ValueError(f"unknown Pallas lowering {self.lowering!r}; expected one of {LOWERINGS}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two >= 1, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def pallas_call_kwargs(launch: Launch) -> dict[str, Any]:
    """Keyword arguments for `pl.pallas_call` that select and configure the lowering."""
    params = pl_triton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)
    return {"compiler_params": params, "interpret": launch.lowering == "interpret"}


def varying_axes(*arrays) -> tuple[str, ...]:
    """Manual mesh axes (inside `shard_map` with `check_vma`) that any of `arrays` varies over."""
    axes: set = set()
    for x in arrays:
        mat = getattr(jax.typeof(x), "manual_axis_type", None)
        if mat is not None:
            axes |= set(mat.varying)
    return tuple(sorted(axes))


def out_struct(shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> jax.ShapeDtypeStruct:
    """`pallas_call` output type, varying over the manual mesh axes `axes` (see `varying_axes`).

    Under `shard_map(check_vma=True)` `pallas_call` needs each output's variance spelled out;
    outputs vary over every axis an input varies over (e.g. ``tp`` for sharded kv heads).
    """
    mat = jax.sharding.ManualAxisType(varying=frozenset(axes))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks `x` as varying over `axes` (no-op outside `shard_map` or when already varying)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def padded_dim(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): the tile size used for a dimension of size n."""
    return max(minimum, pl.next_power_of_2(n))


def check_block(name: str, size: int) -> None:
    """Raises ValueError unless `size` is a power of two >= 16 (Triton tile and matmul rules)."""
    if size < 16 or not is_power_of_two(size):
        raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def load_tile(ref, idx: tuple, mask: jax.Array, other: float | int = 0) -> jax.Array:
    """Gathers `ref[idx]` where `idx` holds scalars (leading) and broadcastable int arrays.

    Elements where `mask` is False read `other` and touch no memory on the GPU.
    """
    return pl_triton.load(ref.at[idx], mask=mask, other=other)


def load_paged_kv(bt_ref, kp_ref, vp_ref, *, seq, kv_head, kpos: jax.Array, k_ok: jax.Array,
                  cols: jax.Array, col_ok: jax.Array, num_pages: int, page_size: int, dtype
                  ) -> tuple[jax.Array, jax.Array]:
    """Loads the K and V tiles of key positions `kpos` `[block_k]` of one sequence through its block table.

    Args:
      bt_ref: the block tables `[num_seqs, max_blocks]`; kp_ref, vp_ref: the pages flattened to
        `[num_kv_heads * num_pages * page_size, dp]`.
      k_ok: `[block_k]` which positions exist; cols/col_ok: the padded head_dim columns.
    Returns:
      `(k, v)`, each `[block_k, dp]` in `dtype`; positions or columns that do not exist read 0.
    """
    page = load_tile(bt_ref, (seq, lax.div(kpos, jnp.int32(page_size))), k_ok)
    page = jnp.clip(page, 0, num_pages - 1)
    slot = (kv_head * num_pages + page) * page_size + lax.rem(kpos, jnp.int32(page_size))
    tile_ok = k_ok[:, None] & col_ok
    kb = load_tile(kp_ref, (slot[:, None], cols[None, :]), tile_ok).astype(dtype)
    vb = load_tile(vp_ref, (slot[:, None], cols[None, :]), tile_ok).astype(dtype)
    return kb, vb


def store_tile(ref, idx: tuple, value: jax.Array, mask: jax.Array) -> None:
    """Scatters `value` into `ref[idx]` where `mask` is True (same index rules as `load_tile`)."""
    pl_triton.store(ref.at[idx], value, mask=mask)


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """`a @ b` (or `a @ b.T`) accumulated in float32.

    float32 operands use IEEE float32 products (no TF32) so float32 kernels match the float32
    reference to ~1e-6; bfloat16/float16 operands use the tensor cores' native path.
    """
    if a.dtype != b.dtype:
        raise ValueError(f"dot operands must share a dtype, got {a.dtype} and {b.dtype}")
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return pl_triton.dot(a, b, trans_b=trans_b, precision=precision)


def cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceil division of a non-negative traced int32 scalar by a static positive int."""
    return lax.div(a + (b - 1), jnp.int32(b))


def online_softmax_step(carry, q, k, v, mask, scale_log2):
    """One flash-attention step: folds the key block `k`/`v` into the running `(acc, m, l)`.

    Args:
      carry: `(acc [rows, dp] f32, m [rows] f32, l [rows] f32)`, base-2 running max and sum.
      q: `[rows, dp]` queries; k, v: `[block_k, dp]` keys/values (same dtype as q).
      mask: `[rows, block_k]` bool, True where the key is visible to the query row.
      scale_log2: softmax scale times log2(e).
    """
    acc, m_prev, l_prev = carry
    # Keys no row sees contribute by selection, never as 0 * value (a stale NaN would survive that).
    seen = jnp.max(jnp.where(mask, 1.0, 0.0), axis=0) > 0  # (Triton lowers no reduce_or)
    v = jnp.where(seen[:, None], v, jnp.zeros_like(v))
    s = dot(q, k, trans_b=True) * scale_log2
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=-1)
    acc = correction[:, None] * acc + dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

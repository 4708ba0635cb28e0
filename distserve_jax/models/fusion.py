"""Fused projection weights for the Llama family: `q|k|v` into `qkv_proj`, `gate|up` into `gate_up_proj`.

Checkpoints and the loader keep the separate projections (that is what tensor parallelism shards
head by head). A runtime that holds a whole, unsharded copy of a stage (tp=1) may fuse them so a
decode step runs one matrix product per group instead of three and two: on the CPU, where a step
is a chain of small products, that is a measurable share of the step (`benchmarks/decode_step.py`).
The fused layout is the column-wise concatenation, so `x @ qkv_proj = [x @ q | x @ k | x @ v]`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
          (None, "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_llama_projections(params: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of a Llama-family stage's params with the projections fused.

    Args:
      params: the stage's parameter tree (`layers_{i}` entries as `DecoderStage` lays them out).
    Returns:
      The same tree with, in every layer, `self_attn/{q,k,v}_proj` replaced by
      `self_attn/qkv_proj` and `{gate,up}_proj` by `gate_up_proj` (kernels `[in, sum of outs]`,
      biases concatenated the same way when present).
    Raises:
      ValueError: a layer lacks one of the projections (not a Llama-family tree, or already fused).
    """
    out = dict(params)
    for name, layer in params.items():
        if not name.startswith("layers_"):
            continue
        layer = dict(layer)
        for parent, fused_name, parts in GROUPS:
            holder = dict(layer[parent]) if parent else layer
            missing = [p for p in parts if p not in holder]
            if missing:
                raise ValueError(f"{name}: cannot fuse {fused_name}, missing {missing}")
            fused = {"kernel": jnp.concatenate([holder[p]["kernel"] for p in parts], axis=1)}
            if "bias" in holder[parts[0]]:
                fused["bias"] = jnp.concatenate([holder[p]["bias"] for p in parts], axis=0)
            for p in parts:
                del holder[p]
            holder[fused_name] = fused
            if parent:
                layer[parent] = holder
        out[name] = layer
    return out

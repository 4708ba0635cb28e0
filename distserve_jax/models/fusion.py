"""The fused weight layout of an unsharded Llama-family stage: `q|k|v` into `qkv_proj`, `gate|up`
into `gate_up_proj`, every kernel stored `[out, in]`.

Checkpoints and the loader keep the separate projections `[in, out]` (that is what tensor
parallelism shards head by head). A runtime that holds a whole, unsharded copy of a stage (tp=1)
converts them so a decode step runs one matrix product per group instead of three and two, with
the weights in the layout XLA's CPU dot reads fastest: `x [M, K]` contracted with `w [N, K]` on K
ran 5-13% faster than with `[K, N]` for M = 1 to 256 over a Llama-130m's matrices. On the CPU,
where a step is a chain of small products, both are a measurable share of the step
(`benchmarks/decode_step.py`). `qkv_proj` rows are `[q rows | k rows | v rows]`, so
`x @ qkv_proj.T = [x @ q | x @ k | x @ v]`.
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
      `self_attn/qkv_proj` and `{gate,up}_proj` by `gate_up_proj` (kernels `[sum of outs, in]`,
      biases concatenated the same way when present), `o_proj` and `down_proj` kernels and
      `lm_head` transposed to `[out, in]`.
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
            fused = {"kernel": jnp.concatenate([holder[p]["kernel"].T for p in parts], axis=0)}
            if "bias" in holder[parts[0]]:
                fused["bias"] = jnp.concatenate([holder[p]["bias"] for p in parts], axis=0)
            for p in parts:
                del holder[p]
            holder[fused_name] = fused
            if parent:
                layer[parent] = holder
        for parent, single in (("self_attn", "o_proj"), (None, "down_proj")):
            holder = layer[parent] if parent else layer
            holder[single] = {**holder[single], "kernel": holder[single]["kernel"].T}
        out[name] = layer
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"].T
    return out

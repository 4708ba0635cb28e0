"""Llama-family decoder layer: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias).

RMSNorm, RoPE (optionally llama3-scaled), GQA/MQA with any head_dim, SwiGLU MLP.

With `fused=True` the layer reads `qkv_proj` and `gate_up_proj` (the concatenations of
`q_proj|k_proj|v_proj` and `gate_proj|up_proj`) instead of the separate projections, and every
kernel of the layer is stored `[out, in]` (see `models/fusion.py`): one product per group, in the
layout XLA's CPU dot reads fastest, which matters where a decode step is a chain of small matrix
products (the CPU). Checkpoints always hold the separate ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distserve_jax.models.attention import AttentionFn, AttentionMetadata, KVPages
from distserve_jax.models.config import ModelConfig
from distserve_jax.models.layers import Linear, RMSNorm, apply_rope


class LlamaAttention(nn.Module):
    cfg: ModelConfig
    attention_fn: AttentionFn
    dtype: jnp.dtype
    fused: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, meta: AttentionMetadata, pages: KVPages) -> tuple[jax.Array, KVPages]:
        c = self.cfg
        t = x.shape[0]
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if self.fused:
            qkv = Linear(nq + 2 * nkv, c.attention_bias, self.dtype, transposed=True, name="qkv_proj")(x)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        else:
            q = Linear(nq, c.attention_bias, self.dtype, name="q_proj")(x)
            k = Linear(nkv, c.attention_bias, self.dtype, name="k_proj")(x)
            v = Linear(nkv, c.attention_bias, self.dtype, name="v_proj")(x)
        q = apply_rope(q.reshape(t, c.num_heads, c.head_dim), meta.positions, c)
        k = apply_rope(k.reshape(t, c.num_kv_heads, c.head_dim), meta.positions, c)
        v = v.reshape(t, c.num_kv_heads, c.head_dim)
        out, pages = self.attention_fn(q, k, v, pages, meta)
        out = Linear(c.hidden_size, c.o_proj_bias, self.dtype, transposed=self.fused,
                     name="o_proj")(out.reshape(t, -1))
        return out, pages


class LlamaLayer(nn.Module):
    """One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    cfg: ModelConfig
    attention_fn: AttentionFn
    dtype: jnp.dtype
    fused: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, meta: AttentionMetadata, pages: KVPages) -> tuple[jax.Array, KVPages]:
        c = self.cfg
        h = RMSNorm(c.norm_eps, self.dtype, name="input_layernorm")(x)
        h, pages = LlamaAttention(c, self.attention_fn, self.dtype, self.fused, name="self_attn")(h, meta, pages)
        x = x + h
        h = RMSNorm(c.norm_eps, self.dtype, name="post_attention_layernorm")(x)
        if self.fused:
            gate_up = Linear(2 * c.intermediate_size, c.mlp_bias, self.dtype, transposed=True, name="gate_up_proj")(h)
            gate, up = gate_up[:, :c.intermediate_size], gate_up[:, c.intermediate_size:]
        else:
            gate = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="gate_proj")(h)
            up = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="up_proj")(h)
        h = Linear(c.hidden_size, c.mlp_bias, self.dtype, transposed=self.fused, name="down_proj")(nn.silu(gate) * up)
        return x + h, pages

"""OPT decoder layer (the DistServe paper's models): pre-LN or post-LN, ReLU FFN, biases everywhere."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distserve_jax.models.attention import AttentionFn, AttentionMetadata, KVPages
from distserve_jax.models.config import ModelConfig
from distserve_jax.models.layers import LayerNorm, Linear


class OPTLayer(nn.Module):
    """One OPT layer; `do_layer_norm_before` picks pre-LN (most sizes) or post-LN (350m)."""

    cfg: ModelConfig
    attention_fn: AttentionFn
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, meta: AttentionMetadata, pages: KVPages) -> tuple[jax.Array, KVPages]:
        c = self.cfg
        t = x.shape[0]
        pre = c.do_layer_norm_before
        attn_ln = LayerNorm(c.norm_eps, self.dtype, name="self_attn_layer_norm")
        ffn_ln = LayerNorm(c.norm_eps, self.dtype, name="final_layer_norm")

        h = attn_ln(x) if pre else x
        q = Linear(c.num_heads * c.head_dim, True, self.dtype, name="q_proj")(h)
        k = Linear(c.num_kv_heads * c.head_dim, True, self.dtype, name="k_proj")(h)
        v = Linear(c.num_kv_heads * c.head_dim, True, self.dtype, name="v_proj")(h)
        out, pages = self.attention_fn(q.reshape(t, c.num_heads, c.head_dim),
                                       k.reshape(t, c.num_kv_heads, c.head_dim),
                                       v.reshape(t, c.num_kv_heads, c.head_dim), pages, meta)
        x = x + Linear(c.hidden_size, True, self.dtype, name="out_proj")(out.reshape(t, -1))
        if not pre:
            x = attn_ln(x)

        h = ffn_ln(x) if pre else x
        h = nn.relu(Linear(c.intermediate_size, True, self.dtype, name="fc1")(h))
        x = x + Linear(c.hidden_size, True, self.dtype, name="fc2")(h)
        if not pre:
            x = ffn_ln(x)
        return x, pages

"""A decoder-only model, or one pipeline stage of it, for every supported family.

`DecoderStage(cfg, layer_start, layer_end, ...)` holds layers `[layer_start, layer_end)`; the first
stage also embeds tokens, the last applies the final norm and LM head to each sequence's last
token only. With `layer_start=0, layer_end=num_layers` it is the whole model.

Parameter tree (plain pytree, `{"params": ...}` for `apply`): `embed`, `embed_positions` (OPT),
`project_in`/`project_out` (OPT-350m shape), `layers_{i}` with global layer indices,
`norm`, `lm_head` (absent when embeddings are tied). With `fused_projections=True` (Llama
family only) the stage reads the fused layout of `models/fusion.py`: `qkv_proj` / `gate_up_proj`
and every layer kernel and `lm_head` stored `[out, in]`.

Layers are applied through one jitted function per (config, attention, dtype, layout)
(`_layer_fn`), called once per layer inside the stage's jit: JAX traces and lowers the layer
once per step shape instead of once per layer (a 30-layer stage traced and lowered 30 layers at
every bucket), and XLA inlines the calls, so the compiled step is the same as a loop over layers.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distserve_jax.models.attention import AttentionFn, AttentionMetadata, KVPages, paged_attention
from distserve_jax.models.config import ModelConfig
from distserve_jax.models.layers import LayerNorm, Linear, RMSNorm, matmul
from distserve_jax.models.llama import LlamaLayer
from distserve_jax.models.opt import OPTLayer


def default_attention_fn(cfg: ModelConfig, backend: str | None = None) -> AttentionFn:
    """The attention call site bound to this model's scale and sliding window."""
    return functools.partial(paged_attention, scale=cfg.head_dim ** -0.5,
                             sliding_window=cfg.sliding_window, backend=backend)


class DecoderStage(nn.Module):
    cfg: ModelConfig
    layer_start: int
    layer_end: int
    attention_fn: AttentionFn
    dtype: Any = jnp.float32
    fused_projections: bool = False

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.cfg.num_layers

    @nn.compact
    def __call__(self, inputs: jax.Array, meta: AttentionMetadata, kv_pages: Sequence[KVPages]
                 ) -> tuple[jax.Array, tuple[KVPages, ...]]:
        """Runs this stage on one ragged batch.

        Args:
          inputs: first stage: token ids `[num_tokens]` int32; later stages: hidden states
            `[num_tokens, hidden_size]`.
          meta: the batch's `AttentionMetadata`.
          kv_pages: one `(k_pages, v_pages)` per layer of this stage, each
            `[num_kv_heads, num_pages, page_size, head_dim]`.
        Returns:
          (last stage: float32 logits `[num_seqs, vocab_size]` at `meta.logits_indices`; other
          stages: hidden states `[num_tokens, hidden_size]`), and the updated pages.
        """
        c = self.cfg
        opt = c.family == "opt"
        if self.fused_projections and opt:
            raise ValueError("fused projections are implemented for the Llama family only")
        embed_dim = c.word_embed_proj_dim if opt else c.hidden_size
        embed = None
        if self.is_first or (self.is_last and c.tie_word_embeddings):
            embed = nn.Embed(c.vocab_size, embed_dim, dtype=self.dtype, param_dtype=self.dtype, name="embed")

        if self.is_first:
            x = embed(inputs)
            if opt:
                if embed_dim != c.hidden_size:
                    x = Linear(c.hidden_size, False, self.dtype, name="project_in")(x)
                pos = nn.Embed(c.max_position_embeddings + c.position_offset, c.hidden_size,
                               dtype=self.dtype, param_dtype=self.dtype, name="embed_positions")
                x = x + pos(meta.positions + c.position_offset)
        else:
            x = inputs

        new_pages = []
        for i in range(self.layer_start, self.layer_end):
            pages = kv_pages[i - self.layer_start]
            if self.is_initializing():  # creates the layer's parameters
                x, p = _layer(c, self.attention_fn, self.dtype, self.fused_projections, f"layers_{i}")(x, meta, pages)
            else:
                fn = _layer_fn(c, self.attention_fn, jnp.dtype(self.dtype), self.fused_projections)
                x, p = fn(self.variables["params"][f"layers_{i}"], x, meta, pages)
            new_pages.append(p)
        if not self.is_last:
            return x, tuple(new_pages)

        h = x[meta.logits_indices]
        if opt:
            if c.do_layer_norm_before:
                h = LayerNorm(c.norm_eps, self.dtype, name="norm")(h)
            if embed_dim != c.hidden_size:
                h = Linear(embed_dim, False, self.dtype, name="project_out")(h)
        else:
            h = RMSNorm(c.norm_eps, self.dtype, name="norm")(h)
        if c.tie_word_embeddings:  # the embedding is already [vocab, embed_dim]
            logits = matmul(h.astype(self.dtype), embed.embedding, transposed=True)
        else:
            shape = (c.vocab_size, embed_dim) if self.fused_projections else (embed_dim, c.vocab_size)
            w = self.param("lm_head", nn.initializers.normal(0.02), shape, self.dtype)
            logits = matmul(h.astype(self.dtype), w, transposed=self.fused_projections)
        return logits, tuple(new_pages)


def _layer(cfg: ModelConfig, attention_fn: AttentionFn, dtype: Any, fused: bool, name: str | None = None
           ) -> nn.Module:
    if cfg.family == "opt":
        return OPTLayer(cfg, attention_fn, dtype, name=name)
    return LlamaLayer(cfg, attention_fn, dtype, fused, name=name)


@functools.lru_cache(maxsize=64)
def _layer_fn(cfg: ModelConfig, attention_fn: AttentionFn, dtype: Any, fused: bool):
    """`(layer_params, x, meta, pages) -> (x, pages)`, jitted: traced once per shape for all layers."""
    layer = _layer(cfg, attention_fn, dtype, fused)
    return jax.jit(lambda params, x, meta, pages: layer.apply({"params": params}, x, meta, pages))


def stage_bounds(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Splits `num_layers` into `pp` contiguous stages of equal size."""
    if pp < 1 or num_layers % pp:
        raise ValueError(f"pp={pp} does not divide the number of layers ({num_layers})")
    per = num_layers // pp
    return [(s * per, (s + 1) * per) for s in range(pp)]

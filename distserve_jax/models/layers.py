"""Small building blocks shared by the model families: linear, norms, rotary embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distserve_jax.models.config import ModelConfig, rope_inv_freq


class Linear(nn.Module):
    """`y = x @ kernel (+ bias)`, kernel `[in_features, features]`.

    With `transposed=True` the kernel is stored `[features, in_features]` (PyTorch's layout) and
    contracted on its last axis; XLA's CPU dot reads that layout faster at every row count
    measured (see `models/fusion.py`).
    """

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    transposed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features, x.shape[-1]) if self.transposed else (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.normal(0.02), shape, self.dtype)
        y = matmul(x.astype(self.dtype), kernel, self.transposed)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with affine weight and bias (OPT)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """`x [..., K] @ w` in float32, `w` `[K, N]`, or `[N, K]` when `transposed`; returns `[..., N]`."""
    if not transposed:
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding (rotate-half layout) on `x` `[num_tokens, num_heads, head_dim]`."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg), dtype=jnp.float32)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def np_dtype(name: str) -> np.dtype:
    """numpy/ml_dtypes dtype for a dtype name."""
    return np.dtype(jnp.dtype(name))

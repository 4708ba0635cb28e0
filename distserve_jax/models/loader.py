"""Loads Hugging Face checkpoints (safetensors) and orbax checkpoints into sharded parameters.

Every needed tensor is located and checked (present, known dtype, shape matching the config)
before the first byte goes to a device, so a bad checkpoint fails with a message that names the
tensor and nothing is half-loaded. Each tensor is then built shard by shard with
`jax.make_array_from_callback` straight from the memory-mapped file: no device ever holds more
than its own shard.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distserve_jax.models.attention import AttentionMetadata
from distserve_jax.models.config import DTYPES, ModelConfig
from distserve_jax.models.decoder import DecoderStage, default_attention_fn
from distserve_jax.models.safetensors_io import CheckpointError, SafetensorsCheckpoint

_LAYER = re.compile(r"layers_(\d+)")
# Modules whose kernels hold kv heads on their output axis.
_KV_MODULES = {"k_proj", "v_proj"}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {DTYPES}")
    return dtype


def abstract_params(cfg: ModelConfig, layer_start: int = 0, layer_end: int | None = None,
                    dtype: str = "float32") -> Any:
    """Shapes/dtypes (`ShapeDtypeStruct`s) of the parameters of one stage, without allocating.

    Every layer's parameters have the same shapes, so this traces a stage of one layer (with the
    embedding and head as this stage has them) and repeats that layer's entry for every layer of
    the stage: tracing a whole deep model's init took seconds per instance.
    """
    layer_end = cfg.num_layers if layer_end is None else layer_end
    if not 0 <= layer_start < layer_end <= cfg.num_layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is not inside the model's {cfg.num_layers} layers")
    first, last = layer_start == 0, layer_end == cfg.num_layers
    one = 0 if first else 1  # the index of the traced layer in a small model with the same ends
    small = dataclasses.replace(cfg, num_layers=one + 1 + (0 if last else 1))
    proto = dict(_abstract_stage(small, one, one + 1, dtype))
    layer = proto.pop(f"layers_{one}")
    return {**proto, **{f"layers_{i}": layer for i in range(layer_start, layer_end)}}


@functools.lru_cache(maxsize=32)
def _abstract_stage(cfg: ModelConfig, layer_start: int, layer_end: int, dtype: str) -> dict:
    model = DecoderStage(cfg, layer_start, layer_end, default_attention_fn(cfg), jnp.dtype(dtype))
    n = 2
    meta = AttentionMetadata(
        positions=jnp.zeros((n,), jnp.int32), slot_mapping=jnp.zeros((n,), jnp.int32),
        query_start_loc=jnp.array([0, n], jnp.int32), context_lens=jnp.zeros((1,), jnp.int32),
        seq_lens=jnp.full((1,), n, jnp.int32), block_tables=jnp.zeros((1, 1), jnp.int32),
        logits_indices=jnp.array([n - 1], jnp.int32), mode="prefill")
    page = jnp.zeros((cfg.num_kv_heads, 2, 16, cfg.head_dim), jnp.dtype(dtype))
    pages = tuple((page, page) for _ in range(layer_start, layer_end))
    inputs = (jnp.zeros((n,), jnp.int32) if layer_start == 0
              else jnp.zeros((n, cfg.hidden_size), jnp.dtype(dtype)))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, meta, pages))
    return dict(shapes["params"])


def _names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def hf_tensor_name(path: tuple[str, ...], cfg: ModelConfig) -> str:
    """The Hugging Face tensor name that holds the parameter at `path`."""
    leaf = "bias" if path[-1] == "bias" else "weight"
    if cfg.family == "llama":
        top = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
        if path[0] in top:
            return top[path[0]]
        layer = int(_LAYER.fullmatch(path[0]).group(1))
        mod = path[1]
        if mod == "self_attn":
            return f"model.layers.{layer}.self_attn.{path[2]}.{leaf}"
        if mod in ("gate_proj", "up_proj", "down_proj"):
            return f"model.layers.{layer}.mlp.{mod}.{leaf}"
        return f"model.layers.{layer}.{mod}.{leaf}"
    top = {"embed": "model.decoder.embed_tokens.weight",
           "embed_positions": "model.decoder.embed_positions.weight",
           "project_in": "model.decoder.project_in.weight",
           "project_out": "model.decoder.project_out.weight",
           "lm_head": "lm_head.weight"}
    if path[0] == "norm":
        return f"model.decoder.final_layer_norm.{leaf}"
    if path[0] in top:
        return top[path[0]]
    layer = int(_LAYER.fullmatch(path[0]).group(1))
    mod = path[1]
    if mod in ("q_proj", "k_proj", "v_proj", "out_proj"):
        return f"model.decoder.layers.{layer}.self_attn.{mod}.{leaf}"
    return f"model.decoder.layers.{layer}.{mod}.{leaf}"


def _resolve(ckpt: SafetensorsCheckpoint, name: str) -> str | None:
    for cand in (name, name.removeprefix("model."), "model." + name):
        if cand in ckpt:
            return cand
    return None


def _plan_tensor(path: tuple[str, ...], target_shape: tuple[int, ...], cfg: ModelConfig
                 ) -> tuple[tuple[int, ...], bool, int]:
    """(expected checkpoint shape, transpose?, kv head repeat) for one parameter."""
    transpose = path[-1] == "kernel" or path[0] == "lm_head"
    rep = cfg.kv_replication if set(path) & _KV_MODULES else 1
    shape = tuple(reversed(target_shape)) if transpose else target_shape
    if rep > 1:
        shape = (shape[0] // rep,) + shape[1:]
    return shape, transpose, rep


def _transform(arr: np.ndarray, transpose: bool, rep: int, head_dim: int) -> np.ndarray:
    """Checkpoint layout -> parameter layout (transpose `[out, in]` kernels, repeat kv heads)."""
    if rep > 1:
        heads = arr.shape[0] // head_dim
        arr = np.repeat(arr.reshape((heads, head_dim) + arr.shape[1:]), rep, axis=0)
        arr = arr.reshape((heads * rep * head_dim,) + arr.shape[2:])
    return arr.T if transpose else arr


def load_safetensors_params(model_dir: str | Path, cfg: ModelConfig, shardings_fn: Callable[[Any], Any],
                            *, dtype: str = "float32", layer_start: int = 0,
                            layer_end: int | None = None) -> Any:
    """Loads the parameters of layers `[layer_start, layer_end)` (plus embed/head as the stage needs).

    Args:
      model_dir: Hugging Face directory with `*.safetensors` (and an index when sharded).
      cfg: the config as this tp group holds it (`ModelConfig.for_tp`).
      shardings_fn: maps the abstract parameter tree to a tree of target `Sharding`s.
      dtype: parameter dtype, one of float32/bfloat16/float16.
    Returns:
      The parameter pytree, each leaf a `jax.Array` with its target sharding.
    """
    check_dtype(dtype)
    target_dtype = jnp.dtype(dtype)
    abstract = abstract_params(cfg, layer_start, layer_end, dtype)
    shardings = shardings_fn(abstract)
    ckpt = SafetensorsCheckpoint(model_dir)

    # Pass 1: locate and check everything.
    plans = []
    problems = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = _names(path)
        hf = hf_tensor_name(names, cfg)
        found = _resolve(ckpt, hf)
        if found is None:
            problems.append(f"missing tensor {hf!r}")
            continue
        want, transpose, rep = _plan_tensor(names, tuple(leaf.shape), cfg)
        if ckpt.dtype_tag(found) not in ("F32", "F16", "BF16"):
            problems.append(f"tensor {found!r} has unsupported dtype {ckpt.dtype_tag(found)} "
                            "(supported: F32, F16, BF16)")
        elif ckpt.shape(found) != want:
            problems.append(f"tensor {found!r} has shape {list(ckpt.shape(found))}, but the config "
                            f"needs {list(want)}")
        plans.append((found, transpose, rep))
    if problems:
        raise CheckpointError(f"cannot load {model_dir}: " + "; ".join(problems[:8])
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))

    # Pass 2: build each array shard by shard from the memory map.
    flat_shardings = jax.tree_util.tree_leaves(shardings)
    leaves = []
    for (found, transpose, rep), sharding, leaf in zip(plans, flat_shardings, jax.tree_util.tree_leaves(abstract)):
        src = _transform(ckpt.get(found), transpose, rep, cfg.head_dim)

        def shard(index, src=src):
            return np.ascontiguousarray(src[index]).astype(target_dtype)

        leaves.append(jax.make_array_from_callback(tuple(leaf.shape), sharding, shard))
    unused = set(ckpt.names()) - {p[0] for p in plans}
    if unused and layer_start == 0 and layer_end in (None, cfg.num_layers):
        logging.info("ignored %d checkpoint tensors not used by the model, e.g. %s", len(unused), sorted(unused)[:3])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def random_params(cfg: ModelConfig, shardings_fn: Callable[[Any], Any], *, seed: int, dtype: str = "float32",
                  scale: float = 0.02, layer_start: int = 0, layer_end: int | None = None) -> Any:
    """Deterministic random parameters (norm scales 1, biases 0) for demo and benchmark models.

    Every value depends only on `seed` and the parameter's path, never on the sharding, so the
    same model comes out for any tp.
    """
    check_dtype(dtype)
    abstract = abstract_params(cfg, layer_start, layer_end, dtype)
    shardings = shardings_fn(abstract)

    def make(path, leaf, sharding):
        names = _names(path)
        shape = tuple(leaf.shape)
        if names[-1] == "bias":
            host = np.zeros(shape, np.float32)
        elif names[-1] == "scale":
            host = np.ones(shape, np.float32)
        else:
            key = _stable_hash("/".join(names))
            rng = np.random.default_rng([seed, key])
            host = (rng.standard_normal(shape, dtype=np.float32) * scale)
            if cfg.kv_replication > 1 and set(names) & _KV_MODULES and names[-1] == "kernel":
                # Draw the checkpoint-sized tensor, then repeat heads, as a real load would.
                ck_shape = (shape[0], shape[1] // cfg.kv_replication)
                base = np.random.default_rng([seed, key]).standard_normal(ck_shape, dtype=np.float32) * scale
                host = _transform(base.T, True, cfg.kv_replication, cfg.head_dim)
        host = host.astype(jnp.dtype(dtype))
        return jax.make_array_from_callback(shape, sharding, lambda idx: np.ascontiguousarray(host[idx]))

    return jax.tree_util.tree_map_with_path(make, abstract, shardings)


def _stable_hash(s: str) -> int:
    h = 2166136261
    for ch in s.encode():
        h = ((h ^ ch) * 16777619) % (2 ** 32)
    return h

"""`abstract_params` (one layer traced, repeated) gives the tree a full trace of the stage's init gives."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models import loader
from distserve_jax.models.attention import AttentionMetadata
from distserve_jax.models.decoder import DecoderStage, default_attention_fn


def _full_trace(cfg, start, end, dtype):
    model = DecoderStage(cfg, start, end, default_attention_fn(cfg), jnp.dtype(dtype))
    n = 2
    meta = AttentionMetadata(
        positions=jnp.zeros((n,), jnp.int32), slot_mapping=jnp.zeros((n,), jnp.int32),
        query_start_loc=jnp.array([0, n], jnp.int32), context_lens=jnp.zeros((1,), jnp.int32),
        seq_lens=jnp.full((1,), n, jnp.int32), block_tables=jnp.zeros((1, 1), jnp.int32),
        logits_indices=jnp.array([n - 1], jnp.int32), mode="prefill")
    page = jnp.zeros((cfg.num_kv_heads, 2, 16, cfg.head_dim), jnp.dtype(dtype))
    x = jnp.zeros((n,), jnp.int32) if start == 0 else jnp.zeros((n, cfg.hidden_size), jnp.dtype(dtype))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, meta, tuple((page, page) for _ in range(start, end))))


def _leaves(tree):
    return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2", "opt_project"])
def test_abstract_params_equal_a_full_trace(variant, hf_checkpoint):
    cfg = dataclasses.replace(resolve_model(hf_checkpoint(variant)).config.for_tp(4), num_layers=4)
    for start, end in [(0, 4), (0, 2), (2, 4), (1, 3)]:
        want = _leaves(_full_trace(cfg, start, end, "bfloat16")["params"])
        assert _leaves(loader.abstract_params(cfg, start, end, "bfloat16")) == want, (start, end)
        assert _leaves(loader.abstract_params(cfg, start, end, "bfloat16")) == want  # the cache is not mutated
    with pytest.raises(ValueError, match="not inside the model's 4 layers"):
        loader.abstract_params(cfg, 3, 5)

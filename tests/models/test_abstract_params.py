"""`abstract_params` (one layer traced, repeated) gives the tree a full trace of the stage's init gives."""

import dataclasses

import jax
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models import loader


def _leaves(tree):
    return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2", "opt_project"])
def test_abstract_params_equal_a_full_trace(variant, hf_checkpoint):
    cfg = dataclasses.replace(resolve_model(hf_checkpoint(variant)).config.for_tp(4), num_layers=4)
    for start, end in [(0, 4), (0, 2), (2, 4), (1, 3)]:
        # The whole stage traced at once (the one-layer trace of `abstract_params` runs on a smaller model).
        want = _leaves(loader._abstract_stage(cfg, start, end, "bfloat16"))
        assert _leaves(loader.abstract_params(cfg, start, end, "bfloat16")) == want, (start, end)
        assert _leaves(loader.abstract_params(cfg, start, end, "bfloat16")) == want  # the cache is not mutated
    with pytest.raises(ValueError, match="not inside the model's 4 layers"):
        loader.abstract_params(cfg, 3, 5)

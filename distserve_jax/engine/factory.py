"""Builds the engine core for a serving mode: `disaggregated`, `colocated` or `chunked`."""

from __future__ import annotations

from typing import Any

import jax

from distserve_jax.engine.llm_engine import EngineConfig, LLMEngine
from distserve_jax.engine.model_source import resolve_model

MODES = ("disaggregated", "colocated", "chunked")


def build_core(model: str, *, mode: str = "disaggregated", placement: Any = None, tp: int = 1,
               devices: list | None = None, **engine_kwargs) -> Any:
    """The engine core serving `model` in `mode` (see `AsyncEngine.from_model`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if placement is not None and mode != "disaggregated":
        raise ValueError(f"a placement only applies to mode='disaggregated', not {mode!r}")
    spec = resolve_model(model)
    devices = list(devices if devices is not None else jax.devices())
    if mode == "disaggregated":
        from distserve_jax.engine.disagg_engine import DisaggEngine
        return DisaggEngine(spec, placement=placement, devices=devices, config=EngineConfig(**engine_kwargs))
    policy = "prefill_first" if mode == "colocated" else "chunked"
    return LLMEngine(spec, tp=tp, devices=devices, config=EngineConfig(policy=policy, **engine_kwargs))

"""distserve-jax: disaggregated prefill/decode LLM serving on JAX.

Public API (imported lazily, so the pure-Python scheduler layer never pulls in JAX):
`LLM`, `SamplingParams`, `AsyncEngine`, `Placement`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "distserve_jax.engine.llm",
    "SamplingParams": "distserve_jax.sampling_params",
    "AsyncEngine": "distserve_jax.engine.async_engine",
    "Placement": "distserve_jax.engine.placement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distserve_jax' has no attribute {name!r}")

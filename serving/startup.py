"""Builds the server's engine core: model, placement (`auto` sized to the model), engine, warm-up.

Holds no flags, so tests and tools can build exactly what `serving.server` builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import logging


def resolve_placement(spec: str, num_devices: int, model_config: Any = None) -> Any:
    """`auto` -> `Placement.auto(num_devices, model_config)` (the largest tp that shards the model);
    otherwise `Placement.from_yaml(spec)`."""
    from distserve_jax.engine.placement import Placement  # Lazily: only disaggregated mode needs it.

    if spec == "auto":
        return Placement.auto(num_devices, model_config)
    if not Path(spec).is_file():
        raise ValueError(f"--placement {spec!r} is neither `auto` nor an existing file")
    return Placement.from_yaml(spec)


def build_core(mode: str, model: str, placement_spec: str, warmup: bool, engine_kwargs: dict[str, Any]
               ) -> tuple[Any, Any]:
    """Builds (and warms) the engine core; the server runs it off the event loop.

    `engine_kwargs` go to `factory.build_core` (with `tp` and `replicas` for colocated/chunked).
    Returns (core, placement); placement is None outside disaggregated mode.
    """
    import jax

    from distserve_jax.engine.factory import build_core as factory_build_core
    from distserve_jax.engine.model_source import resolve_model

    spec = resolve_model(model)
    placement = None
    if mode == "disaggregated":
        placement = resolve_placement(placement_spec, len(jax.devices()), spec.config)
    logging.info("building the %s engine for %s on %d devices", mode, model, len(jax.devices()))
    core = factory_build_core(spec, mode=mode, placement=placement, **engine_kwargs)
    if warmup and hasattr(core, "warmup"):
        logging.info("warming up (compiling step buckets)")
        n = core.warmup()
        logging.info("warm-up done (%s shapes)", n)
    return core, placement

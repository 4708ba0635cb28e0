"""Builds the server's engine core: model, placement (`auto` sized to the model), engine, warm-up.

Holds no flags, so tests and tools can build exactly what `serving.server` builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import logging


def resolve_placement(spec: str, num_devices: int, model_config: Any = None, *, model: str | None = None,
                      plan: dict[str, Any] | None = None, limits: dict[str, Any] | None = None) -> Any:
    """`auto` -> `Placement.auto(num_devices, model_config)` (the largest tp that shards the model);
    `plan` -> the planner's choice for `plan` (slo, rate, workload, profile_path) on these devices;
    otherwise `Placement.from_yaml(spec)`."""
    from distserve_jax.engine.placement import Placement  # Lazily: only disaggregated mode needs it.

    if spec == "auto":
        return Placement.auto(num_devices, model_config)
    if spec == "plan":
        if plan is None or model is None:
            raise ValueError("--placement=plan needs an SLO and --plan_rate")
        from distserve_jax.planner.autoplan import plan_placement

        return plan_placement(model, num_devices, plan["slo"], plan["rate"], limits=limits or {},
                              workload=plan["workload"], profile_path=plan["profile_path"])
    if not Path(spec).is_file():
        raise ValueError(f"--placement {spec!r} is neither `auto` nor an existing file")
    return Placement.from_yaml(spec)


def build_core(mode: str, model: str, placement_spec: str, warmup: bool, engine_kwargs: dict[str, Any],
               plan: dict[str, Any] | None = None) -> tuple[Any, Any]:
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
        limits = {k: v for k, v in engine_kwargs.items()
                  if k not in ("dtype", "executor", "ray_address", "tp", "replicas")}
        placement = resolve_placement(placement_spec, len(jax.devices()), spec.config, model=model, plan=plan,
                                      limits=limits)
    logging.info("building the %s engine for %s on %d devices", mode, model, len(jax.devices()))
    # Every Ray process loads the model itself, from its name or path.
    source = model if engine_kwargs.get("executor") == "ray" else spec
    core = factory_build_core(source, mode=mode, placement=placement, **engine_kwargs)
    if warmup and hasattr(core, "warmup"):
        logging.info("warming up (compiling step buckets)")
        n = core.warmup()
        logging.info("warm-up done (%s shapes)", n)
    return core, placement

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


def replan_settings(replan: str, *, mode: str, placement: str, plan_profile: str | None, interval_s: float,
                    min_gain: float, window_s: float, dwell_s: float) -> Any:
    """The replanner's settings for `--replan=on` (None for off); raises ValueError naming the flag
    when the settings cannot work (checked at start-up, before anything is built)."""
    if replan not in ("on", "off"):
        raise ValueError(f"--replan must be on or off, got {replan!r}")
    if replan == "off":
        return None
    if mode != "disaggregated":
        raise ValueError(f"--replan=on needs --mode=disaggregated: {mode} replicas have no placement to change")
    if placement != "plan" and not plan_profile:
        raise ValueError("--replan=on needs a planner profile: --placement=plan (profiles the devices, cached) or "
                         "--plan_profile=PROFILE.json")
    if plan_profile and not Path(plan_profile).is_file():
        raise ValueError(f"--plan_profile {plan_profile!r} is not a file")
    from distserve_jax.planner.replanner import ReplanSettings

    return ReplanSettings(interval_s=interval_s, min_gain=min_gain, window_s=window_s, dwell_s=dwell_s)


def build_core(mode: str, model: str, placement_spec: str, warmup: bool, engine_kwargs: dict[str, Any],
               plan: dict[str, Any] | None = None, replan: Any = None) -> tuple[Any, Any]:
    """Builds (and warms) the engine core; the server runs it off the event loop.

    `engine_kwargs` go to `factory.build_core` (with `tp` and `replicas` for colocated/chunked).
    `replan`: `ReplanSettings` (with `plan`: slo, rate, workload, profile_path) wraps the core in a
    replanning `MonitoredCore`; every core reports its workload window in `info()`.
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
    from distserve_jax.planner.online import MonitoredCore, build_replanner

    replanner = None
    if replan is not None:
        if plan is None:
            raise ValueError("--replan=on needs the SLO and plan workload (--slo, --plan_rate, --plan_workload)")
        replanner = build_replanner(core, replan, slo=plan["slo"], model=model, num_devices=len(jax.devices()),
                                    limits=limits, plan_rate=plan["rate"], plan_workload=plan["workload"],
                                    profile_path=plan["profile_path"])
        logging.info("replanner on: every %.0f s over a %.0f s window, switching for > %.0f%% gain",
                     replan.interval_s, replan.window_s, 100 * replan.min_gain)
    return MonitoredCore(core, replanner, window_s=replan.window_s if replan else 60.0), placement

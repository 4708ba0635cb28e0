"""Builds the engine for a serving mode: a controller over workers on disjoint devices.

- `disaggregated`: the placement's prefill and decode instances (`Placement`, default `auto`).
- `colocated` / `chunked`: `replicas` instances of `tp` devices each, every one running both
  phases (prefill-first or chunked-prefill scheduling): the baselines, on the same devices a
  disaggregated placement would use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import jax

from distserve_jax.engine.config import EngineConfig
from distserve_jax.engine.controller import Controller
from distserve_jax.engine.model_source import ModelSpec, resolve_model
from distserve_jax.engine.placement import Placement

MODES = ("disaggregated", "colocated", "chunked")
EXECUTORS = ("threads", "ray")


def build_core(model: str | ModelSpec, *, mode: str = "disaggregated", placement: Any = None, tp: int = 1,
               replicas: int = 1, devices: Sequence[Any] | None = None, executor: str = "threads",
               start_workers: bool = True, ray_address: str | None = None, **engine_kwargs) -> Controller:
    """The engine serving `model` in `mode` (see `AsyncEngine.from_model`). Bad arguments raise
    ValueError naming the problem before anything is built.

    `executor="threads"` runs every worker in a thread of this process on `devices`;
    `executor="ray"` runs each in its own Ray actor process (`ray_address`: a cluster to join, else a
    local Ray on loopback), which owns `tp * pp` devices of its own: the devices named here only
    size the placement.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; expected one of {EXECUTORS}")
    if executor == "ray" and not isinstance(model, (str, Path)):
        raise ValueError("executor='ray' needs the model as a name or path (each process loads it)")
    if executor != "ray" and ray_address is not None:
        raise ValueError("ray_address applies to executor='ray' only")
    if placement is not None and mode != "disaggregated":
        raise ValueError(f"a placement only applies to mode='disaggregated', not {mode!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    if replicas != 1 and mode == "disaggregated":
        raise ValueError("replicas applies to mode='colocated' or 'chunked'; a placement lists a disaggregated "
                         "deployment's instances")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    config = EngineConfig(**engine_kwargs, **({} if mode == "disaggregated" else
                                              {"policy": "prefill_first" if mode == "colocated" else "chunked"}))
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    devices = list(devices if devices is not None else jax.devices())
    if mode == "disaggregated":
        if placement is None or placement == "auto":
            placement = Placement.auto(len(devices), spec.config)
        elif isinstance(placement, (str, Path)):
            placement = Placement.from_yaml(placement)
        assigned = placement.assign(devices, spec.config)  # validates before anything is built
        instances = [(a.name, a.role, a.spec.tp, a.spec.pp, a.stages) for a in assigned]
        index = {id(d): i for i, d in enumerate(devices)}
        layout = [(a.name, a.role, a.spec.tp, a.spec.pp, tuple(index[id(d)] for s in a.stages for d in s))
                  for a in assigned]
        desc = placement.describe()
    else:
        spec.config.validate_tp(tp)
        if tp * replicas > len(devices):
            raise ValueError(f"{replicas} replica(s) of tp={tp} need {tp * replicas} devices, "
                             f"only {len(devices)} available")
        instances = [(f"{mode}-{i}", "colocated", tp, 1, (tuple(devices[i * tp:(i + 1) * tp]),))
                     for i in range(replicas)]
        desc = f"{replicas}x{mode}(tp{tp})" if replicas > 1 else f"{mode}(tp{tp})"
        layout = [(n, r, tp_, 1, tuple(range(i * tp, (i + 1) * tp))) for i, (n, r, tp_, _, _) in enumerate(instances)]
    rc = config.runner_config(spec.config.max_position_embeddings)
    roles = {name: role for name, role, *_ in instances}
    if executor == "ray":
        from distserve_jax.engine.ray_executor import RayExecutor
        ex = RayExecutor(str(model), [(n, r, tp_, pp_) for n, r, tp_, pp_, _ in instances], config,
                         address=ray_address, on_gpu=jax.default_backend() == "gpu", num_devices=len(devices))
        clock = time.time  # the workers' clock: comparable across processes (and, synced, hosts)
    else:
        from distserve_jax.engine.threads_executor import ThreadsExecutor
        ex = ThreadsExecutor(spec, instances, config, clock=time.perf_counter, start=start_workers, devices=devices)
        clock = time.perf_counter
    try:
        return Controller(spec, ex, roles, max_model_len=rc.max_model_len, mode=mode, placement=desc,
                          seed=config.seed, clock=clock, layout=layout)
    except BaseException:
        ex.shutdown()
        raise

"""`--placement=plan` for the server: a profile of the local devices (cached), then Alg. 2 on them.

Owns the server's planning step: it loads the cached profile of this model on these devices
(`~/.cache/distserve_jax/planner/profiles/`, or `profile_path`), or profiles them first (the
profiler imports JAX, which a server has loaded anyway), plans a placement for `rate` under
`slo` on one node of all visible devices (the devices of one host share its links), logs the
ranked candidates and the choice, and returns the `Placement` to serve.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from absl import logging

from distserve_jax.metrics import SLO
from distserve_jax.planner.latency_model import Profile
from distserve_jax.planner.workload import CACHE_DIR


def cached_profile(model: str, num_devices: int, limits: dict[str, Any], profile_path: str | None = None) -> Profile:
    """The local devices' profile of `model`: `profile_path`, else the cache, else profiled now (tp 1..n, pp 1)."""
    if profile_path:
        return Profile.load(profile_path)
    import jax

    from distserve_jax.planner import profile_cli

    key = hashlib.sha1(json.dumps([model, jax.default_backend(), num_devices, sorted(limits.items())]).encode())
    path = CACHE_DIR / "profiles" / f"{Path(model).name}-{key.hexdigest()[:12]}.json"
    if path.is_file():
        logging.info("planner: cached profile %s", path)
        return Profile.load(path)
    tps = [t for t in (1, 2, 4, 8) if t <= num_devices // 2]
    logging.info("planner: profiling %s at tp=%s on %d devices (once; cached in %s)", model, tps, num_devices, path)
    st = profile_cli.Settings(**{k: v for k, v in limits.items() if k in ("max_model_len", "block_size", "max_num_seqs",
                                                                          "max_num_batched_tokens")})
    prof, _ = profile_cli.run_profile(model, tps, [1], st, num_devices=num_devices, name=path.stem)
    prof.save(path)
    return prof


def plan_placement(model: str, num_devices: int, slo: SLO, rate: float, *, limits: dict[str, Any],
                   workload: str = "sharegpt", profile_path: str | None = None, num_requests: int = 200) -> Any:
    """The placement Alg. 2 chooses for `rate` on the local devices (see the module docstring)."""
    from distserve_jax.planner import goodput as g
    from distserve_jax.planner import search
    from distserve_jax.planner import workload as wl

    prof = cached_profile(model, num_devices, limits, profile_path)
    lim = {k: v for k, v in limits.items() if k in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                                                    "max_model_len")}
    lens = wl.lengths(workload, num_requests, max_model_len=lim.get("max_model_len", 2048),
                      tokenizer=model if Path(model).is_dir() else "demo")
    plan = search.alg2(prof, search.Cluster(1, num_devices), g.Workload.make(lens, name=workload), slo, rate, limits=lim)
    for i, s in enumerate(plan.ranked[:5]):
        logging.info("planner: #%d %s: %.3f req/s, %.3f per device", i + 1, s.unit.describe(), s.goodput, s.per_gpu)
    if plan.placement is None:
        raise g.NoFittingPlacementError(f"--placement=plan: {plan.error}")
    logging.info("planner: serving %s (predicted attainment %.3f at %s req/s)", plan.placement.describe(),
                 plan.attainment_at_rate, rate)
    return to_engine_placement(plan.placement)


def to_engine_placement(dep: Any, *, devices: bool = True) -> Any:
    """A disaggregated `Deployment` as the engine's `Placement` (with its device ids, or none: the
    engine picks free ones)."""
    from distserve_jax.engine.placement import InstanceSpec, Placement

    d = dep.to_placement_dict()

    def spec(i: dict) -> InstanceSpec:
        return InstanceSpec(i["tp"], i.get("pp", 1), tuple(i["devices"]) if devices else None)
    return Placement(tuple(map(spec, d["prefill"])), tuple(map(spec, d["decode"])))

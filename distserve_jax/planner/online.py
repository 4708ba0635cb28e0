"""The replanner on a serving engine: `MonitoredCore` and how a server builds its replanner.

`MonitoredCore` is the engine core `AsyncEngine` drives (its `EngineCore` interface) over a
`Controller`: every call goes to the controller, and
  - `step()` ticks the `Replanner` after the controller's step, on the engine's thread (the
    search runs in the replanner's own thread; only applying its answer happens here);
  - `has_unfinished_requests()` stays true while a placement change or a search is in progress,
    so the engine keeps stepping (the change progresses, the answer gets applied) when idle;
  - `info()` adds `workload` (the monitor's window: rate, prompt/output length statistics) and,
    with a replanner, `replanner` (drift, last proposal, number of changes): what the
    Prometheus gauges export.
`build_replanner` makes the server's replanner: the profile `--placement=plan` uses, the workload
the starting placement was planned for (`--plan_rate`, `--plan_workload`) and a device budget
of the devices the engine sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distserve_jax.metrics import SLO
from distserve_jax.planner import drift as dr
from distserve_jax.planner.replan_search import WindowPlanner
from distserve_jax.planner.replanner import Replanner, ReplanSettings


class MonitoredCore:
    """A controller with its workload window (and replanner) in `info()` (see the module docstring)."""

    def __init__(self, core: Any, replanner: Replanner | None = None, *, window_s: float = 60.0):
        self.core, self.replanner, self.window_s = core, replanner, window_s

    def __getattr__(self, name: str) -> Any:  # add_request, abort_request, wake, warmup, spec, ...
        return getattr(self.core, name)

    def step(self) -> list:
        out = self.core.step()
        if self.replanner is not None:
            self.replanner.tick()
        return out

    def has_unfinished_requests(self) -> bool:
        return (self.core.has_unfinished_requests() or bool(getattr(self.core, "changing_placement", False))
                or (self.replanner is not None and self.replanner.busy))

    def info(self) -> dict[str, Any]:
        d = self.core.info()
        d["workload"] = self.core.monitor.window(self.core.clock(), self.window_s).summary()
        if self.replanner is not None:
            d["replanner"] = self.replanner.info()
        return d

    def shutdown(self) -> None:
        if self.replanner is not None:
            self.replanner.shutdown()
        self.core.shutdown()


def build_replanner(core: Any, settings: ReplanSettings, *, slo: SLO, model: str, num_devices: int,
                    limits: dict[str, Any], plan_rate: float, plan_workload: str,
                    profile_path: str | None = None, target: float = 0.9) -> Replanner:
    """The server's replanner over `core` (a `Controller`), planning on `num_devices` devices."""
    from distserve_jax.planner import workload as wl
    from distserve_jax.planner.autoplan import cached_profile

    prof = cached_profile(model, num_devices, limits, profile_path)
    lim = {k: v for k, v in limits.items() if k in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                                                    "max_model_len")}
    lens = wl.lengths(plan_workload, settings.num_requests, max_model_len=lim.get("max_model_len", 2048),
                      tokenizer=model if Path(model).is_dir() else "demo")
    planner = WindowPlanner(prof, slo, budget=num_devices, limits=lim, target=target,
                            num_requests=settings.num_requests)
    return Replanner(core, planner, dr.PlannedWorkload(plan_rate, tuple(lens)), settings, background=True)

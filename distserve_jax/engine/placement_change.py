"""A live placement change: what it is (`PlacementChange`), what it does (`plan_change`) and its run.

`Controller.apply_placement(target)` compares the instances it serves with `target`:
  - an instance of the same role, tp and pp (and devices, where the target names them and the
    executor fixes devices) is **kept**: it runs on, untouched;
  - a target instance with no match is **added**: started first (`executor.add_worker`); it takes
    requests once it has joined (`WorkerJoined`);
  - a served instance with no match is **leaving**: once the added instances have joined, no new
    request is routed to it; it finishes what it holds (a prefill worker until its requests were
    pulled, a decode worker until its requests finish), then it is removed (`remove_worker`).
With fixed devices (the threads executor), an added instance that needs devices of a leaving one
waits for that one to drain and be removed; the leaving instance stops taking requests at once.

`ChangeRun` is the controller's bookkeeping of one change in progress; this module reads no clock
and touches no device (the controller passes times in), so the simulator drives the same code.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from distserve_jax.engine.placement import InstanceSpec, Placement

STATES = ("starting", "draining", "done", "failed")


class PlacementChangeInProgress(RuntimeError):
    """`apply_placement` was called while an earlier change is still starting or draining."""


@dataclasses.dataclass(frozen=True)
class PlacementChange:
    """One placement change as `Controller.placement_change` and `info()` report it.

    `state`: "starting" (added instances are starting), "draining" (they joined; leaving instances
    finish what they hold), "done" or "failed" (`error` says why). Times are the controller's clock.
    """

    target_desc: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    state: str
    started_at: float
    finished_at: float | None = None
    error: str | None = None

    def info(self) -> dict:
        return {"target": self.target_desc, "state": self.state, "added": list(self.added),
                "removed": list(self.removed), "started_at": self.started_at, "finished_at": self.finished_at,
                "error": self.error}


@dataclasses.dataclass(frozen=True)
class LiveInstance:
    """An instance the controller serves. `devices`: indices into the executor's device list, or
    None where the executor gives each instance devices of its own (Ray, the simulator)."""

    name: str
    role: str
    tp: int
    pp: int
    devices: tuple[int, ...] | None = None

    def spec(self) -> InstanceSpec:
        return InstanceSpec(tp=self.tp, pp=self.pp, devices=self.devices)


@dataclasses.dataclass(frozen=True)
class NewInstance(LiveInstance):
    """An instance to add; `waits_for`: leaving instances whose devices it takes (removed first)."""

    waits_for: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ChangePlan:
    kept: tuple[str, ...]
    added: tuple[NewInstance, ...]
    removed: tuple[str, ...]


def _match(current: list[LiveInstance], spec: InstanceSpec, fixed_devices: bool) -> LiveInstance | None:
    for inst in current:
        if (inst.tp, inst.pp) != (spec.tp, spec.pp):
            continue
        if fixed_devices and spec.devices is not None and tuple(inst.devices or ()) != spec.devices:
            continue
        return inst
    return None


def plan_change(current: Sequence[LiveInstance], target: Placement, *, num_devices: int | None,
                fixed_devices: bool, taken_names: Iterable[str]) -> ChangePlan:
    """What to keep, add and remove to go from `current` to `target` (see the module docstring).

    `num_devices`: how many devices the executor can give (None: no limit known); with
    `fixed_devices` the added instances get device indices (explicit ones from the target, else
    free ones first, then those of leaving instances). `taken_names`: names never to reuse.
    Raises ValueError naming the problem (too many devices, a device of a kept instance, ...).
    """
    if not isinstance(target, Placement):
        raise ValueError(f"a placement change needs an engine Placement, got {type(target).__name__}")
    if num_devices is not None and target.num_devices > num_devices:
        raise ValueError(f"placement {target.describe()} needs {target.num_devices} devices, "
                         f"the executor has {num_devices}")
    taken = set(taken_names)
    kept: list[LiveInstance] = []
    new: list[tuple[str, InstanceSpec]] = []
    for role, specs in (("prefill", target.prefill), ("decode", target.decode)):
        pool = [i for i in current if i.role == role]
        # Explicit devices first, so an unpinned spec does not take the instance a pinned one names.
        for spec in sorted(specs, key=lambda s: s.devices is None):
            inst = _match(pool, spec, fixed_devices)
            if inst is None:
                new.append((role, spec))
            else:
                pool.remove(inst)
                kept.append(inst)
    kept_names = {i.name for i in kept}
    leaving = [i for i in current if i.name not in kept_names]

    owner: dict[int, str] = {}  # device index -> the leaving instance that has it
    kept_devs: dict[int, str] = {}
    if fixed_devices:
        for i in kept:
            kept_devs.update({d: i.name for d in i.devices or ()})
        for i in leaving:
            owner.update({d: i.name for d in i.devices or ()})
    claimed: set[int] = set()
    added: list[NewInstance] = []
    next_index = {"prefill": 0, "decode": 0}

    def fresh(role: str) -> str:
        while f"{role}-{next_index[role]}" in taken:
            next_index[role] += 1
        name = f"{role}-{next_index[role]}"
        taken.add(name)
        return name

    explicit = [(r, s) for r, s in new if fixed_devices and s.devices is not None]
    implicit = [(r, s) for r, s in new if not (fixed_devices and s.devices is not None)]
    planned: list[tuple[str, InstanceSpec, tuple[int, ...] | None]] = []
    for role, spec in explicit:
        for d in spec.devices:
            if num_devices is not None and not 0 <= d < num_devices:
                raise ValueError(f"new {role} instance: device id {d} does not exist (devices 0..{num_devices - 1})")
            if d in kept_devs:
                raise ValueError(f"new {role} instance: device {d} belongs to {kept_devs[d]}, which the target keeps")
            if d in claimed:
                raise ValueError(f"new {role} instances overlap on device {d}")
            claimed.add(d)
        planned.append((role, spec, spec.devices))
    total = num_devices or 0
    free = [d for d in range(total) if d not in kept_devs and d not in owner and d not in claimed]
    reusable = [d for d in sorted(owner) if d not in claimed]
    for role, spec in implicit:
        if not fixed_devices:
            planned.append((role, spec, None))
            continue
        n = spec.num_devices
        if len(free) + len(reusable) < n:
            raise ValueError(f"new {role} instance ({spec.describe()}) needs {n} devices but only "
                             f"{len(free) + len(reusable)} are not kept by other instances")
        take, free = free[:n], free[n:]
        more = n - len(take)
        take, reusable = take + reusable[:more], reusable[more:]
        planned.append((role, spec, tuple(take)))
    for role, spec, devs in planned:
        added.append(NewInstance(fresh(role), role, spec.tp, spec.pp, devs,
                                 frozenset(owner[d] for d in devs or () if d in owner)))
    return ChangePlan(tuple(i.name for i in kept), tuple(added), tuple(i.name for i in leaving))


@dataclasses.dataclass
class ChangeRun:
    """The controller's state of the change in progress.

    `waiting`: added instances not started yet (their devices are still a leaving instance's);
    `starting`: started, not joined; `leaving`: still served by the executor; `draining`: leaving
    instances no new request goes to; `checks`: leaving instance -> the `Sync` token whose answer
    confirms it is empty; `handed`: requests a leaving decode worker was asked to hand off.
    """

    change: PlacementChange
    target: Placement
    waiting: dict[str, NewInstance]
    starting: dict[str, NewInstance]
    leaving: set[str]
    draining: set[str]
    checks: dict[str, int] = dataclasses.field(default_factory=dict)
    handoff: bool = True  # leaving decode workers hand their requests to remaining ones
    handed: set[str] = dataclasses.field(default_factory=set)  # request keys sent `HandOff`

    def update(self, now: float) -> PlacementChange:
        """Moves the reported state on: draining once every started instance joined, done once
        nothing is left to start or remove."""
        c = self.change
        if c.state in ("done", "failed"):
            return c
        if not self.starting and not self.waiting and not self.leaving:
            c = dataclasses.replace(c, state="done", finished_at=now)
        elif not self.starting and c.state == "starting":
            c = dataclasses.replace(c, state="draining")
        self.change = c
        return c

    def fail(self, now: float, error: str) -> PlacementChange:
        self.change = dataclasses.replace(self.change, state="failed", finished_at=now, error=error)
        return self.change

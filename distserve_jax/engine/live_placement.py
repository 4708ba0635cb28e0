"""The controller's side of a live placement change (`apply_placement`), as a mixin of `Controller`.

`apply_placement(target)` validates the target, plans the change (`placement_change.plan_change`)
and starts the added instances; `Controller.step()` then moves it on (`_progress_change`):
  1. added instances start (`executor.add_worker`); each one takes requests once its
     `WorkerJoined` arrived;
  2. once every started instance joined, no new request goes to a leaving instance (with fixed
     devices, a leaving instance whose devices an added one needs stops taking requests at once);
  3. a leaving instance that holds nothing by the controller's account is asked for a `Sync`; when
     its answer shows an empty worker (no request, every KV block free), it is removed
     (`executor.remove_worker`), and the added instances that waited for its devices start;
  4. the change is "done" once nothing is left to start or remove.
No request is dropped or recomputed on the way: a leaving prefill worker keeps serving the pulls
of what it prefilled; a leaving decode worker hands its requests off (`HandOff`: it pauses each
one once its tokens in flight have landed and reports it `HandedOff` with its block table, and a
remaining decode worker pulls the KV from it like a prefill's; sampling depends only on a
request's seed and position, so its tokens are the same), or, with `handoff=False` or no other
decode worker, decodes them to the end. A new instance that
fails to start fails the change ("failed"; the instances not yet removed serve on).

The mixin reads time only from the controller's clock and talks to workers only by messages.
"""

from __future__ import annotations

import collections
from typing import Any

from absl import logging

from distserve_jax.engine import messages as m
from distserve_jax.engine.placement import Placement
from distserve_jax.engine.placement_change import (ChangeRun, LiveInstance, NewInstance, PlacementChange,
                                                   PlacementChangeInProgress, plan_change)
from distserve_jax.scheduler.request import RequestStatus


def _empty(load: m.WorkerLoad) -> bool:
    return (load.num_waiting == load.num_running == load.num_incoming == load.num_waiting_migration == 0
            and load.free_blocks == load.total_blocks)


class LivePlacement:
    """`Controller` methods for changing the placement while serving (see the module docstring)."""

    # ------------------------------------------------------------ public
    @property
    def changing_placement(self) -> bool:
        """A placement change is starting or draining (the front end keeps stepping the controller)."""
        return self._change is not None

    def current_placement(self) -> Placement | None:
        """The placement served now (instances leaving in a change included until removed; devices
        as indices into the executor's device list where it fixes them). None for colocated replicas,
        and during a change while a phase has no instance (its last one was removed to free the
        devices of its replacement, which is starting)."""
        insts = [self._layout[n] for n in self.roles]
        if any(i.role == "colocated" for i in insts) or {i.role for i in insts} != {"prefill", "decode"}:
            return None  # replicas, or a change between removing a phase's last instance and starting its new one
        return Placement(tuple(i.spec() for i in insts if i.role == "prefill"),
                         tuple(i.spec() for i in insts if i.role == "decode"))

    def apply_placement(self, target: Placement | dict, *, handoff: bool = True) -> PlacementChange:
        """Starts moving to `target` without dropping a request (non-blocking; `step()` moves it on).

        With `handoff`, a leaving decode instance hands its requests to the remaining decode
        instances (each pulls the request's KV from it, the way it pulls a prefill's), so removing
        it does not wait for its longest request; without, it decodes them to the end.

        Raises `PlacementChangeInProgress` while an earlier change runs, and ValueError (before
        anything changes) for a target this engine cannot serve: no instance for a phase, more
        devices than the executor has, a tp or pp the model does not divide, a device a kept
        instance uses, or an engine of colocated replicas.
        """
        if self._dead is not None:
            raise self._dead
        if self._change is not None:
            c = self._change.change
            raise PlacementChangeInProgress(f"the change to {c.target_desc} is still {c.state}; "
                                            f"apply a new placement once it is done")
        if isinstance(target, dict):
            target = Placement.from_dict(target)
        if not isinstance(target, Placement):
            raise ValueError(f"apply_placement needs a Placement, got {type(target).__name__}")
        if "colocated" in self.roles.values():
            raise ValueError(f"this engine runs {self.mode} replicas; apply_placement changes a disaggregated "
                             f"deployment")
        ex = self.executor
        if not (hasattr(ex, "add_worker") and hasattr(ex, "remove_worker")):
            raise ValueError(f"the {getattr(ex, 'kind', type(ex).__name__)} executor cannot add or remove workers")
        cfg = self.spec.config
        if hasattr(cfg, "validate_tp") and hasattr(cfg, "num_layers"):
            target.validate(cfg)
        plan = plan_change([self._layout[n] for n in self.roles], target,
                           num_devices=getattr(ex, "num_devices", None),
                           fixed_devices=bool(getattr(ex, "fixed_devices", False)), taken_names=self._names_used)
        self._names_used.update(i.name for i in plan.added)
        change = PlacementChange(target.describe(), tuple(i.name for i in plan.added), plan.removed, "starting",
                                 self.clock())
        blocking = set().union(*(i.waits_for for i in plan.added))
        run = ChangeRun(change, target, waiting={i.name: i for i in plan.added if i.waits_for}, starting={},
                        leaving=set(plan.removed), draining=blocking, handoff=bool(handoff))
        self._change, self.placement_change = run, change
        logging.info("placement change %s -> %s: adding %s, removing %s (kept %s)", self.placement,
                     change.target_desc, list(change.added), list(change.removed), list(plan.kept))
        for inst in plan.added:
            if not inst.waits_for:
                self._start_worker(inst)
        if self._change is not None:
            self._progress_change()
        return self.placement_change

    # ------------------------------------------------------------ progress (from step())
    def _start_worker(self, inst: NewInstance) -> None:
        self._change.starting[inst.name] = inst
        try:
            self.executor.add_worker(inst.name, inst.role, inst.tp, inst.pp, inst.devices)
        except Exception as e:  # noqa: BLE001 - the change fails; what serves now serves on
            self._fail_change(f"could not start {inst.name}: {type(e).__name__}: {e}")

    def _on_new_worker_event(self, e: Any) -> bool:
        """A `WorkerJoined` / `WorkerFailed` of an instance this change started; False for others."""
        run = self._change
        joined = isinstance(e, m.WorkerJoined)
        name = e.load.name if joined else e.worker
        if name not in run.starting:
            return False
        inst = run.starting.pop(name)
        if not joined:
            self._fail_change(f"new instance {name} failed to start: {e.error}")
            return True
        logging.info("%s (%s %s) joined", name, inst.role, inst.spec().describe())
        self.roles[name] = inst.role
        self.loads[name] = e.load
        self._layout[name] = LiveInstance(name, inst.role, inst.tp, inst.pp, inst.devices)
        if inst.role != "decode":
            self._queued[name] = 0
        self._describe_placement()
        parked, self._parked = self._parked, collections.deque()
        for tr in parked:
            self._admit(tr)
        return True

    def _describe_placement(self) -> None:
        now = self.current_placement()
        if now is not None:
            self.placement = now.describe()

    def _holds_anything(self, name: str) -> bool:
        return self._queued.get(name, 0) > 0 or any(name in tr.holders or tr.source == name
                                                    for tr in self._tracked.values())

    def _progress_change(self) -> None:
        run = self._change
        if not run.starting:  # every started instance serves: the leaving ones take no more requests
            run.draining |= run.leaving
        if run.handoff:
            self._hand_off(run)
        for name in sorted(run.draining & run.leaving):
            if not self.loads[name].alive:
                self._remove(name)  # it failed: what it held was recomputed or failed already
                continue
            if self._holds_anything(name):
                run.checks.pop(name, None)
                continue
            token = run.checks.get(name)
            if token is None:  # confirm from the worker itself: every command applied, nothing held
                run.checks[name] = token = next(self._sync_tokens)
                self.executor.send(name, m.Sync(token))
                continue
            got = self._synced.get(token, {}).pop(name, None)
            if got is None:
                continue
            self._synced.pop(token, None)
            del run.checks[name]
            if _empty(got.load):
                self._remove(name)
            else:
                logging.warning("%s holds nothing by the controller's account but reports %s; waiting",
                                name, got.load)
        if self._change is None:
            return
        for name, inst in list(run.waiting.items()):
            if not inst.waits_for & set(self.roles):
                del run.waiting[name]
                self._start_worker(inst)
                if self._change is None:
                    return
        self.placement_change = run.update(self.clock())
        if self.placement_change.state == "done":
            self.placement_changes["done"] += 1
            self._change = None
            logging.info("placement change to %s done in %.2fs", self.placement_change.target_desc,
                         self.placement_change.finished_at - self.placement_change.started_at)

    def _hand_off(self, run: ChangeRun) -> None:
        """Asks each draining decode worker to hand off the requests it decodes (or is pulling),
        once a decode worker that stays can take them."""
        draining = [n for n in run.draining if self.roles.get(n) == "decode" and self.loads[n].alive]
        if not draining or not any(self.loads[n].alive for n in self.decode_workers if n not in run.draining):
            return
        for tr in self._tracked.values():
            if tr.key in run.handed or tr.req.status not in (RequestStatus.RUNNING, RequestStatus.MIGRATING):
                continue
            for name in draining:
                if name in tr.holders and tr.source != name:
                    run.handed.add(tr.key)
                    self.executor.send(name, m.HandOff(tr.key))

    def _remove(self, name: str) -> None:
        run = self._change
        try:
            self.executor.remove_worker(name)
        except Exception as e:  # noqa: BLE001
            logging.exception("removing %s failed", name)
            self._fail_change(f"could not remove {name}: {type(e).__name__}: {e}")
            return
        logging.info("%s drained and removed", name)
        for table in (self.roles, self.loads, self._queued, self._layout):
            table.pop(name, None)
        self._refused.discard(name)
        run.leaving.discard(name)
        run.draining.discard(name)
        run.checks.pop(name, None)
        self._describe_placement()

    def _fail_change(self, error: str) -> None:
        """Ends the change as "failed": instances still starting are stopped; those not removed yet
        serve on (they take requests again)."""
        run = self._change
        for name in list(run.starting):
            try:
                self.executor.remove_worker(name)
            except Exception:  # noqa: BLE001 - it never joined
                logging.exception("stopping %s failed", name)
        self.placement_change = run.fail(self.clock(), error)
        self.placement_changes["failed"] += 1
        self._change = None
        logging.error("placement change to %s failed: %s", run.change.target_desc, error)
        parked, self._parked = self._parked, collections.deque()
        for tr in parked:
            self._admit(tr)

"""`executor="threads"`: every worker in its own thread of this process, each on its own devices.

The executor builds each instance's `ModelRunner`, `BlockManager` and scheduler, wraps them in an
`InstanceWorker` and runs the worker's loop in a thread: apply every queued command, emit a
`Status` when any was applied, run a step while there is work, sleep on the command queue when
there is none. Commands reach a worker through its own queue; every worker's events go to one
queue the controller reads. JAX releases the GIL while devices run, so the workers' steps overlap.

KV moves between threads by a pull: a decode worker gathers the blocks from the prefill worker's
cache and scatters them into its own (`KVMigrator`), holding the source's pages lock only while
the gather is dispatched, the same lock the source holds while it launches a step (a step swaps
in the donated pages). A pull from a worker that has failed raises `KVSourceError`.

A worker whose command or step raises emits `WorkerFailed` with the requests it held, and its
thread ends: its cache may be half-updated, so it serves nothing more.

Live placement changes: `add_worker` builds a new instance on devices of the executor's device
list (a background thread builds it, compiles its steps first once the deployment was warmed up,
and the controller's next `poll` registers it and reports `WorkerJoined`; without threads it is
built at once); `remove_worker` stops a drained worker and drops its runner, so its devices can
host a new instance. Devices are fixed: a device serves one instance at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging

from distserve_jax.engine import messages as m
from distserve_jax.engine.config import EngineConfig
from distserve_jax.engine.model_source import ModelSpec
from distserve_jax.engine.worker import STOP, InstanceWorker, KVSourceError, RaiseCommand
from distserve_jax.runtime.kv_transfer import KVMigrator
from distserve_jax.runtime.model_runner import ModelRunner
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.factory import make_scheduler  # noqa: F401 - also re-exported from here
from distserve_jax.scheduler.policies import SchedulerConfig



class _Slot:
    """One worker and what its thread needs."""

    def __init__(self, worker: InstanceWorker):
        self.worker = worker
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()  # the pages lock (see the module docstring)
        self.alive = True
        self.thread: threading.Thread | None = None
        self.devices: list[Any] = []  # the jax devices it runs on


class ThreadsExecutor:
    """Hosts the workers of a deployment as threads (see the module docstring).

    Args:
      spec: the model.
      instances: `(name, role, tp, pp, stages)` per worker; `stages` are pp tuples of tp devices.
      config: engine sizes and policy.
      clock: the workers' clock.
      start: run each worker in its own thread (the default); with False the workers take one
        turn each per `poll`, on the caller's thread, in a fixed order (deterministic tests).
    """

    def __init__(self, spec: ModelSpec, instances: Sequence[tuple[str, str, int, int, Sequence[Sequence[Any]]]],
                 config: EngineConfig, clock: Callable[[], float] = time.perf_counter, start: bool = True,
                 devices: Sequence[Any] | None = None):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.spec, self.config, self.clock = spec, config, clock
        self._rc = config.runner_config(spec.config.max_position_embeddings)
        self._sc = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens)
        # The devices instances may use (`add_worker` takes indices into this list).
        self.device_pool = list(devices) if devices is not None else \
            list(dict.fromkeys(d for *_, stages in instances for s in stages for d in s))
        self.num_devices = len(self.device_pool)
        self.warm_new_workers = False  # set by `Controller.warmup`
        self.slots: dict[str, _Slot] = {}
        self._built: queue.SimpleQueue = queue.SimpleQueue()  # (name, slot or error) from add_worker threads
        self._adding: dict[str, set[int]] = {}  # being built -> the ids of its devices
        self._migrators: dict[tuple[str, str], KVMigrator] = {}
        self._migrators_lock = threading.Lock()
        for name, role, tp, pp, stages in instances:
            self.slots[name] = self._build(name, role, tp, pp, stages)
        self.threaded = start
        for slot in self.slots.values() if start else ():
            self._start_thread(slot)

    fixed_devices = True  # an instance runs on devices of `device_pool`, one instance per device

    def _build(self, name: str, role: str, tp: int, pp: int, stages: Sequence[Sequence[Any]]) -> _Slot:
        runner = ModelRunner(self.spec.config, [make_mesh(list(s)) for s in stages], self.spec.weights, self._rc)
        blocks = BlockManager(runner.num_blocks, self._rc.block_size)
        sched = make_scheduler(role, self.config.policy, self._sc, blocks)
        devices = tuple(d.id for s in stages for d in s)
        slot = _Slot(None)  # type: ignore[arg-type]
        slot.devices = [d for s in stages for d in s]
        slot.worker = InstanceWorker(
            name, role, runner=runner, blocks=blocks, scheduler=sched, emit=self.events.put, clock=self.clock,
            async_scheduling=self.config.async_scheduling, tp=tp, pp=pp, devices=devices,
            kv_pull=(lambda cmd, db, name=name: self._pull(cmd.source, name, list(cmd.source_blocks), db))
            if role == "decode" else None,
            warmup=lambda name=name, role=role: self._warmup(name, role), pages_lock=slot.lock)
        logging.info("%s: %s tp=%d pp=%d on devices %s, %d KV blocks", name, role, tp, pp, list(devices),
                     blocks.num_total)
        return slot

    def _start_thread(self, slot: _Slot) -> None:
        slot.thread = threading.Thread(target=self._run, args=(slot,), name=f"worker-{slot.worker.name}",
                                       daemon=True)
        slot.thread.start()

    # ------------------------------------------------------------ live placement changes
    def add_worker(self, name: str, role: str, tp: int, pp: int, devices: Sequence[Any] | None = None) -> None:
        """Starts a new instance on `devices` (indices into `device_pool`, or devices; default: the
        first free ones). It joins (`WorkerJoined`, from a later `poll`) once built (and compiled,
        if the deployment was warmed up). Raises ValueError for a name in use or devices not free."""
        if name in self.slots or name in self._adding:
            raise ValueError(f"a worker named {name!r} already exists")
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"unknown worker role {role!r}")
        used = {d.id for s in self.slots.values() for d in s.devices}.union(*self._adding.values())
        if devices is None:
            devs = [d for d in self.device_pool if d.id not in used][:tp * pp]
        else:
            devs = [self.device_pool[d] if isinstance(d, int) else d for d in devices]
        if len(devs) != tp * pp:
            raise ValueError(f"{name}: tp={tp}, pp={pp} needs {tp * pp} devices, {len(devs)} are free or given")
        busy = [d.id for d in devs if d.id in used]
        if busy:
            raise ValueError(f"{name}: devices {busy} still serve another instance")
        stages = [devs[s * tp:(s + 1) * tp] for s in range(pp)]
        self._adding[name] = {d.id for d in devs}

        def build() -> None:
            try:
                slot = self._build(name, role, tp, pp, stages)
                if self.warm_new_workers:
                    slot.worker.runner.warmup(slot.worker.warmup_modes)
                self._built.put((name, slot))
            except BaseException as e:  # noqa: BLE001 - reported as the new worker's failure
                logging.exception("building %s failed", name)
                self._built.put((name, e))
            self.events.put(None)  # wakes the controller's poll

        if self.threaded:
            threading.Thread(target=build, name=f"build-{name}", daemon=True).start()
        else:
            build()

    def remove_worker(self, name: str, timeout: float = 10.0) -> None:
        """Stops a worker (the controller calls it once the worker holds nothing) and drops it; a
        worker still being built is dropped when it is done."""
        if name in self._adding:
            del self._adding[name]  # `_register` drops it when its build ends
            return
        slot = self.slots.pop(name, None)
        if slot is None:
            raise ValueError(f"no worker named {name!r}")
        slot.inbox.put(STOP)
        if slot.thread is not None:
            slot.thread.join(timeout)
            if slot.thread.is_alive():
                logging.warning("worker %s did not stop within %.0fs", name, timeout)
        with slot.lock:
            slot.alive = False
        with self._migrators_lock:
            for key in [k for k in self._migrators if name in k]:
                del self._migrators[key]

    def _register(self) -> list[Any]:
        """Controller thread: built workers join (their `WorkerJoined` or `WorkerFailed` events)."""
        out = []
        while True:
            try:
                name, built = self._built.get_nowait()
            except queue.Empty:
                return out
            if name not in self._adding:
                continue  # removed while it was being built: dropped here (its runner with it)
            del self._adding[name]
            if isinstance(built, BaseException):
                out.append(m.WorkerFailed(name, f"{type(built).__name__}: {built}", ()))
                continue
            self.slots[name] = built
            if self.threaded:
                self._start_thread(built)
            out.append(m.WorkerJoined(built.worker.load()))

    # ------------------------------------------------------------ controller side
    @property
    def workers(self) -> dict[str, InstanceWorker]:
        return {n: s.worker for n, s in self.slots.items()}

    def send(self, name: str, cmd: Any) -> None:
        self.slots[name].inbox.put(cmd)

    def poll(self, timeout: float | None) -> list[Any]:
        """The events emitted since the last poll, waiting up to `timeout` seconds for the first one.

        Without threads, it first gives every worker one turn (a step of the whole deployment).
        """
        if not self.threaded:
            self._drive()
            timeout = 0
        joined = self._register()
        events = m.drain(self.events, 0 if joined else timeout or 0)
        return joined + events + self._register()

    def wake(self) -> None:
        """Ends a `poll` that is waiting (a new command for the controller)."""
        self.events.put(None)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._adding.clear()
        for slot in self.slots.values():
            slot.inbox.put(STOP)
        for slot in self.slots.values():
            if slot.thread is not None:
                slot.thread.join(timeout)
                if slot.thread.is_alive():
                    logging.warning("worker %s did not stop within %.0fs", slot.worker.name, timeout)

    def kill(self, name: str, error: BaseException) -> None:
        """Makes a worker fail at its next command (tests: a worker whose step raises)."""
        self.slots[name].inbox.put(RaiseCommand(error))

    # ------------------------------------------------------------ worker threads
    def _iterate(self, slot: _Slot, block: bool) -> bool:
        return slot.worker.turn(slot.inbox, block=block, step_after_sync=self.threaded)

    def _run(self, slot: _Slot) -> None:
        try:
            while self._iterate(slot, block=True):
                pass
        except BaseException as e:  # noqa: BLE001 - reported to the controller, which fails its requests
            self._fail(slot, e)

    def _fail(self, slot: _Slot, e: BaseException) -> None:
        with slot.lock:
            slot.alive = False
        w = slot.worker
        logging.exception("worker %s failed", w.name)
        self.events.put(m.WorkerFailed(w.name, f"{type(e).__name__}: {e}", tuple(w.held_request_ids())))

    def _drive(self) -> None:
        """Without threads (`start=False`): one turn of every live worker, in order, on this thread."""
        for slot in list(self.slots.values()):
            if not slot.alive:
                continue
            try:
                if not self._iterate(slot, block=False):
                    slot.alive = False
            except BaseException as e:  # noqa: BLE001 - as in a worker thread
                self._fail(slot, e)

    # ------------------------------------------------------------ KV pulls and warm-up
    def _migrator(self, src: str, dst: str) -> KVMigrator:
        with self._migrators_lock:
            key = (src, dst)
            if key not in self._migrators:
                self._migrators[key] = KVMigrator(self.slots[src].worker.runner, self.slots[dst].worker.runner)
            return self._migrators[key]

    def _pull(self, src: str, dst: str, src_blocks: list[int], dst_blocks: list[int]):
        """Runs on the decode worker's thread: dispatches the gather under the source's pages lock."""
        mig = self._migrator(src, dst)
        slot = self.slots[src]
        with slot.lock:
            if not slot.alive:
                raise KVSourceError(f"{src} has failed; its KV cannot be pulled")
            return mig.pull(src_blocks, dst_blocks)

    def _warmup(self, name: str, role: str) -> int:
        slot = self.slots[name]
        with slot.lock:
            n = slot.worker.runner.warmup(slot.worker.warmup_modes)
        if role == "decode":
            for src, s in list(self.slots.items()):
                if s.worker.role == "prefill":  # compile-only: the prefill instance may still be compiling
                    n += self._migrator(src, name).warmup()
        return n


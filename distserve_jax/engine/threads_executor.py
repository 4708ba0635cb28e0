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
                 config: EngineConfig, clock: Callable[[], float] = time.perf_counter, start: bool = True):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        rc = config.runner_config(spec.config.max_position_embeddings)
        sc = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens)
        self.slots: dict[str, _Slot] = {}
        self._migrators: dict[tuple[str, str], KVMigrator] = {}
        self._migrators_lock = threading.Lock()
        for name, role, tp, pp, stages in instances:
            runner = ModelRunner(spec.config, [make_mesh(list(s)) for s in stages], spec.weights, rc)
            blocks = BlockManager(runner.num_blocks, rc.block_size)
            sched = make_scheduler(role, config.policy, sc, blocks)
            devices = tuple(d.id for s in stages for d in s)
            slot = _Slot(None)  # type: ignore[arg-type]
            worker = InstanceWorker(
                name, role, runner=runner, blocks=blocks, scheduler=sched, emit=self.events.put, clock=clock,
                async_scheduling=config.async_scheduling, tp=tp, pp=pp, devices=devices,
                kv_pull=(lambda cmd, db, name=name: self._pull(cmd.source, name, list(cmd.source_blocks), db))
                if role == "decode" else None,
                warmup=lambda name=name, role=role: self._warmup(name, role), pages_lock=slot.lock)
            slot.worker = worker
            self.slots[name] = slot
            logging.info("%s: %s tp=%d pp=%d on devices %s, %d KV blocks", name, role, tp, pp, list(devices),
                         blocks.num_total)
        self.threaded = start
        for name, slot in self.slots.items() if start else ():
            slot.thread = threading.Thread(target=self._run, args=(slot,), name=f"worker-{name}", daemon=True)
            slot.thread.start()

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
        return m.drain(self.events, timeout or 0)

    def wake(self) -> None:
        """Ends a `poll` that is waiting (a new command for the controller)."""
        self.events.put(None)

    def shutdown(self, timeout: float = 10.0) -> None:
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
        for slot in self.slots.values():
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
            for src, s in self.slots.items():
                if s.worker.role == "prefill":
                    mig = self._migrator(src, name)
                    with s.lock:
                        n += mig.warmup()
        return n


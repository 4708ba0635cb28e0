"""The process of one instance under `executor="ray"`: a Ray actor that owns its devices and nothing else.

`WorkerProcess.__init__` confines every thread of the process to the instance's cores (on CPU
hosts) before JAX is imported, with `--xla_force_host_platform_device_count` set to the instance's
device count by the executor, then builds the instance's runner, cache, scheduler and
`InstanceWorker`, starts a transfer server for KV pulls, and runs the worker's loop in a thread.

- `send(seq, commands)`: queues controller commands (applied in `seq` order whatever the order
  the calls arrive in).
- `events()`: a streaming generator of event batches, the way tokens reach the controller.
- KV: when a prefill worker reports a request `Prefilled` (or a decode worker `HandedOff`), this process packs the request's KV
  (`kv_offer.KVPacker`) and offers it; the event carries the `KVOffer`. `Release` (the decode
  side's ack, via the controller) or `Finish` drops the offer. A decode worker pulls the offer's
  leaves from the named address and scatters them when the pull has landed, under a watchdog
  (`KVPullError` -> the request is reported `PullFailed` and recomputed).

Nothing here imports JAX at module level: the actor class must import before the pinning.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from typing import Any


def pin_all_threads(cores: list[int]) -> None:
    """Confines every thread of this process to `cores` (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:
            pass  # the thread ended meanwhile
    os.sched_setaffinity(0, set(cores))


class WorkerProcess:
    """A Ray actor hosting one `InstanceWorker` (see the module docstring)."""

    def __init__(self, name: str, role: str, model: str, tp: int, pp: int, config: dict[str, Any],
                 cores: list[int] | None, ip: str | None = None, pull_timeout_s: float = 20.0):
        if cores:
            pin_all_threads(cores)
        import jax
        import ray

        ip = ip or ray.util.get_node_ip_address()

        from distserve_jax.engine import messages as m
        from distserve_jax.engine.config import EngineConfig
        from distserve_jax.engine.model_source import resolve_model
        from distserve_jax.engine.threads_executor import make_scheduler
        from distserve_jax.engine.worker import InstanceWorker
        from distserve_jax.runtime.kv_offer import KVOfferServer, KVPacker, KVUnpacker
        from distserve_jax.runtime.model_runner import ModelRunner
        from distserve_jax.runtime.sharding import make_mesh
        from distserve_jax.scheduler.block_manager import BlockManager
        from distserve_jax.scheduler.policies import SchedulerConfig

        self._m = m
        self.name, self.role, self.cores = name, role, list(cores or [])
        self.pull_timeout_s = pull_timeout_s
        cfg = EngineConfig(**config)
        spec = resolve_model(model)
        devices = jax.devices()
        if len(devices) < tp * pp:
            raise RuntimeError(f"{name}: needs {tp * pp} devices, this process has {len(devices)}")
        stages = [devices[s * tp:(s + 1) * tp] for s in range(pp)]
        rc = cfg.runner_config(spec.config.max_position_embeddings)
        self.runner = ModelRunner(spec.config, [make_mesh(list(s)) for s in stages], spec.weights, rc)
        blocks = BlockManager(self.runner.num_blocks, rc.block_size)
        sched = make_scheduler(role, cfg.policy, SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens),
                               blocks)
        self.lock = threading.Lock()
        self.kv = KVOfferServer(ip)
        # A decode worker packs too: a request it hands off (placement change) is pulled like a prefill's.
        self.packer = KVPacker(self.runner) if role in ("prefill", "decode") else None
        self.unpacker = KVUnpacker(self.runner) if role == "decode" else None
        self.offers: dict[str, Any] = {}  # request key -> its KVOffer (prefill)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._next_seq = 0
        self._early: dict[int, list] = {}
        self._seq_lock = threading.Lock()
        self.worker = InstanceWorker(
            name, role, runner=self.runner, blocks=blocks, scheduler=sched, emit=self._emit, clock=time.time,
            async_scheduling=cfg.async_scheduling, tp=tp, pp=pp, devices=tuple(d.id for s in stages for d in s),
            kv_pull=self._pull if role == "decode" else None, warmup=self._warmup, pages_lock=self.lock,
            after_command=self._after_command)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ controller calls
    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "kv_address": self.kv.address, "cores": self.cores,
                "affinity": sorted(os.sched_getaffinity(0)) if self.cores else [],
                "node": ray.get_runtime_context().get_node_id(), "host": os.uname().nodename}

    def send(self, seq: int, commands: list) -> None:
        with self._seq_lock:
            self._early[seq] = commands
            while self._next_seq in self._early:
                for cmd in self._early.pop(self._next_seq):
                    self.inbox.put(cmd)
                self._next_seq += 1

    def events(self):
        """Streams event batches (a list each) for as long as the process lives."""
        while True:
            yield self._m.drain(self._events, None)

    def num_offers_held(self) -> int:
        return self.kv.num_held

    def pin(self, cores: list[int]) -> list[int]:
        """Moves every thread of this process to `cores` (after a placement change); its affinity."""
        pin_all_threads(cores)
        self.cores = list(cores)
        return sorted(os.sched_getaffinity(0))

    def warm(self) -> int:
        """Compiles this worker's step buckets (a new instance, before it joins a warmed-up deployment)."""
        return self._warmup()

    def load(self) -> Any:
        """The worker's current `WorkerLoad` (read from this thread: a snapshot)."""
        return self.worker.load()

    # ------------------------------------------------------------ worker side
    def _run(self) -> None:
        try:
            while self.worker.turn(self.inbox):
                pass
        except BaseException as e:  # noqa: BLE001 - reported to the controller
            self.error = f"{type(e).__name__}: {e}"
            self._events.put(self._m.WorkerFailed(self.name, self.error, tuple(self.worker.held_request_ids())))

    def _emit(self, event: Any) -> None:
        m = self._m
        if isinstance(event, m.Prefilled) and self.packer is not None:
            # On the worker thread, right after the step that wrote the KV: the pages are current.
            with self.lock:
                leaves, layout = self.packer.pack(event.block_table)
            offer = self.kv.offer(leaves, layout, len(event.block_table))
            self.offers[event.request_id] = offer
            event = dataclasses.replace(event, offer=offer)
        self._events.put(event)

    def _after_command(self, cmd: Any) -> None:
        """On the worker thread, in command order: the ack of a pull (or the end of the request) drops
        its offer."""
        m = self._m
        if isinstance(cmd, (m.Release, m.Finish)):
            offer = self.offers.pop(cmd.request_id, None)
            if offer is not None:
                self.kv.release(offer.uuid)

    def _pull(self, cmd: Any, dst_blocks: list[int]):
        from distserve_jax.engine.worker import KVSourceError

        offer = cmd.offer
        if offer is None:
            raise KVSourceError(f"{self.name}: no KV offer for {cmd.request.request_id!r}")
        try:
            pending = self.unpacker.pull(self.kv.connect(offer.address), offer)
        except Exception as e:  # noqa: BLE001
            raise KVSourceError(f"pull from {cmd.source} failed: {e}") from e
        return _RayTransfer(self, pending, dst_blocks, offer)

    def _warmup(self) -> int:
        with self.lock:
            return self.runner.warmup(self.worker.warmup_modes)

    # ------------------------------------------------------------ pull warm-up (controller calls)
    def warm_offers(self) -> list:
        """Prefill side of the pull warm-up: offers one null-page KV of every pull-size bucket (which
        compiles the gathers). Call before serving; `release_offers` drops them."""
        offers = []
        with self.lock:
            packed = [self.packer.pack([0] * n) for n in self.packer.buckets]
        for leaves, layout in packed:
            offers.append(self.kv.offer(leaves, layout, layout.num_blocks))
        return offers

    def warm_pull(self, offers: list) -> int:
        """Decode side: pulls each warm-up offer (connecting to its server) and scatters it into the
        null page, which compiles the assembly and the scatter for that size and sender layout."""
        for offer in offers:  # the serving path's pull and landing, into no destination block
            _RayTransfer(self, self.unpacker.pull(self.kv.connect(offer.address), offer), [], offer).wait()
        return len(offers)

    def release_offers(self, offers: list) -> None:
        for offer in offers:
            self.kv.release(offer.uuid)


class _RayTransfer:
    """A pull in flight: `wait()` (on the worker thread) lands it into the pages, or raises
    `KVSourceError` when the offering process is gone or too slow."""

    def __init__(self, proc: WorkerProcess, pending: Any, dst_blocks: list[int], offer: Any):
        self.proc, self.pending, self.dst_blocks, self.offer = proc, pending, dst_blocks, offer
        self.num_bytes = offer.layout.num_bytes * offer.num_blocks // offer.layout.num_blocks

    def ready(self) -> bool:
        """Whether `wait` would land (or fail) without waiting for the transfer."""
        return self.pending.ready(self.proc.pull_timeout_s)

    def wait(self) -> None:
        import jax

        from distserve_jax.engine.worker import KVSourceError
        from distserve_jax.runtime.kv_offer import KVPullError

        try:
            self.pending.wait(self.proc.pull_timeout_s)
        except KVPullError as e:
            self.proc.kv.forget(self.offer.address)
            raise KVSourceError(str(e)) from e
        with self.proc.lock:
            markers = self.proc.unpacker.scatter(self.pending.leaves, self.offer.layout, self.dst_blocks)
        jax.block_until_ready(markers)

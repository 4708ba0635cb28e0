"""`executor="ray"`: one Ray actor process per instance, the controller in this process.

Each worker is a `ray_worker.WorkerProcess` actor that owns its instance's devices and nothing
else. On CPU hosts it gets `--xla_force_host_platform_device_count` = its device count and its
own cores (`assign_cores`: disjoint core sets when there are at least as many cores as instances,
pinned before JAX is imported; `info()` shows them); on GPU hosts it asks Ray for `tp * pp` GPUs.

- Start-up: with no `address` a local Ray is started on loopback only (usage stats off, no
  dashboard) and shut down with the executor; with `address` the executor joins that cluster,
  where instances may land on other nodes (their transfer servers listen on their node's address,
  so KV crosses hosts over TCP).
- Commands: `send` numbers each actor's commands; the actor applies them in that order.
- Events: one thread per actor reads its streaming generator of event batches into one queue.
- Failures: when an actor's process dies (its stream breaks), the executor reports
  `WorkerFailed(process_died=True)`; Ray restarts the actor (`max_restarts`), and once the new
  process answers the executor reports `WorkerJoined`. A worker whose step raised is killed so Ray
  replaces it the same way.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from absl import logging

from distserve_jax.engine import messages as m
from distserve_jax.engine.config import EngineConfig

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


def assign_cores(num_instances: int, cores: Sequence[int]) -> list[list[int]]:
    """Each instance's cores: disjoint, as even as possible, when there are enough cores; else one
    core each, round-robin (instances then share cores)."""
    cores = sorted(cores)
    if not cores or num_instances < 1:
        raise ValueError(f"cannot assign {len(cores)} cores to {num_instances} instances")
    if num_instances > len(cores):
        return [[cores[i % len(cores)]] for i in range(num_instances)]
    base, extra = divmod(len(cores), num_instances)
    out, start = [], 0
    for i in range(num_instances):
        n = base + (i < extra)
        out.append(cores[start:start + n])
        start += n
    return out


_LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every Ray socket on 127.0.0.1 (single node)


def start_local_ray(num_cpus: int | None = None) -> None:
    """A Ray on this machine that listens on loopback only, with usage stats and the dashboard off.
    Call before `ray` is first imported in this process (the loopback switch is read then)."""
    os.environ.update(_LOOPBACK_ENV)
    import ray

    # address="local": always a new Ray of our own, never one found running on the machine.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="warning",
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": _REPO_ROOT}})


class RayExecutor:
    """Hosts the workers of a deployment as Ray actors (see the module docstring).

    Args:
      model: what every actor loads (`resolve_model` name or path; each process loads it itself).
      instances: `(name, role, tp, pp)` per worker.
      config: engine sizes and policy (sent to every actor).
      address: a Ray cluster to join; None starts a local one.
      on_gpu: ask Ray for `tp * pp` GPUs per actor instead of pinning CPU cores.
      max_restarts: times Ray restarts a dead worker process.
      ready_timeout_s: how long start-up (and a restart) may take.
    """

    kind = "ray"
    restarts_workers = True

    def __init__(self, model: str, instances: Sequence[tuple[str, str, int, int]], config: EngineConfig, *,
                 address: str | None = None, on_gpu: bool = False, max_restarts: int = 1,
                 ready_timeout_s: float = 300.0, num_devices: int | None = None):
        if address is None:
            os.environ.update(_LOOPBACK_ENV)
        # Ray's C++ failure-signal handler would take SIGTERM from the server's drain (this process's).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray

        self._ray = ray
        self.owns_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level="warning", configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": _REPO_ROOT}})
            else:
                start_local_ray()
            self.owns_ray = True
        self.address = address
        self.num_devices = num_devices  # the device budget a placement change may use (None: no limit)
        self.ready_timeout_s = ready_timeout_s
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._actors: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        from distserve_jax.engine.ray_worker import WorkerProcess

        remote_cls = ray.remote(WorkerProcess)
        local = address is None and not on_gpu
        cores = assign_cores(len(instances), os.sched_getaffinity(0)) if local else [None] * len(instances)
        import dataclasses

        import jax
        cfg = dataclasses.asdict(config)
        cache = jax.config.jax_compilation_cache_dir  # share this process's persistent compilation cache
        cache_env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"} if cache else {}
        ip = "127.0.0.1" if address is None else None  # None: the actor's node address
        for (name, role, tp, pp), cs in zip(instances, cores):
            env = {"PYTHONPATH": _REPO_ROOT, **cache_env, **(_LOOPBACK_ENV if address is None else {})}
            if not on_gpu:
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={tp * pp}"
                env["JAX_PLATFORMS"] = "cpu"
            opts = dict(max_restarts=max_restarts, max_task_retries=0, max_concurrency=4,
                        runtime_env={"env_vars": env})
            if on_gpu:
                opts.update(num_gpus=tp * pp, num_cpus=1)
            else:
                opts.update(num_cpus=0 if local else 1)
            self._actors[name] = remote_cls.options(**opts).remote(name, role, model, tp, pp, cfg, cs, ip)
            self._seq[name] = 0
            self._meta[name] = {"cores": cs, "restarts": 0}
        try:
            readies = ray.get([a.ready.remote() for a in self._actors.values()], timeout=ready_timeout_s)
        except Exception:
            self.shutdown()
            raise
        for name, r in zip(self._actors, readies):
            self._meta[name].update(r)
            logging.info("%s: pid %s on %s, cores %s, KV server %s", name, r["pid"], r["node"], r["affinity"],
                         r["kv_address"])
        self._readers = [threading.Thread(target=self._read, args=(name,), name=f"events-{name}", daemon=True)
                         for name in self._actors]
        for t in self._readers:
            t.start()

    # ------------------------------------------------------------ controller side
    def send(self, name: str, cmd: Any) -> None:
        with self._lock:
            seq = self._seq[name]
            self._seq[name] = seq + 1
            self._actors[name].send.remote(seq, [cmd])

    def poll(self, timeout: float | None) -> list[Any]:
        return m.drain(self.events, timeout or 0)

    def wake(self) -> None:
        self.events.put(None)

    def instance_info(self) -> dict[str, dict[str, Any]]:
        """Per worker: its process, node, pinned cores and restarts (merged into `info()`)."""
        return {n: {"pid": meta.get("pid"), "node": meta.get("node"), "cores": meta.get("affinity"),
                    "kv_address": meta.get("kv_address"), "restarts": meta["restarts"]}
                for n, meta in self._meta.items()}

    def actor(self, name: str) -> Any:
        return self._actors[name]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Kills every actor (no restart) and, if this executor started Ray, stops it."""
        self._closing = True
        for a in self._actors.values():
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self.owns_ray = False

    # ------------------------------------------------------------ event readers
    def _read(self, name: str) -> None:
        ray = self._ray
        while not self._closing:
            try:
                for ref in self._actors[name].events.options(num_returns="streaming").remote():
                    for e in ray.get(ref):
                        self.events.put(e)
                        if isinstance(e, m.WorkerFailed) and not e.process_died:
                            # Its loop ended: replace the process (the restart path reports it back).
                            ray.kill(self._actors[name], no_restart=False)
            except Exception as e:  # noqa: BLE001 - the actor died (or Ray is shutting down)
                if self._closing:
                    return
                logging.error("worker process %s died: %s", name, e)
                self.events.put(m.WorkerFailed(name, f"its process died ({type(e).__name__})", (), process_died=True))
                if not self._await_restart(name):
                    return

    def _await_restart(self, name: str) -> bool:
        ray = self._ray
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._closing and time.monotonic() < deadline:
            try:
                r = ray.get(self._actors[name].ready.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - still restarting, or gone for good
                time.sleep(0.5)
                continue
            with self._lock:
                self._seq[name] = 0  # a new process counts commands from 0
            self._meta[name].update(r)
            self._meta[name]["restarts"] += 1
            load = ray.get(self._actors[name].load.remote(), timeout=10)
            logging.info("worker %s restarted: pid %s, KV server %s", name, r["pid"], r["kv_address"])
            self.events.put(m.WorkerJoined(load))
            return True
        logging.error("worker %s did not come back within %.0fs", name, self.ready_timeout_s)
        return False

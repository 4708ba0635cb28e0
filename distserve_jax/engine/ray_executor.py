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
- Placement changes: `add_worker` starts a new actor on the least used cores (on a host with
  fewer cores than instances, e.g. 2 cores during a change from 1P+1D to 1P+2D, it shares a core
  with another instance until the leaving one is gone: `info()` shows `shares_cores_with`) and
  reports `WorkerJoined` once it is ready; `remove_worker` kills a drained actor for good and
  re-pins the remaining actors to disjoint cores (`assign_cores` over them).
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
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # see RayExecutor.__init__
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
        # A Ray call after `shutdown` (an event reader mid-iteration) must fail, not start a new Ray
        # of its own from that thread (read when `ray` is first imported).
        os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
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
        self._spawn_args = dict(remote_cls=remote_cls, model=model, cfg=cfg, cache_env=cache_env, on_gpu=on_gpu,
                                local=local, max_restarts=max_restarts,
                                ip="127.0.0.1" if address is None else None)  # None: the actor's node address
        self._all_cores = sorted(os.sched_getaffinity(0)) if local else []
        self._removed: set[str] = set()
        self.warm_new_workers = False  # set by `Controller.warmup`
        for (name, role, tp, pp), cs in zip(instances, cores):
            self._spawn(name, role, tp, pp, cs)
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

    def _spawn(self, name: str, role: str, tp: int, pp: int, cores: list[int] | None) -> None:
        a = self._spawn_args
        env = {"PYTHONPATH": _REPO_ROOT, **a["cache_env"], **(_LOOPBACK_ENV if self.address is None else {})}
        if not a["on_gpu"]:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={tp * pp}"
            env["JAX_PLATFORMS"] = "cpu"
        opts = dict(max_restarts=a["max_restarts"], max_task_retries=0, max_concurrency=4,
                    runtime_env={"env_vars": env})
        if a["on_gpu"]:
            opts.update(num_gpus=tp * pp, num_cpus=1)
        else:
            opts.update(num_cpus=0 if a["local"] else 1)
        actor = a["remote_cls"].options(**opts).remote(name, role, a["model"], tp, pp, a["cfg"], cores, a["ip"])
        with self._lock:
            self._actors[name] = actor
            self._seq[name] = 0
            self._meta[name] = {"cores": cores, "restarts": 0, "role": role}

    # ------------------------------------------------------------ live placement changes
    def _pick_cores(self) -> list[int] | None:
        """A new instance's cores: as many as an even share gives, the least used ones first (on a
        host with fewer cores than instances it shares a core with another instance)."""
        if not self._all_cores:
            return None
        use = {c: 0 for c in self._all_cores}
        for meta in self._meta.values():
            for c in meta.get("cores") or ():
                use[c] = use.get(c, 0) + 1
        n = max(1, len(self._all_cores) // (len(self._meta) + 1))
        return sorted(sorted(use, key=lambda c: (use[c], c))[:n])

    def add_worker(self, name: str, role: str, tp: int, pp: int, devices: Sequence[Any] | None = None) -> None:
        """Starts a new actor process for an instance (its own `tp * pp` devices: `devices` is not
        used) on the least used cores; `WorkerJoined` follows once it is ready (and compiled, if
        the deployment was warmed up), `WorkerFailed` if it cannot start."""
        if name in self._actors or name in self._removed:
            raise ValueError(f"a worker named {name!r} already exists")
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"unknown worker role {role!r}")
        self._spawn(name, role, tp, pp, self._pick_cores())
        threading.Thread(target=self._join, args=(name,), name=f"start-{name}", daemon=True).start()

    def _join(self, name: str) -> None:
        ray = self._ray
        actor = self._actors[name]
        try:
            r = ray.get(actor.ready.remote(), timeout=self.ready_timeout_s)
            if self.warm_new_workers:
                ray.get(actor.warm.remote(), timeout=self.ready_timeout_s)
                try:  # its KV pulls with the instances already serving
                    self.warm_pulls(only=name)
                except Exception as e:  # noqa: BLE001 - its first pulls then compile on use
                    logging.warning("pull warm-up of new worker %s failed: %s", name, e)
            load = ray.get(actor.load.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 - reported as the new worker's failure
            if self._closing or name in self._removed:
                return
            logging.error("new worker %s did not start: %s", name, e)
            self.events.put(m.WorkerFailed(name, f"it did not start: {type(e).__name__}: {e}", ()))
            return
        if self._closing or name in self._removed:
            return
        self._meta[name].update(r)
        logging.info("%s: pid %s on %s, cores %s, KV server %s", name, r["pid"], r["node"], r["affinity"],
                     r["kv_address"])
        t = threading.Thread(target=self._read, args=(name,), name=f"events-{name}", daemon=True)
        self._readers.append(t)
        t.start()
        self.events.put(m.WorkerJoined(load))

    def remove_worker(self, name: str) -> None:
        """Kills a worker's actor (no restart; the controller calls it once the worker holds
        nothing, or for a new worker that never joined) and forgets it."""
        with self._lock:
            actor = self._actors.pop(name, None)
            if actor is None:
                raise ValueError(f"no worker named {name!r}")
            self._removed.add(name)
            self._seq.pop(name, None)
            self._meta.pop(name, None)
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._rebalance_cores()

    def _rebalance_cores(self) -> None:
        """After a removal: the remaining actors get disjoint cores again (`assign_cores` over them,
        every thread re-pinned in place), so a core an instance shared during a change is its own."""
        if not self._all_cores or not self._meta:
            return
        names = list(self._meta)
        for name, cores in zip(names, assign_cores(len(names), self._all_cores)):
            meta = self._meta.get(name)
            if meta is None or meta.get("cores") == cores or "pid" not in meta:
                continue  # gone, already there, or not started yet
            try:
                meta["affinity"] = self._ray.get(self._actors[name].pin.remote(cores), timeout=30)
                meta["cores"] = cores
            except Exception as e:  # noqa: BLE001 - it keeps its cores
                logging.warning("could not re-pin %s to cores %s: %s", name, cores, e)

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
        metas = dict(self._meta)
        cores = {n: set(meta.get("affinity") or ()) for n, meta in metas.items()}
        return {n: {"pid": meta.get("pid"), "node": meta.get("node"), "cores": meta.get("affinity"),
                    "kv_address": meta.get("kv_address"), "restarts": meta["restarts"],
                    # more instances than cores (e.g. during a placement change on a small host)
                    "shares_cores_with": sorted(o for o in metas if o != n and cores[o] & cores[n])}
                for n, meta in metas.items()}

    def warm_pulls(self, only: str | None = None) -> int:
        """Runs every pull a request can need once before serving: each prefill worker offers a
        null-page KV per pull-size bucket and each decode worker pulls all of them, so the transfer
        connections exist and the gathers, assemblies and scatters are compiled (a first request of
        each size otherwise pays ~0.5 s). `only`: just the pairs with that (new) worker. Returns the
        number of pulls run."""
        ray = self._ray
        roles = {n: meta.get("role") for n, meta in self._meta.items() if n not in self._removed}
        prefill = [n for n, r in roles.items() if r == "prefill"]
        decode = [n for n, r in roles.items() if r == "decode"]
        if only is not None:
            if roles.get(only) == "prefill":
                prefill = [only]
            elif roles.get(only) == "decode":
                decode = [only]
            else:
                return 0
        if not prefill or not decode:
            return 0
        offers = dict(zip(prefill, ray.get([self._actors[n].warm_offers.remote() for n in prefill],
                                           timeout=self.ready_timeout_s)))
        try:
            counts = ray.get([self._actors[d].warm_pull.remote(o) for d in decode for o in offers.values()],
                             timeout=self.ready_timeout_s)
        finally:
            ray.get([self._actors[n].release_offers.remote(o) for n, o in offers.items()],
                    timeout=self.ready_timeout_s)
        return sum(counts)

    def actor(self, name: str) -> Any:
        return self._actors[name]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Kills every actor (no restart) and, if this executor started Ray, stops it."""
        self._closing = True
        for a in list(self._actors.values()):
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        # The event readers end once their actors' streams break; none may touch Ray after it stops.
        deadline = time.monotonic() + timeout
        for t in list(getattr(self, "_readers", ())):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if self.owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self.owns_ray = False

    # ------------------------------------------------------------ event readers
    def _read(self, name: str) -> None:
        ray = self._ray
        while not self._closing and name not in self._removed:
            try:
                actor = self._actors[name]
                for ref in actor.events.options(num_returns="streaming").remote():
                    for e in ray.get(ref):
                        self.events.put(e)
                        if isinstance(e, m.WorkerFailed) and not e.process_died:
                            # Its loop ended: replace the process (the restart path reports it back).
                            ray.kill(actor, no_restart=False)
            except Exception as e:  # noqa: BLE001 - the actor died (or was removed, or Ray is shutting down)
                if self._closing or name in self._removed:
                    return
                logging.error("worker process %s died: %s", name, e)
                self.events.put(m.WorkerFailed(name, f"its process died ({type(e).__name__})", (), process_died=True))
                if not self._await_restart(name):
                    return

    def _await_restart(self, name: str) -> bool:
        ray = self._ray
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._closing and name not in self._removed and time.monotonic() < deadline:
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

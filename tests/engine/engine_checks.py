"""Checks on a whole engine (controller and workers): nothing left behind, and reaching a worker."""

from distserve_jax.engine.controller import Controller
from distserve_jax.engine.worker import InstanceWorker
from distserve_jax.scheduler.block_manager import assert_all_free


def worker(core: Controller, name: str | None = None) -> InstanceWorker:
    """A worker of the engine (the first one when no name is given)."""
    workers = core.executor.workers
    return workers[name] if name is not None else next(iter(workers.values()))


def held(core: Controller, rid: str) -> list[str]:
    """The workers whose cache holds blocks of request `rid` (after every command has been applied)."""
    core.quiesce()
    return [n for n, w in core.executor.workers.items() if any(k.split("@")[0] == rid for k in w.blocks.request_ids())]


def assert_engine_empty(core: Controller) -> None:
    """No request anywhere: not in the controller, not queued for a pull, not on any worker; every
    KV block of every worker free."""
    synced = core.quiesce()
    assert not core.requests, sorted(core.requests)
    assert not core.migration_queue
    for name, w in core.executor.workers.items():
        if name not in synced:
            continue  # a failed worker serves nothing more
        assert not w.requests, (name, sorted(w.requests))
        assert not w.scheduler.has_unfinished(), name
        assert not w.pulls and not w.preempted and (w.inflight is None or w.inflight.ended), name
        assert w.blocks.num_free == w.blocks.num_total, name
        assert_all_free(w.blocks)

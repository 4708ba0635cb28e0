"""Work a runner's warm-up leaves for later, and when it may run: the background compilations
(`run_jobs`, `start`) and the process-wide count of runners compiling their step shapes
(`COMPILE_PHASES`) that deferred work waits for."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import threading
import time
from typing import Any

from absl import logging


class _CompilePhases:
    """How many runners of this process are compiling their step shapes (`ModelRunner.warmup`).

    Work a warm-up leaves for later (the first runs of short shapes, the background sampler
    variants) waits until none is: it would take the cores from the compilations that start-up
    waits for (in one process, an instance done compiling would slow the other one down)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    @contextlib.contextmanager
    def active(self):
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return self._active == 0

    def wait_idle(self, stop: threading.Event, poll_s: float = 0.1) -> None:
        with self._cond:
            while self._active and not stop.is_set():
                self._cond.wait(poll_s)


COMPILE_PHASES = _CompilePhases()


def run_jobs(jobs: list[tuple[concurrent.futures.Future, Any]], stop: threading.Event) -> None:
    """Runs `(future, fn)` jobs in order, each future getting its fn's result or error, until `stop`
    is set (the jobs left then are cancelled)."""
    COMPILE_PHASES.wait_idle(stop)
    start = time.perf_counter()
    for job, fn in jobs:
        if stop.is_set():
            job.cancel()
            continue
        try:
            job.set_result(fn())
        except Exception as e:  # noqa: BLE001 - handed to the step that waits for it
            logging.exception("warm-up: a background compilation failed")
            job.set_exception(e)
    if jobs and not stop.is_set():
        logging.info("warm-up: %d background compilations done in %.1f s", len(jobs), time.perf_counter() - start)


def start(jobs: list[tuple[concurrent.futures.Future, Any]]) -> None:
    """Runs the jobs on a daemon thread. At interpreter exit the thread finishes the compilation it
    is in and stops (a compilation still running while the interpreter finalises aborts the process)."""
    stop = threading.Event()
    thread = threading.Thread(target=run_jobs, args=(jobs, stop), name="warmup-background", daemon=True)

    def finish() -> None:
        stop.set()
        thread.join(60.0)

    atexit.register(finish)
    thread.start()

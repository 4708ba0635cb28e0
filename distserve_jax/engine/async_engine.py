"""`AsyncEngine`: streams outputs to asyncio callers while one background thread drives an engine core.

The core (the `Controller` over its workers) is only ever touched by the engine thread: `generate` and `abort` send it commands through a queue, and each request's
outputs come back through its own asyncio queue. A caller that stops iterating (client gone,
task cancelled) aborts its request, so nothing it held stays allocated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from absl import logging

from distserve_jax.engine.controller import EngineDeadError
from distserve_jax.engine.output_processor import RequestOutput
from distserve_jax.sampling_params import SamplingParams


class EngineCore(Protocol):
    def add_request(self, request_id: str | None = None, prompt: str | None = None,
                    prompt_token_ids: Sequence[int] | None = None, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Any: ...

    def abort_request(self, request_id: str) -> RequestOutput | None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def info(self) -> dict[str, Any]: ...


class QueueFullError(RuntimeError):
    """The engine already holds `max_queue` unfinished requests."""


class InstanceFailedError(RuntimeError):
    """The instance serving a request failed; the request ended with this error (the engine serves on)."""


class AsyncEngine:
    """Asynchronous front of an engine core.

    Args:
      core: the engine to drive (see `EngineCore`).
      max_queue: most unfinished requests accepted at once (None: unbounded); more raise
        `QueueFullError` immediately.
    """

    def __init__(self, core: EngineCore, *, max_queue: int | None = None):
        self.core = core
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str, *, mode: str = "disaggregated", placement: Any = None, max_queue: int | None = None,
                   **kwargs) -> "AsyncEngine":
        """Builds the engine core for `mode` (disaggregated / colocated / chunked) and wraps it.

        `kwargs` go to `factory.build_core`: `tp`, `replicas`, `devices`, `executor` and `EngineConfig` fields.
        """
        from distserve_jax.engine.factory import build_core
        return cls(build_core(model, mode=mode, placement=placement, **kwargs), max_queue=max_queue)

    # ------------------------------------------------------------ public API
    async def generate(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, prompt_token_ids: Sequence[int] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Streams a request's outputs (`new_token_ids`, `text_delta`; the last has `finished=True`,
        its `finish_reason` and `metrics`). Raises ValueError on bad input, QueueFullError when full."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            if self.max_queue is not None and len(self._streams) >= self.max_queue:
                raise QueueFullError(f"server is at capacity ({self.max_queue} requests in flight)")
            self._streams[rid] = (loop, q)
        try:
            await asyncio.wrap_future(self._submit(lambda: self.core.add_request(
                rid, prompt=prompt, prompt_token_ids=prompt_token_ids, params=sampling_params)))
        except BaseException:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason == "error":
                    finished = True
                    raise InstanceFailedError(item.error or "the instance serving this request failed")
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees everything it holds; False if it was unknown."""
        with self._lock:
            entry = self._streams.pop(request_id, None)
        found = False
        try:
            if self._dead is None and not self._stop and self._thread.is_alive():
                found = await asyncio.wrap_future(
                    self._submit(lambda: self.core.abort_request(request_id))) is not None
        finally:  # the stream ends even when this call is cancelled (the abort itself still runs)
            if entry is not None:
                loop, q = entry
                loop.call_soon_threadsafe(q.put_nowait, RequestOutput(
                    request_id, [], [], [], "", "", True, "abort"))
        return found or entry is not None

    async def info(self) -> dict[str, Any]:
        """The core's live state (queues, free blocks per instance), read on the engine thread."""
        return await asyncio.wrap_future(self._submit(self.core.info))

    async def apply_placement(self, target: Any) -> Any:
        """Starts a live placement change (`Controller.apply_placement`) on the engine thread and
        returns its `PlacementChange`; the engine thread moves it on while it serves."""
        return await asyncio.wrap_future(self._submit(lambda: self.core.apply_placement(target)))

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts what is in flight (each stream ends with finish_reason 'abort') and stops the thread."""
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            fut = self._submit(lambda rid=rid: self.core.abort_request(rid))
            try:
                fut.result(timeout)
            except Exception:  # noqa: BLE001 - best effort during shutdown
                pass
            with self._lock:
                entry = self._streams.pop(rid, None)
            if entry is not None:
                loop, q = entry
                loop.call_soon_threadsafe(q.put_nowait, RequestOutput(rid, [], [], [], "", "", True, "abort"))
        self._stop = True
        self._wake.set()
        wake = getattr(self.core, "wake", None)
        if wake is not None:
            wake()
        self._thread.join(timeout)
        close = getattr(self.core, "shutdown", None)
        if close is not None:
            close()

    # ------------------------------------------------------------ engine thread
    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(f"engine stopped: {self._dead!r}"))
            return fut
        if self._stop:
            fut.set_exception(EngineDeadError("engine is shut down"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        wake = getattr(self.core, "wake", None)
        if wake is not None:
            wake()
        return fut

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            # A caller cancelled while waiting (its task was cancelled: a client went away) still
            # gets its command run (an abort must happen either way), but no result is delivered.
            # Marking the future running first means it can no longer be cancelled under us.
            if not fut.set_running_or_notify_cancel():
                try:
                    fn()
                except Exception:  # noqa: BLE001 - nobody is waiting for it
                    logging.exception("command of a cancelled caller failed")
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            entry = self._streams.get(out.request_id)
            if entry is not None and out.finished:
                self._streams.pop(out.request_id, None)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                if self.core.has_unfinished_requests() or getattr(self.core, "changing_placement", False):
                    for out in self.core.step():
                        self._deliver(out)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            self._run_commands()
        except BaseException as e:  # noqa: BLE001 - fail every stream rather than hang
            logging.exception("engine thread died")
            self._dead = e
            with self._lock:
                streams = list(self._streams.values())
                self._streams.clear()
            for loop, q in streams:
                loop.call_soon_threadsafe(q.put_nowait, EngineDeadError(f"engine stopped: {e!r}"))
            while True:
                try:
                    _, fut = self._commands.get_nowait()
                except queue.Empty:
                    break
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineDeadError(f"engine stopped: {e!r}"))

"""What the gRPC service and the HTTP front share: admission, request streaming and live state.

`Frontend` wraps the `AsyncEngine` once it is built and warm. It owns the served model's
identity and limits, the ready/draining state (requests are refused with `Unavailable` while
warming up or shutting down), the request-size and model-name checks, the mapping of engine
errors to `ServingError`s, the set of requests in flight, and the Prometheus bookkeeping of
every finished request. A stream that its caller stops iterating (client gone, task
cancelled) is closed, which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import Any, AsyncIterator, Sequence

from absl import logging

from distserve_jax.engine.async_engine import AsyncEngine, EngineDeadError, InstanceFailedError, QueueFullError
from distserve_jax.engine.output_processor import RequestOutput
from distserve_jax.sampling_params import SamplingParams
from serving.convert import InternalError, InvalidRequest, Overloaded, Unavailable
from serving.prometheus_metrics import ServingMetrics, record_from_metrics


@dataclasses.dataclass
class ServedModel:
    """Identity and limits of what the server serves."""

    name: str  # the name clients pass as `model`
    path: str  # the --model argument
    mode: str
    placement: str = ""  # JSON text of the placement (disaggregated mode)
    max_queue: int | None = None
    max_request_bytes: int = 4 << 20
    max_model_len: int = 0
    vocab_size: int = 0
    tokenizer: Any = None


class Frontend:
    """Admission and streaming in front of an `AsyncEngine` (set with `set_engine` when warm)."""

    def __init__(self, served: ServedModel, metrics: ServingMetrics):
        self.served = served
        self.metrics = metrics
        self.engine: AsyncEngine | None = None
        self.draining = False
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---------------------------------------------------------------- state
    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def set_engine(self, engine: AsyncEngine, info: dict[str, Any]) -> None:
        """Starts serving with a built and warm engine; `info` is its first `info()`."""
        self.served.max_model_len = int(info.get("max_model_len") or 0)
        self.engine = engine

    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def info(self) -> dict[str, Any]:
        """The engine's live state ({} of instances before the engine exists)."""
        if self.engine is None:
            return {"mode": self.served.mode, "max_model_len": self.served.max_model_len, "instances": []}
        info = await self.engine.info()
        self.metrics.update_instances(info)
        return info

    # ---------------------------------------------------------------- requests
    def check_request(self, *, model: str | None, size_bytes: int) -> None:
        """Refuses a request before it reaches the engine (not serving, wrong model, too large)."""
        if not self.ready:
            raise Unavailable("server is shutting down" if self.draining else "server is warming up")
        if model and model != self.served.name:
            raise InvalidRequest(f"model {model!r} is not served here; this server serves {self.served.name!r}",
                                 param="model")
        if size_bytes > self.served.max_request_bytes:
            raise InvalidRequest(f"request is {size_bytes} bytes, over the limit of {self.served.max_request_bytes} "
                                 f"bytes (max_request_bytes); the prompt is too large", param="prompt")

    async def generate(self, *, prompt: str | None, prompt_token_ids: Sequence[int] | None, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Streams a request's outputs; the last has `finished=True`.

        Errors before the first output (bad input, full queue, not serving) raise `ServingError`.
        """
        if not self.ready:
            raise Unavailable("server is shutting down" if self.draining else "server is warming up")
        if prompt is not None and prompt_token_ids is not None:
            raise InvalidRequest("pass exactly one of prompt and prompt_token_ids", param="prompt")
        if prompt is None and prompt_token_ids is None:
            raise InvalidRequest("prompt is empty: pass prompt text or prompt_token_ids", param="prompt")
        rid = request_id or f"req-{uuid.uuid4().hex}"
        agen = self.engine.generate(prompt, params, rid, prompt_token_ids=prompt_token_ids)
        tracked = rid not in self._in_flight  # a duplicate id is refused by the engine below
        if tracked:
            self._track(rid, True)
        try:
            async with contextlib.aclosing(agen):
                try:
                    out = await agen.__anext__()
                except ValueError as e:
                    self.metrics.rejected.labels(kind="invalid").inc()
                    raise InvalidRequest(str(e), param=_param_of(str(e))) from None
                except QueueFullError as e:
                    self.metrics.rejected.labels(kind="overloaded").inc()
                    raise Overloaded(str(e)) from None
                except (EngineDeadError, InstanceFailedError) as e:
                    raise Unavailable(str(e)) from None
                except StopAsyncIteration:
                    raise Unavailable(f"request {rid} ended without output") from None
                except Exception as e:  # noqa: BLE001 - a fault of the server, not of the request
                    logging.exception("request %s failed before its first output", rid)
                    raise InternalError(f"internal error on request {rid}: {type(e).__name__}") from None
                while True:
                    if out.finished:
                        self._observe(out)
                    yield out
                    if out.finished:
                        return
                    try:
                        out = await agen.__anext__()
                    except (EngineDeadError, InstanceFailedError) as e:
                        raise Unavailable(str(e)) from None
                    except StopAsyncIteration as e:
                        raise Unavailable(f"request {rid} ended early: {e!r}") from None
        finally:
            if tracked:
                self._track(rid, False)

    def _track(self, rid: str, add: bool) -> None:
        if add:
            self._in_flight.add(rid)
            self._idle.clear()
        else:
            self._in_flight.discard(rid)
            if not self._in_flight:
                self._idle.set()
        self.metrics.in_flight.set(len(self._in_flight))

    async def abort(self, request_id: str) -> bool:
        """Aborts a request in flight; False if none has that id."""
        if self.engine is None or request_id not in self._in_flight:
            return False
        await self.engine.abort(request_id)
        return True

    def _observe(self, out: RequestOutput) -> None:
        m = out.metrics or {}
        try:
            rec = record_from_metrics(out.request_id, len(out.prompt_token_ids), len(out.token_ids), m,
                                      out.finish_reason)
            self.metrics.observe_finished(rec, m)
        except (ValueError, TypeError) as e:  # metrics must never fail a request
            logging.warning("could not record metrics of %s: %s", out.request_id, e)


_KNOWN_PARAMS = ("prompt_token_ids", "prompt", "request_id", "max_tokens", "sampling_params", "model")


def _param_of(message: str) -> str | None:
    """The request field an engine error message is about (the first known field it names)."""
    for name in _KNOWN_PARAMS:
        if message.startswith(name) or f" {name} " in message:
            return name
    return None


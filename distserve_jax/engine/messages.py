"""The messages between the controller and the workers (commands in, events out).

The controller never touches a worker's scheduler, cache or runner: it sends a worker commands
and reads the events every worker emits, so a worker can be a thread, a process on another host
or a simulated instance. Every message is a plain picklable dataclass (no device arrays, no
locks); a request travels as a `RequestState` snapshot and each worker keeps its own copy.

Commands (controller -> worker):
  - `Admit`: queue a request for (re)prefill (a prefill worker or a colocated replica).
  - `Pull`: pull a prefilled request's KV from a prefill worker and decode it (decode worker).
  - `Release`: a decode worker holds the request's KV now; free it here (prefill worker).
  - `Finish`: the request ended (stop, length, abort): drop it wherever it is here.
  - `HandOff`: stop decoding the request and offer its KV for another decode worker to pull
    (a decode worker leaving in a placement change).
  - `Sync`: answer with `Synced` once every earlier command is applied (and warm up if asked).

Events (worker -> controller):
  - `Token`: a sampled token (the first token of a prefill, or a decode token).
  - `TokenRun`: decode tokens of several requests over consecutive steps, in one event (what
    the simulator emits when it advances a stretch of decode steps at once).
  - `Prefilled`: the request's prompt KV is in this prefill worker's cache, ready to pull.
  - `HandedOff` (a `Prefilled`): a decode worker stopped decoding the request after `HandOff`;
    its KV so far is ready to pull from there, the same way.
  - `Pulled` / `PullRefused` / `PullFailed`: a decode worker finished a pull, had no room for it,
    or could not get the KV (the source is gone: the request is recomputed).
  - `Preempted`: a full decode cache evicted the request; it must be recomputed by a prefill.
  - `Status`: the worker's load after a step or a command (routing and `info()` read it).
  - `Synced`: the answer to `Sync`.
  - `WorkerFailed`: the worker's step raised, or its process died; lists what it held.
  - `WorkerJoined`: a restarted worker process serves again.
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Any


@dataclasses.dataclass(frozen=True)
class RequestState:
    """A request as a worker needs it: what to feed, how to sample, when to stop by length.

    `output_token_ids` are the tokens generated so far (a recomputed request carries them all);
    `num_computed_tokens` is how many tokens' KV the receiving cache will hold (0 for a prefill,
    the pulled length for a decode).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: Any  # SamplingParams
    seed: int
    max_tokens: int
    arrival_time: float
    num_computed_tokens: int = 0
    num_preemptions: int = 0


# ------------------------------------------------------------------------- commands
@dataclasses.dataclass(frozen=True)
class Admit:
    request: RequestState


@dataclasses.dataclass(frozen=True)
class Pull:
    request: RequestState
    source: str  # the prefill worker holding the KV
    source_blocks: tuple[int, ...]  # the request's block table there
    offer: Any = None  # across processes: the source's `KVOffer` (address, id, layout)


@dataclasses.dataclass(frozen=True)
class Release:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Finish:
    request_id: str
    reason: str  # "stop", "length", "abort" or "error"


@dataclasses.dataclass(frozen=True)
class HandOff:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Sync:
    token: int
    warmup: bool = False


# ------------------------------------------------------------------------- events
@dataclasses.dataclass(frozen=True)
class WorkerLoad:
    """One worker's state as routing and `info()` see it (sent in `Status` and `Synced`)."""

    name: str
    role: str  # "prefill", "decode" or "colocated"
    tp: int
    pp: int
    devices: tuple[int, ...]
    num_waiting: int
    num_running: int
    queued_tokens: int  # tokens still to prefill here
    num_incoming: int  # pulls in flight into this cache (decode)
    num_waiting_migration: int  # prefilled, waiting for a pull (prefill)
    free_blocks: int
    total_blocks: int
    block_size: int
    max_num_seqs: int
    max_inflight_pulls: int
    num_steps: int
    busy_seconds: float
    uptime_seconds: float
    step_time_buckets: tuple[int, ...] = ()  # cumulative counts per `STEP_TIME_BUCKETS` bound, then +Inf
    step_time_sum: float = 0.0
    alive: bool = True
    warming: bool = False  # work its warm-up left for later is still running (`ModelRunner.has_background_work`)

    @property
    def load(self) -> int:
        """Requests this decode worker holds or is pulling."""
        return self.num_running + self.num_incoming

    def info(self) -> dict[str, Any]:
        # The public name of a colocated replica's role (the proto's InstanceInfo.role) is "both".
        d = {"name": self.name, "role": "both" if self.role == "colocated" else self.role, "tp": self.tp, "pp": self.pp, "devices": list(self.devices),
             "num_waiting": self.num_waiting, "num_running": self.num_running,
             "free_blocks": self.free_blocks, "total_blocks": self.total_blocks,
             "num_steps": self.num_steps, "alive": self.alive, "warming": self.warming,
             "busy_fraction": self.busy_seconds / self.uptime_seconds if self.uptime_seconds > 0 else 0.0,
             "step_time_buckets": list(self.step_time_buckets), "step_time_sum": self.step_time_sum}
        if self.role == "prefill":
            d["num_waiting_migration"] = self.num_waiting_migration
        elif self.role == "decode":
            d["num_incoming"] = self.num_incoming
        return d


# Upper bounds (seconds) of the per-worker step-time histogram; the last bucket is +Inf.
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True)
class Token:
    worker: str
    request_id: str
    token_id: int
    logprob: float
    top_logprobs: dict[int, float]
    time: float
    prefill_start: float | None = None  # when its (re)prefill started here (prefill and colocated workers)
    num_preemptions: int = 0  # times the request was preempted so far
    prompt_logprobs: Any = None  # with the token that ends a prefill, when asked for


@dataclasses.dataclass(frozen=True)
class TokenRun:
    """Decode tokens of several requests of one worker over consecutive steps, in one event.

    Request `request_ids[i]` got `token_ids[i][j]` at `times[j]` (so each request's tokens are at
    the first `len(token_ids[i])` times). Never a request's first token (that is a `Token`, with
    its prefill start); no logprobs. The controller applies it as the `Token`s it stands for.
    """

    worker: str
    request_ids: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    times: tuple[float, ...]
    num_preemptions: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Prefilled:
    worker: str
    request_id: str
    block_table: tuple[int, ...]
    num_computed_tokens: int
    offer: Any = None  # across processes: where and how to pull the KV (`kv_offer.KVOffer`)


@dataclasses.dataclass(frozen=True)
class HandedOff(Prefilled):
    """A decode worker's request, paused after `HandOff`, ready to pull: `num_computed_tokens` is
    prompt + outputs - 1 (the last token's KV is written by the next step, wherever it runs)."""


@dataclasses.dataclass(frozen=True)
class Pulled:
    worker: str
    request_id: str
    source: str
    num_bytes: int
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class PullRefused:
    worker: str
    request_id: str


@dataclasses.dataclass(frozen=True)
class PullFailed:
    """The source's KV could not be pulled (its process died or is unreachable): recompute."""

    worker: str
    request_id: str
    error: str


@dataclasses.dataclass(frozen=True)
class Preempted:
    worker: str
    request_id: str


@dataclasses.dataclass(frozen=True)
class Status:
    load: WorkerLoad


@dataclasses.dataclass(frozen=True)
class Synced:
    token: int
    load: WorkerLoad
    num_discarded_rows: int
    warmed_shapes: int = 0


@dataclasses.dataclass(frozen=True)
class WorkerFailed:
    worker: str
    error: str
    request_ids: tuple[str, ...]
    process_died: bool = False  # the process is gone (not a step that raised): its requests are recomputed


@dataclasses.dataclass(frozen=True)
class WorkerJoined:
    """A replacement of a failed worker (a restarted process) serves again, empty."""

    load: WorkerLoad


def drain(events: "queue.SimpleQueue", timeout: float | None) -> list[Any]:
    """Every event in `events`, waiting for the first up to `timeout` seconds (0: not at all; None:
    for as long as it takes). `None` items (an executor's wake-ups) are dropped."""
    out = []
    try:
        out.append(events.get_nowait() if timeout == 0 else events.get(timeout=timeout))
    except queue.Empty:
        return out
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return [e for e in out if e is not None]

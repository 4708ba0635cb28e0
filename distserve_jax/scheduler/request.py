"""A request's state as the schedulers see it: tokens, progress, status and timestamps."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"            # queued for (re)prefill
    RUNNING = "running"            # holds KV on an instance, being computed
    WAITING_MIGRATION = "waiting_migration"  # prefilled; KV on the prefill instance, not yet pulled
    MIGRATING = "migrating"        # a decode instance is pulling its KV
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclasses.dataclass(eq=False)  # identity: queues test membership by object, never by value
class Request:
    """Everything the scheduler tracks for one request.

    `num_computed_tokens` counts tokens whose KV is in the cache of the instance holding the
    request. The next step feeds `all_token_ids[num_computed_tokens:]` (a prompt, a prompt chunk,
    or the last sampled token).

    `num_inflight_tokens` counts tokens that launched steps will sample for the request but that
    the host has not fetched yet (an engine that launches step N+1 before fetching step N). They
    count in `num_tokens`, so the scheduler plans for them; `all_token_ids` holds only the known
    ones. `max_tokens` is the most tokens the request may generate (its `max_tokens`, capped by
    the context length).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: Any  # SamplingParams (kept untyped so this module has no runtime dependency)
    seed: int
    arrival_time: float
    max_tokens: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_inflight_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Timestamps (seconds, `time.perf_counter` clock of the engine).
    prefill_start: float | None = None
    prefill_end: float | None = None
    migration_start: float | None = None
    migration_end: float | None = None
    migration_bytes: int = 0
    decode_start: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, those still in flight included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def max_num_tokens(self) -> int:
        """The most tokens (prompt and output) the request can ever have."""
        return len(self.prompt_token_ids) + self.max_tokens

    @property
    def reaches_max_tokens(self) -> bool:
        """True when the tokens generated so far (in flight included) end the request by length."""
        return len(self.output_token_ids) + self.num_inflight_tokens >= self.max_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the whole prompt (and any output to recompute) is in the cache."""
        return self.num_pending_tokens > 1 or self.num_computed_tokens == 0

    @property
    def finished(self) -> bool:
        return self.status.finished

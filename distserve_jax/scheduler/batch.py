"""What a scheduler hands to the engine for one step: which requests, how many new tokens each."""

from __future__ import annotations

import dataclasses

from distserve_jax.scheduler.request import Request


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """Feed `request.all_token_ids[start:start + num_new_tokens]` (start = num_computed_tokens)."""

    request: Request
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk brings the request up to date, so a token is sampled after it."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)

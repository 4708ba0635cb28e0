"""Iteration-level scheduling policies for one instance (pure Python, no JAX).

`Scheduler` owns an instance's waiting queue, its running set and its `BlockManager`; a policy's
`schedule()` picks the requests of the next step and reserves their KV blocks.

An engine may schedule step N+1 while step N runs: a request's token in flight counts in its
length (`Request.num_inflight_tokens`), a request whose in-flight token ends it by length is not
given another, and a preempted request whose token is still in flight waits for it before being
recomputed.

- `PrefillFirstScheduler` (vLLM-style, the `colocated` baseline and the single-mesh engine):
  a step is either a prefill batch (FCFS under a token budget, admitted only if its blocks fit)
  or, when nothing can be admitted, one decode token for every running request. A running
  request that cannot get its next block preempts the newest running request (its blocks are
  freed and it is requeued at the front for recomputation).
- `ChunkedPrefillScheduler` (Sarathi-style, the `chunked` baseline): every step carries all
  running decodes plus as much pending prefill, in chunks, as fits the token budget.
"""

from __future__ import annotations

import collections
import dataclasses

from distserve_jax.scheduler.batch import ScheduledSeq, SchedulerOutput
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step: most sequences, most tokens (a longer prompt runs alone)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class Scheduler:
    """Queues and KV accounting of one instance; subclasses decide what runs each step."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    # ------------------------------------------------------------- queries
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_tokens(self) -> int:
        """Tokens still to prefill here (for shortest-queue dispatch)."""
        return sum(r.num_pending_tokens for r in self.waiting) + sum(
            r.num_pending_tokens for r in self.running if r.is_prefill)

    def find(self, request_id: str) -> Request | None:
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        for r in self.running:
            if r.request_id == request_id:
                return r
        return None

    # ------------------------------------------------------------- mutations
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopts a request whose KV is already in this instance's cache (after a migration)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request, status: RequestStatus) -> None:
        """Takes a request out of this instance (finished or aborted) and frees its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.blocks.has(request.request_id):
            self.blocks.free(request.request_id)
        request.status = status

    def preempt(self, request: Request) -> None:
        """Frees a running request's blocks and requeues it first, to be recomputed."""
        self._evict(request)
        self.waiting.appendleft(request)

    def _evict(self, request: Request) -> None:
        """Takes a running request off this instance for recomputation (its KV is dropped)."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING

    def _admit_head(self, num_tokens: int) -> ScheduledSeq:
        """Moves the head of the waiting queue to running with blocks for its first `num_tokens`."""
        r = self.waiting.popleft()
        self.blocks.allocate(r.request_id, num_tokens)
        r.status = RequestStatus.RUNNING
        self.running.append(r)
        return ScheduledSeq(r, num_tokens)

    def after_step(self, out: SchedulerOutput) -> None:
        """Records that the scheduled tokens are now in the cache."""
        for s in out.seqs:
            s.request.num_computed_tokens += s.num_new_tokens

    def schedule(self) -> SchedulerOutput:
        raise NotImplementedError

    # ------------------------------------------------------------- building blocks
    def _admit_prefills(self, budget: int, max_seqs: int, allow_oversized: bool) -> list[ScheduledSeq]:
        """FCFS admission of waiting requests whose whole prompt fits `budget` and the cache.

        With `allow_oversized`, a head-of-queue prompt longer than the budget runs alone.
        """
        seqs: list[ScheduledSeq] = []
        while self.waiting and len(seqs) < max_seqs and not self.waiting[0].num_inflight_tokens:
            r = self.waiting[0]
            n = r.num_pending_tokens
            if n > budget and not (allow_oversized and not seqs and budget == self.config.max_num_batched_tokens):
                break
            if not self.blocks.can_fit(n):
                break
            seqs.append(self._admit_head(n))
            budget -= n
            if budget <= 0:
                break
        return seqs

    def _decode_candidates(self) -> list[Request]:
        """Running requests due a decode token: past their prompt, and not already ended by
        length with a token still in flight."""
        return [r for r in self.running if not r.is_prefill and not r.reaches_max_tokens]

    def _reserve_decode_slots(self, candidates: list[Request]) -> tuple[list[ScheduledSeq], list[Request]]:
        """One more KV slot for each candidate, preempting the newest running request on a full cache."""
        seqs, preempted = [], []
        for r in candidates:
            if r not in self.running:
                continue  # preempted earlier in this loop
            while not self.blocks.can_fit(1, r.request_id):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
            if r in self.running:
                self.blocks.append_slots(r.request_id, 1)
                seqs.append(ScheduledSeq(r, 1))
        return seqs, preempted


class PrefillFirstScheduler(Scheduler):
    """Prefill-priority iteration scheduling (vLLM v0): a step is all-prefill or all-decode."""

    def schedule(self) -> SchedulerOutput:
        room = self.config.max_num_seqs - len(self.running)
        if room > 0 and self.waiting:
            seqs = self._admit_prefills(self.config.max_num_batched_tokens, room, allow_oversized=True)
            if seqs:
                return SchedulerOutput(seqs)
        seqs, preempted = self._reserve_decode_slots(self._decode_candidates())
        return SchedulerOutput(seqs, preempted)


class ChunkedPrefillScheduler(Scheduler):
    """Sarathi-style: all running decodes, then prefill chunks filling the rest of the token budget."""

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs, preempted = self._reserve_decode_slots(self._decode_candidates())
        budget -= len(seqs)
        # Continue partially prefilled requests first (FCFS), then admit new ones.
        for r in [r for r in self.running if r.is_prefill]:
            if budget <= 0 or len(seqs) >= self.config.max_num_seqs:
                break
            n = min(r.num_pending_tokens, budget)
            if not self.blocks.can_fit(n, r.request_id):
                continue
            self.blocks.append_slots(r.request_id, n)
            seqs.append(ScheduledSeq(r, n))
            budget -= n
        while (self.waiting and budget > 0 and len(seqs) < self.config.max_num_seqs
               and len(self.running) < self.config.max_num_seqs and not self.waiting[0].num_inflight_tokens):
            r = self.waiting[0]
            n = min(r.num_pending_tokens, budget)
            if not self.blocks.can_fit(n):
                break
            seqs.append(self._admit_head(n))
            budget -= n
        return SchedulerOutput(seqs, preempted)

"""Scheduling for disaggregated serving (pure Python, no JAX): prefill and decode instances.

- `PrefillScheduler`: FCFS prefill batches under a token budget and a batch size; a prompt longer
  than the budget runs alone (never starved). A batch is admitted only if this instance's cache
  holds it together with every prefilled request whose KV has not been pulled yet (back-pressure).
  After its prefill, a request waits here, holding its blocks, until a decode instance pulls it.
- `DecodeScheduler`: continuous batching of the requests pulled into this instance, under the
  batch size and KV capacity; a full cache preempts the newest request (the engine sends it back
  to prefill for recomputation). It accepts a pull only with room for it and a short queue.
Which instance a request goes to is the controller's choice (`routing`).
"""

from __future__ import annotations

from distserve_jax.scheduler.batch import SchedulerOutput
from distserve_jax.scheduler.policies import Scheduler, SchedulerConfig
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.request import Request, RequestStatus
from distserve_jax.scheduler.routing import tokens_to_accept


class PrefillScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        super().__init__(config, block_manager)
        self.prefilled: list[Request] = []  # KV here, waiting to be pulled

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.prefilled)

    def schedule(self) -> SchedulerOutput:
        seqs = self._admit_prefills(self.config.max_num_batched_tokens, self.config.max_num_seqs,
                                    allow_oversized=True)
        return SchedulerOutput(seqs)

    def mark_prefilled(self, request: Request) -> None:
        """The request's prompt is in this cache; it now waits for a pull."""
        self.running.remove(request)
        request.status = RequestStatus.WAITING_MIGRATION
        self.prefilled.append(request)

    def release(self, request: Request) -> None:
        """A decode instance holds the request's KV now: free it here."""
        self.prefilled.remove(request)
        self.blocks.free(request.request_id)

    def remove(self, request: Request, status: RequestStatus) -> None:
        if request in self.prefilled:
            self.prefilled.remove(request)
        super().remove(request, status)

    def find(self, request_id: str) -> Request | None:
        return super().find(request_id) or next((r for r in self.prefilled if r.request_id == request_id), None)


class DecodeScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, *, max_inflight_pulls: int = 8):
        super().__init__(config, block_manager)
        self.incoming: list[Request] = []  # being pulled into this cache
        self.max_inflight_pulls = max_inflight_pulls

    def has_unfinished(self) -> bool:
        return bool(self.running or self.incoming)

    @property
    def load(self) -> int:
        return len(self.running) + len(self.incoming)

    def can_accept(self, request: Request) -> bool:
        """A free batch slot, a short pull queue, and room for the request's KV plus one block of
        growth (capped at the most the request can ever hold: `routing.tokens_to_accept`)."""
        need = tokens_to_accept(request.num_computed_tokens, request.max_num_tokens, self.blocks.block_size)
        return (self.load < self.config.max_num_seqs and len(self.incoming) < self.max_inflight_pulls
                and self.blocks.can_fit(need))

    def begin_pull(self, request: Request) -> list[int]:
        """Reserves blocks for an incoming request; returns its block table here."""
        blocks = self.blocks.allocate(request.request_id, request.num_computed_tokens)
        request.status = RequestStatus.MIGRATING
        self.incoming.append(request)
        return blocks

    def end_pull(self, request: Request) -> None:
        self.incoming.remove(request)
        self.add_running(request)

    def remove(self, request: Request, status: RequestStatus) -> None:
        if request in self.incoming:
            self.incoming.remove(request)
        super().remove(request, status)

    def preempt(self, request: Request) -> None:
        """Frees the request here; the engine requeues it on a prefill instance for recomputation."""
        self._evict(request)

    def schedule(self) -> SchedulerOutput:
        seqs, preempted = self._reserve_decode_slots(self._decode_candidates())
        return SchedulerOutput(seqs, preempted)

    def find(self, request_id: str) -> Request | None:
        return super().find(request_id) or next((r for r in self.incoming if r.request_id == request_id), None)


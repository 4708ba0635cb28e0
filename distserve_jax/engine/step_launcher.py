"""Launching an instance's steps, one at a time or ahead: from scheduled sequences to runner work,
and from fetched samples back to their requests.

Owns the bookkeeping of launching ahead (step N+1 launched before step N's tokens are fetched):
- `launch_step` schedules and launches a step; a request whose last token is still in flight in
  `prev` is fed it on the device, and every sampled row becomes a token in flight.
- `next_to_fetch` picks the step an engine fetches now (the one launched ahead last time, or a
  new one) and launches the step after it, ahead.
- `fetch_step` waits for a launched step and pairs each sampled token with its request, dropping
  the rows of requests that ended while the step ran (a stop, an abort).
- `seq_work` turns one scheduled sequence into the runner's `SeqWork`.

The engines decide what a token means (outputs, finishing, migration) and when to launch ahead.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

from distserve_jax.step_types import SampleResult, SeqWork
from distserve_jax.scheduler.batch import ScheduledSeq, SchedulerOutput
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.policies import Scheduler
from distserve_jax.scheduler.request import Request

if TYPE_CHECKING:  # the runtime is never imported here: the simulator drives this module without JAX
    from distserve_jax.runtime.model_runner import ModelRunner, PendingStep


@dataclasses.dataclass
class InFlightStep:
    """A launched step whose tokens are not fetched yet."""

    scheduled: SchedulerOutput
    pending: PendingStep
    rows: dict[int, int]  # id(request) -> its row, for the rows that sample a token

    @property
    def ended(self) -> bool:
        """True when every request in the step has ended since: nothing in it is worth fetching."""
        return all(s.request.finished for s in self.scheduled.seqs)

    @property
    def uses_penalties(self) -> bool:
        """Penalties need every generated token on the host, so such a step is not launched ahead of."""
        return any(w.sample and w.sampling.uses_penalties for w in self.pending.works)


def seq_work(s: ScheduledSeq, blocks: BlockManager, now: float, prev_rows: dict[int, int] | None = None) -> SeqWork:
    """The runner's view of one scheduled sequence (stamps its prefill start).

    A request whose last token is still in flight is fed it on the device, from its row in the
    previous launched step (`prev_rows`: id(request) -> row).
    """
    r = s.request
    if r.prefill_start is None:
        r.prefill_start = now
    start = r.num_computed_tokens
    tokens, prev_row = r.all_token_ids[start:start + s.num_new_tokens], None
    if r.num_inflight_tokens:
        prev_row = (prev_rows or {}).get(id(r))
        if prev_row is None or s.num_new_tokens != 1 or r.num_inflight_tokens != 1:
            raise RuntimeError(f"request {r.request_id!r} has a token in flight outside the previous step")
        tokens = [0]  # placeholder: the runner reads the token on the device
    return SeqWork(token_ids=tokens, context_len=start,
                   block_table=blocks.block_table(r.request_id), sampling=r.sampling, seed=r.seed,
                   num_generated=len(r.output_token_ids) + r.num_inflight_tokens, sample=s.completes_prompt,
                   prompt_ids=r.prompt_token_ids, output_ids=r.output_token_ids, prev_row=prev_row)


def launch_step(scheduler: Scheduler, blocks: BlockManager, runner: ModelRunner, prev: InFlightStep | None,
                now: float | None = None) -> tuple[SchedulerOutput, InFlightStep | None]:
    """Schedules a step on `scheduler` and launches it (None when nothing was scheduled).

    `now` (the caller's clock; default `time.perf_counter()`) stamps the prefill start of requests
    that start here. The scheduler output is returned either way: its `preempted` requests are the
    caller's to handle.
    """
    out = scheduler.schedule()
    if not out:
        return out, None
    now = time.perf_counter() if now is None else now
    works = [seq_work(s, blocks, now, prev.rows if prev else None) for s in out.seqs]
    pending = runner.launch(works, prev.pending if prev else None)
    scheduler.after_step(out)
    rows = {}
    for i, (s, w) in enumerate(zip(out.seqs, works)):
        if w.sample:
            s.request.num_inflight_tokens += 1
            rows[id(s.request)] = i
    return out, InFlightStep(out, pending, rows)


def next_to_fetch(inflight: InFlightStep | None, launch: Callable[[InFlightStep | None], InFlightStep | None],
                  ahead: bool) -> tuple[InFlightStep | None, InFlightStep | None, int]:
    """(the step to fetch now, the step launched ahead of it, rows dropped).

    The step to fetch is `inflight` (launched ahead last time), or a step launched now when there is
    none or every request in it has ended (its rows are dropped unfetched). With `ahead`, the
    following step is launched before returning, unless penalties need the current one's tokens
    first. `launch(prev)` schedules and launches a step fed from `prev` (None: nothing scheduled).
    """
    dropped = 0
    if inflight is not None and inflight.ended:
        dropped, inflight = len(inflight.rows), None
    current = inflight if inflight is not None else launch(None)
    if current is None:
        return None, None, dropped
    nxt = launch(current) if ahead and not current.uses_penalties else None
    return current, nxt, dropped


def fetch_step(runner: ModelRunner, step: InFlightStep) -> tuple[list[tuple[Request, SampleResult]], int]:
    """Waits for a launched step: (request, sample) for each live sampled row, and the number of
    rows dropped because their request ended while the step ran."""
    results = runner.collect(step.pending)
    live, dropped = [], 0
    for s, res in zip(step.scheduled.seqs, results):
        if res is None:
            continue
        r = s.request
        r.num_inflight_tokens -= 1
        if r.finished:
            dropped += 1
        else:
            live.append((r, res))
    return live, dropped

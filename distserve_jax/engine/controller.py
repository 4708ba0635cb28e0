"""The controller: the request table between the front end and the workers.

It validates requests, routes them (prefill: the worker with the fewest tokens queued; decode:
the least loaded worker with room, `scheduler.routing`), keeps the migration queue (FCFS), turns
the workers' tokens into `RequestOutput`s (detokenizing and stop checks happen here, once), and
ends requests wherever they are (stop, length, abort, a failed worker). It talks to the workers
only by messages (`messages`) through an executor (`send`, `poll`, `wake`), so the same controller
drives threads, processes or a simulation, and it reads time only from the clock it is given.

    front end (LLM / AsyncEngine)
        |  add_request / abort_request / step
    Controller --Admit--> prefill workers --Token, Prefilled--> Controller
        |                                                        |
        +--Pull(source, blocks)--> decode workers <--KV pull-- prefill worker
                                   |--Token, Pulled, Preempted--> Controller --Release--> prefill

Colocated and chunked replicas are workers of role "colocated": `Admit` only, no migration.

A worker whose step raised (`WorkerFailed`) fails the requests it held (finish_reason "error", its
error in `RequestOutput.error`): the same request could fail the next worker too. A worker whose
process died has its requests recomputed on the survivors from the tokens they have (sampling
depends only on a request's seed and position, so a stream goes on unchanged), at most
`max_recomputes` times each; a pull whose source is gone (`PullFailed`) is recomputed the same
way. The engine keeps serving on the rest; when no worker is left for a phase and the executor
does not restart workers, `step()` raises `EngineDeadError`.

`apply_placement(target)` changes the deployment while it serves (`live_placement`): new
instances start first, leaving ones stop taking requests once they joined, finish what they hold
and are removed; `step()` moves the change on, `placement_change` and `info()` report it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from absl import logging

from distserve_jax.engine import messages as m
from distserve_jax.engine.output_processor import OutputProcessor, RequestOutput
from distserve_jax.engine.live_placement import LivePlacement
from distserve_jax.engine.placement_change import ChangeRun, LiveInstance, PlacementChange
from distserve_jax.engine.validation import build_request
from distserve_jax.engine.workload_monitor import WorkloadMonitor
from distserve_jax.sampling_params import SamplingParams
from distserve_jax.scheduler.request import Request, RequestStatus
from distserve_jax.scheduler.routing import blocks_for, pick_decode, pick_prefill, tokens_to_accept

if TYPE_CHECKING:  # the model source loads weights (JAX); a spec is only read here (the simulator passes its own)
    from distserve_jax.engine.model_source import ModelSpec

WARM_POLL_S = 0.5  # `wait_warm` asks the workers this often

_FINISH_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
                  "abort": RequestStatus.FINISHED_ABORTED, "error": RequestStatus.FINISHED_ABORTED}


class EngineDeadError(RuntimeError):
    """The engine cannot serve any request (its loop stopped, or no worker is left for a phase)."""


@dataclasses.dataclass(eq=False)  # identity (the migration queue is searched by object)
class _Tracked:
    req: Request  # the controller's record: outputs, timestamps, status
    key: str  # the id in messages (unique per add, so a reused request id never meets stale events)
    holders: set[str] = dataclasses.field(default_factory=set)  # workers that may hold its state
    queued_at: str | None = None  # prefill worker it is queued at (counted in its queued tokens)
    queued_tokens: int = 0
    source: str | None = None  # prefill worker holding its KV after the prefill
    source_blocks: tuple[int, ...] = ()
    offer: Any = None  # across processes: how to pull that KV
    num_computed_tokens: int = 0
    num_recomputes: int = 0  # times a lost worker made it start over from a prefill


class Controller(LivePlacement):
    """Engine core over workers (the `EngineCore` interface of `AsyncEngine` and `LLM`).

    Args:
      spec: the model (tokenizer, config).
      executor: hosts the workers (`send(name, cmd)`, `poll(timeout)`, `wake()`, `shutdown()`).
      roles: worker name -> "prefill", "decode" or "colocated".
      max_model_len: the context length.
      mode, placement: what `info()` reports.
      seed: for request seeds not given.
      clock: seconds; `time.perf_counter` for real workers, a virtual clock in simulation.
      layout: `(name, role, tp, pp, device indices or None)` per worker, what `current_placement()`
        starts from; by default read from the workers' first reports.
    """

    def __init__(self, spec: ModelSpec, executor: Any, roles: dict[str, str], *, max_model_len: int,
                 mode: str, placement: str, seed: int = 0, clock: Callable[[], float] = time.perf_counter,
                 poll_timeout: float = 0.05, max_recomputes: int = 2,
                 layout: Sequence[tuple[str, str, int, int, tuple[int, ...] | None]] | None = None,
                 log_preemptions: bool = True):
        self.spec, self.executor, self.roles = spec, executor, dict(roles)
        # Each preemption is logged at INFO (a server's operator wants them); a simulation of
        # thousands of requests logs them at DEBUG.
        self._log_preemption = logging.info if log_preemptions else logging.debug
        self.mode, self.placement = mode, placement
        self.max_model_len = max_model_len
        self.clock, self.poll_timeout = clock, poll_timeout
        self.max_recomputes = max_recomputes
        # An executor that restarts dead workers (Ray) keeps the engine up while a phase has none.
        self.restartable = bool(getattr(executor, "restarts_workers", False))
        tok = spec.tokenizer
        eos = tok.eos_token_ids if tok is not None and tok.eos_token_ids else spec.config.eos_token_ids
        self.outputs = OutputProcessor(tok, tuple(eos), max_model_len)
        self.requests: dict[str, Request] = {}
        self._tracked: dict[str, _Tracked] = {}  # key -> request
        self._key_of: dict[str, str] = {}  # request id -> key
        self._rng = np.random.default_rng(seed)
        self._next_id = 0
        self._keys = itertools.count()
        self._sync_tokens = itertools.count()
        self._synced: dict[int, dict[str, m.Synced]] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.loads: dict[str, m.WorkerLoad] = {}
        self._refused: set[str] = set()  # decode workers that refused a pull since their last Status
        self._queued = {n: 0 for n, r in roles.items() if r != "decode"}
        self.migration_queue: collections.deque[_Tracked] = collections.deque()
        self._parked: collections.deque[_Tracked] = collections.deque()  # waiting for a prefill worker to restart
        self.migrated_bytes = 0
        self.num_handoffs = 0  # requests a leaving decode worker handed to another one (placement changes)
        self.migration_seconds: list[float] = []
        self.failures: list[tuple[str, str]] = []  # (worker, error)
        self.host_seconds = 0.0  # time step() spent applying events and dispatching pulls
        self.num_events = 0
        self._dead: EngineDeadError | None = None
        self.placement_change: PlacementChange | None = None  # the change in progress, or the last one
        self.placement_changes: collections.Counter = collections.Counter()  # finished changes by state
        self._change: ChangeRun | None = None
        self._names_used = set(roles)  # a new instance never takes the name of an old one
        self.monitor = WorkloadMonitor(self.clock())  # arrivals and completions (the replanner reads it)
        self.quiesce()  # every worker's first report: sizes for validation and routing
        fixed = bool(getattr(executor, "fixed_devices", False))
        self._layout: dict[str, LiveInstance] = {
            n: LiveInstance(n, r, tp, pp, tuple(d) if d is not None and fixed else None)
            for n, r, tp, pp, d in (layout if layout is not None else
                                    [(n, r, self.loads[n].tp, self.loads[n].pp, self.loads[n].devices)
                                     for n, r in self.roles.items()])}

    # ------------------------------------------------------------ requests
    @property
    def prefill_workers(self) -> list[str]:
        return [n for n, r in self.roles.items() if r != "decode"]

    @property
    def decode_workers(self) -> list[str]:
        return [n for n, r in self.roles.items() if r == "decode"]

    def _max_kv_tokens(self) -> int:
        return min((ld.total_blocks * ld.block_size for ld in self.loads.values() if ld.alive), default=0)

    def add_request(self, request_id: str | None = None, prompt: str | None = None,
                    prompt_token_ids: Sequence[int] | None = None, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        """Validates and queues a request; raises ValueError (naming the problem) and queues nothing on bad input."""
        if self._dead is not None:
            raise self._dead
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = build_request(self.spec, self.max_model_len, self._max_kv_tokens(), self._rng, request_id,
                            prompt, prompt_token_ids, params, self.clock() if arrival_time is None else arrival_time)
        tr = _Tracked(req, f"{request_id}@{next(self._keys)}")
        self.requests[request_id] = req
        self._tracked[tr.key] = tr
        self._key_of[request_id] = tr.key
        self.outputs.add(request_id, req.prompt_token_ids, req.sampling)
        self.monitor.on_arrival(req.arrival_time, len(req.prompt_token_ids))
        self._admit(tr)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request wherever it is and frees everything it holds; None if unknown or finished."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        tr = self._tracked[self._key_of[request_id]]
        self._end(tr, "abort")
        req.finish_time = self.clock()
        return self.outputs.final_abort(request_id, req.prompt_token_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def wake(self) -> None:
        """Ends a `step()` that waits for events (the front end has a command for the controller)."""
        self.executor.wake()

    def _state(self, tr: _Tracked, num_computed: int) -> m.RequestState:
        r = tr.req
        return m.RequestState(tr.key, tuple(r.prompt_token_ids), tuple(r.output_token_ids), r.sampling, r.seed,
                              r.max_tokens, r.arrival_time, num_computed, r.num_preemptions)

    def _draining(self) -> set[str]:
        return self._change.draining if self._change is not None else set()

    def _admit(self, tr: _Tracked) -> None:
        draining = self._draining()
        names = [n for n in self.prefill_workers if n not in draining]
        i = pick_prefill([self._queued[n] for n in names], [self.loads[n].alive for n in names])
        if i is None:
            coming = self._change is not None and any(
                i.role != "decode" for i in (*self._change.waiting.values(), *self._change.starting.values()))
            if self.restartable or coming:  # a restarted or new worker takes it (`WorkerJoined`)
                tr.req.status = RequestStatus.WAITING
                self._parked.append(tr)
            else:
                self._end(tr, "error", "no prefill worker is alive")
            return
        name = names[i]
        tr.queued_at, tr.queued_tokens = name, tr.req.num_tokens
        self._queued[name] += tr.queued_tokens
        tr.holders.add(name)
        tr.req.status = RequestStatus.WAITING
        self.executor.send(name, m.Admit(self._state(tr, 0)))

    def _unqueue(self, tr: _Tracked) -> None:
        if tr.queued_at is not None:
            self._queued[tr.queued_at] -= tr.queued_tokens
            tr.queued_at, tr.queued_tokens = None, 0

    def _withdraw(self, tr: _Tracked, reason: str) -> None:
        """Takes a request's message id out of every queue here and every live worker (`Finish`)."""
        self._tracked.pop(tr.key, None)
        self._unqueue(tr)
        if tr in self.migration_queue:
            self.migration_queue.remove(tr)
        if tr in self._parked:
            self._parked.remove(tr)
        for name in tr.holders:
            if name in self.loads and self.loads[name].alive:
                self.executor.send(name, m.Finish(tr.key, reason))
        tr.holders.clear()

    def _end(self, tr: _Tracked, reason: str, error: str | None = None) -> None:
        """Takes a request out everywhere; for "error" queues its final output."""
        r = tr.req
        self._withdraw(tr, reason)
        self.requests.pop(r.request_id, None)
        self._key_of.pop(r.request_id, None)
        r.status = _FINISH_STATUS[reason]
        if reason == "error":
            r.finish_time = self.clock()
            self.outputs.drop(r.request_id)
            self._pending_outputs.append(RequestOutput(
                r.request_id, list(r.prompt_token_ids), list(r.output_token_ids), [], "", "", True, "error",
                metrics=request_metrics(r), error=error))

    # ------------------------------------------------------------ events
    def step(self) -> list[RequestOutput]:
        """Applies the workers' events (waiting up to `poll_timeout` for one) and returns the outputs."""
        if self._dead is not None:
            raise self._dead
        events = self.executor.poll(0 if self._pending_outputs else self.poll_timeout)
        t0 = time.perf_counter()
        for e in events:
            self._on_event(e)
        self._dispatch_pulls()
        if self._change is not None:
            self._progress_change()
        self.host_seconds += time.perf_counter() - t0  # host work only (not the wait), for `info()`
        self.num_events += len(events)
        out, self._pending_outputs = self._pending_outputs, []
        if self._dead is not None and not out:
            raise self._dead
        return out

    def _on_event(self, e: Any) -> None:
        if isinstance(e, (m.WorkerJoined, m.WorkerFailed)) and self._change is not None:
            if self._on_new_worker_event(e):
                return
        name = e.load.name if isinstance(e, (m.Status, m.Synced, m.WorkerJoined)) else getattr(e, "worker", None)
        if name is not None and name not in self.roles:
            return  # a removed worker's last reports
        if isinstance(e, m.Status):
            self.loads[e.load.name] = e.load if self.loads.get(e.load.name, e.load).alive else \
                dataclasses.replace(e.load, alive=False)
            self._refused.discard(e.load.name)
            return
        if isinstance(e, m.Synced):
            self._synced.setdefault(e.token, {})[e.load.name] = e
            self.loads[e.load.name] = e.load
            return
        if isinstance(e, m.WorkerFailed):
            self._on_failure(e)
            return
        if isinstance(e, m.WorkerJoined):
            logging.info("worker %s serves again", e.load.name)
            self.loads[e.load.name] = e.load
            self._refused.discard(e.load.name)
            parked, self._parked = self._parked, collections.deque()
            for tr in parked:
                self._admit(tr)
            return
        if isinstance(e, m.TokenRun):
            self._on_token_run(e)
            return
        tr = self._tracked.get(e.request_id)
        if tr is None:
            return  # the request ended meanwhile; the worker got (or gets) its Finish
        if isinstance(e, m.Token):
            self._on_token(tr, e)
        elif isinstance(e, m.Prefilled):  # or HandedOff: a leaving decode worker's request, pulled the same way
            self.num_handoffs += isinstance(e, m.HandedOff)
            tr.source, tr.source_blocks, tr.num_computed_tokens = e.worker, e.block_table, e.num_computed_tokens
            tr.offer = e.offer
            tr.req.status = RequestStatus.WAITING_MIGRATION
            self.migration_queue.append(tr)
        elif isinstance(e, m.Pulled):
            r = tr.req
            self.executor.send(e.source, m.Release(tr.key))
            tr.holders.discard(e.source)
            tr.source = None
            r.status = RequestStatus.RUNNING
            r.migration_start, r.migration_end = e.start, e.end
            if r.decode_start is None:
                r.decode_start = e.end
            r.migration_bytes += e.num_bytes
            self.migrated_bytes += e.num_bytes
            self.migration_seconds.append(e.end - e.start)
        elif isinstance(e, m.PullRefused):
            tr.holders.discard(e.worker)
            self._refused.add(e.worker)
            tr.req.status = RequestStatus.WAITING_MIGRATION
            self.migration_queue.appendleft(tr)
        elif isinstance(e, m.PullFailed):
            logging.warning("%s could not pull %s from %s (%s); recomputing it", e.worker, tr.req.request_id,
                            tr.source, e.error)
            tr.holders.discard(e.worker)
            self._recompute(tr, f"its KV on {tr.source} was lost: {e.error}")
        elif isinstance(e, m.Preempted):
            self._log_preemption("%s preempted %s (KV cache full); recomputing it", e.worker, tr.req.request_id)
            tr.holders.discard(e.worker)
            tr.req.num_preemptions += 1
            self._admit(tr)
        else:
            raise TypeError(f"unknown event {e!r}")

    def _on_token(self, tr: _Tracked, e: m.Token) -> None:
        r = tr.req
        if tr.queued_at == e.worker:
            self._unqueue(tr)
        if r.prefill_start is None:
            r.prefill_start = e.prefill_start
        r.num_preemptions = max(r.num_preemptions, e.num_preemptions)
        if r.decode_start is None and self.roles[e.worker] == "colocated":
            r.decode_start = e.time
        r.output_token_ids.append(e.token_id)
        r.token_times.append(e.time)
        if r.prefill_end is None:
            r.prefill_end = e.time
        ro, reason = self.outputs.process(r.request_id, e.token_id, e.logprob, e.top_logprobs,
                                          prompt_logprobs=e.prompt_logprobs)
        self._took_tokens(tr, ro, reason, e.time)

    def _took_tokens(self, tr: _Tracked, ro: RequestOutput, reason: str | None, t: float) -> None:
        """After a request's new tokens (the last at `t`): ends it if `reason`, else marks it running;
        queues its output."""
        r = tr.req
        if reason is not None:
            r.finish_time = t
            self.monitor.on_finish(t, len(r.prompt_token_ids), len(r.output_token_ids))
            ro.metrics = request_metrics(r)
            self._end(tr, reason)
        elif r.status is RequestStatus.WAITING:
            r.status = RequestStatus.RUNNING
        self._pending_outputs.append(ro)

    def _on_token_run(self, e: m.TokenRun) -> None:
        """The `Token`s a `TokenRun` stands for; a request whose output needs no per-token work
        (`OutputProcessor.is_plain`) takes its tokens in one go."""
        for rid, ids, npre in zip(e.request_ids, e.token_ids, e.num_preemptions):
            tr = self._tracked.get(rid)
            if tr is None or not ids:
                continue  # ended meanwhile
            r = tr.req
            if r.prefill_end is None or not self.outputs.is_plain(r.request_id):
                for tok, t in zip(ids, e.times):
                    self._on_token(tr, m.Token(e.worker, rid, tok, 0.0, {}, t, num_preemptions=npre))
                    if self._tracked.get(rid) is not tr:
                        break
                continue
            if tr.queued_at == e.worker:
                self._unqueue(tr)
            r.num_preemptions = max(r.num_preemptions, npre)
            ro, reason, n = self.outputs.process_plain(r.request_id, ids)
            r.output_token_ids.extend(ids[:n])
            r.token_times.extend(e.times[:n])
            self._took_tokens(tr, ro, reason, e.times[n - 1])

    def _dispatch_pulls(self) -> None:
        """FCFS: each prefilled request goes to the least loaded decode worker with room."""
        draining = self._draining()
        names = [n for n in self.decode_workers if n not in draining]
        while self.migration_queue:
            tr = self.migration_queue[0]
            loads = [dataclasses.replace(self.loads[n], alive=False) if n in self._refused else self.loads[n]
                     for n in names]
            i = pick_decode(loads, tr.num_computed_tokens, tr.req.max_num_tokens)
            if i is None:
                return
            self.migration_queue.popleft()
            name, ld = names[i], self.loads[names[i]]
            tr.holders.add(name)
            tr.req.status = RequestStatus.MIGRATING
            self.executor.send(name, m.Pull(self._state(tr, tr.num_computed_tokens), tr.source, tr.source_blocks,
                                            tr.offer))
            need = blocks_for(tokens_to_accept(tr.num_computed_tokens, tr.req.max_num_tokens, ld.block_size),
                              ld.block_size)
            self.loads[name] = dataclasses.replace(ld, num_incoming=ld.num_incoming + 1,
                                                   free_blocks=ld.free_blocks - need)

    def _recompute(self, tr: _Tracked, why: str) -> None:
        """Starts a request over from a prefill (its KV is lost), with the tokens it has so far, under
        a new message id so that nothing still in flight for the old one can touch it."""
        if tr.num_recomputes >= self.max_recomputes:
            self._end(tr, "error", f"{why}; given up after {tr.num_recomputes} recomputations")
            return
        self._withdraw(tr, "abort")
        tr.key = f"{tr.req.request_id}@{next(self._keys)}"
        self._tracked[tr.key] = tr
        self._key_of[tr.req.request_id] = tr.key
        tr.source, tr.source_blocks, tr.offer = None, (), None
        tr.num_recomputes += 1
        self._admit(tr)

    def _on_failure(self, e: m.WorkerFailed) -> None:
        """A step that raised fails the requests the worker held (the same request could fail the next
        worker too); a process that died has its requests recomputed on the survivors."""
        logging.error("worker %s failed: %s; %s the requests it held", e.worker, e.error,
                      "recomputing" if e.process_died else "failing")
        self.failures.append((e.worker, e.error))
        self.loads[e.worker] = dataclasses.replace(self.loads[e.worker], alive=False)
        self._refused.discard(e.worker)
        msg = f"instance {e.worker} failed: {e.error}"
        alive = {r for n, r in self.roles.items() if self.loads[n].alive}
        needed = {"colocated"} if "colocated" in self.roles.values() else {"prefill", "decode"}
        for tr in list(self._tracked.values()):
            if e.worker in tr.holders or tr.source == e.worker:
                tr.holders.discard(e.worker)
                if e.process_died and (needed <= alive or self.restartable):
                    self._recompute(tr, msg)
                else:
                    self._end(tr, "error", msg)
        if not needed <= alive and not self.restartable:
            self._dead = EngineDeadError(f"no {'/'.join(sorted(needed - alive))} worker is left: {msg}")
            for tr in list(self._tracked.values()):
                self._end(tr, "error", str(self._dead))

    # ------------------------------------------------------------ state
    def quiesce(self, *, warmup: bool = False, timeout: float = 600.0) -> dict[str, m.Synced]:
        """Waits until every live worker has applied every command sent so far (and warmed up, if asked);
        returns each one's answer. Outputs produced meanwhile are returned by the next `step()`."""
        token = next(self._sync_tokens)
        names = [n for n in self.roles if n not in self.loads or self.loads[n].alive]
        for n in names:
            self.executor.send(n, m.Sync(token, warmup))
        deadline = time.monotonic() + timeout
        while True:
            got = self._synced.get(token, {})
            dead = {n for n in names if n in self.loads and not self.loads[n].alive}
            if set(got) | dead >= set(names):
                return self._synced.pop(token, {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(set(names) - set(got) - dead)} did not answer within {timeout}s")
            for e in self.executor.poll(self.poll_timeout):
                self._on_event(e)

    def warmup(self, *, wait_background: bool = False, timeout: float = 600.0) -> int:
        """Compiles every step bucket of every worker and every pull size of every worker pair.

        It returns once requests can be served at compiled speed; the workers then still finish
        what warm-up leaves for later (sampler variants compiling in the background, the first run
        of each short step shape in their idle turns), which takes their cores for a while (seconds
        to minutes on a CPU host). `wait_background=True` also waits for that (`wait_warm`): what a
        measurement of steady-state serving needs."""
        if hasattr(self.executor, "warm_new_workers"):
            self.executor.warm_new_workers = True  # instances added later compile before they join
        shapes = sum(s.warmed_shapes for s in self.quiesce(warmup=True, timeout=timeout).values())
        warm_pulls = getattr(self.executor, "warm_pulls", None)  # pulls that cross processes
        shapes += warm_pulls() if warm_pulls is not None else 0
        if wait_background:
            self.wait_warm(timeout)
        return shapes

    def wait_warm(self, timeout: float = 600.0, poll_s: float = WARM_POLL_S) -> float:
        """Waits until no live worker has warm-up work left (`WorkerLoad.warming`); the seconds it
        waited. TimeoutError names the workers still warming after `timeout`. Asks every `poll_s`
        (a worker runs its pending warm runs only in turns with no command to apply)."""
        start = time.monotonic()
        while True:
            warming = sorted(n for n, s in self.quiesce(timeout=timeout).items() if s.load.warming)
            if not warming:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"workers {warming} still had warm-up work after {timeout}s")
            time.sleep(poll_s)

    @property
    def num_discarded_rows(self) -> int:
        """Rows computed for requests that had ended meanwhile (launching ahead), over all workers."""
        return sum(s.num_discarded_rows for s in self.quiesce().values())

    def info(self) -> dict[str, Any]:
        """Live state: every worker's last report (role, devices, queues, blocks, steps, busy fraction)."""
        for e in self.executor.poll(0):  # reports that arrived while no request was in flight
            self._on_event(e)
        extra = getattr(self.executor, "instance_info", lambda: {})()
        change = self.placement_change
        return {"mode": self.mode, "placement": self.placement, "max_model_len": self.max_model_len,
                "placement_change": change.info() if change is not None else None,
                "current_placement": dataclasses.asdict(now) if (now := self.current_placement()) else None,
                "placement_changes": dict(self.placement_changes),
                "executor": getattr(self.executor, "kind", "threads"),
                "instances": [{**self.loads[n].info(), **extra.get(n, {}),
                               "leaving": self._change is not None and n in self._change.leaving}
                              for n in self.roles],
                "num_waiting_migration": len(self.migration_queue),
                "num_migrating": sum(t.req.status is RequestStatus.MIGRATING for t in self._tracked.values()),
                "migrated_bytes": self.migrated_bytes, "num_worker_failures": len(self.failures),
                "num_handoffs": self.num_handoffs,
                "controller_host_seconds": self.host_seconds, "controller_events": self.num_events}

    def shutdown(self) -> None:
        self.executor.shutdown()


def request_metrics(r: Request) -> dict[str, float | None]:
    """A finished request's timestamps and derived latencies (seconds)."""
    first = r.token_times[0] if r.token_times else None
    n = len(r.token_times)
    return {
        "arrival_time": r.arrival_time, "prefill_start": r.prefill_start, "prefill_end": r.prefill_end,
        "migration_start": r.migration_start, "migration_end": r.migration_end, "decode_start": r.decode_start,
        "migration_bytes": r.migration_bytes,
        "finish_time": r.finish_time, "first_token_time": first,
        "ttft": None if first is None else first - r.arrival_time,
        "tpot": (r.token_times[-1] - first) / (n - 1) if n > 1 else None,
        "num_preemptions": r.num_preemptions, "token_times": list(r.token_times),
    }

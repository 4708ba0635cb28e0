"""One instance as an independent worker: its scheduler, KV blocks and runner, and its step loop body.

A worker applies the controller's commands (`messages`) and runs `step()`: schedule, launch,
collect, emit events. It never waits on another worker: a prefill worker keeps a prefilled
request's KV until a decode worker has pulled it (`Release`), and a decode worker pulls only what
it has room for (a `Pull` it cannot take is answered `PullRefused`).

Roles:
  - `prefill`: FCFS prefill batches (`PrefillScheduler`); emits each request's first token, then
    `Prefilled` with its block table.
  - `decode`: continuous batching of pulled requests (`DecodeScheduler`); a request that a full
    cache evicts is reported `Preempted` (once its token in flight has landed) for recomputation.
  - `colocated`: both phases on one instance (`PrefillFirstScheduler` or `ChunkedPrefillScheduler`),
    preemption requeued locally: a replica of the colocated or chunked baselines.

With `async_scheduling`, a worker launches its next step before fetching the current one
(`step_launcher`), prefill workers included; decode workers with pp > 1 run one step at a time,
their batch split into pp micro-batches so the stages overlap.

A worker ends a request by length itself (it knows `max_tokens`); stops by EOS, stop tokens and
stop strings are the controller's (it detokenizes), which sends `Finish`. A worker has no threads
and reads no wall clock: the executor drives it and gives it a `clock`, and its device work goes
through the runner and the `kv` pull function it is given.
"""

from __future__ import annotations

import bisect
import contextlib
import queue
from typing import Any, Callable

from distserve_jax.engine import messages as m
from distserve_jax.engine.step_launcher import InFlightStep, fetch_step, launch_step, next_to_fetch, seq_work
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.disagg import DecodeScheduler, PrefillScheduler
from distserve_jax.scheduler.policies import ChunkedPrefillScheduler, Scheduler
from distserve_jax.scheduler.request import Request, RequestStatus

Emit = Callable[[Any], None]
# kv_pull(pull command, dst_blocks) -> a transfer with wait(), num_bytes (both may raise KVSourceError) and,
# optionally, ready() (see `transfer_ready`)
KVPull = Callable[[Any, list[int]], Any]

class KVSourceError(RuntimeError):
    """The worker holding a request's KV has failed; the pull cannot be done."""


STOP = "stop"  # put in a worker's inbox: `turn` returns False
WARM_RUN_POLL_S = 0.05  # an idle worker whose warm-up runs wait for another instance's compilation polls its inbox this often


class RaiseCommand:
    """A command that makes `turn` raise `error` (tests: a worker that fails)."""

    def __init__(self, error: BaseException):
        self.error = error


_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
           "abort": RequestStatus.FINISHED_ABORTED, "error": RequestStatus.FINISHED_ABORTED}


class InstanceWorker:
    """The state and step logic of one instance (see the module docstring).

    Args:
      name, role: e.g. "decode-0", "decode".
      runner: the instance's `ModelRunner` (or anything with its `launch`/`collect`/`warmup`).
      blocks, scheduler: the instance's KV block accounting and scheduling policy.
      emit: called with every event, in order.
      clock: seconds (the executor's clock; the simulator passes a virtual one).
      kv_pull: for decode workers, starts a pull of blocks from a named prefill worker.
      warmup: compiles what this worker runs (its step buckets, and its pulls for a decode worker).
      pages_lock: held while launching a step, so a pull reading this cache never sees pages mid-swap.
      after_command: called with each command once it is applied (on the worker's thread).
      land_ready_pulls: a step lands only the pulls that have finished (the running batch keeps
        decoding while the others are in flight) and waits for one only when it has nothing else
        to run; False: every step waits for all the pulls started before it (the order of landings
        then depends on steps alone, not on transfer timing: what a step-by-step replay needs).
    """

    def __init__(self, name: str, role: str, *, runner: Any, blocks: BlockManager, scheduler: Scheduler,
                 emit: Emit, clock: Callable[[], float], async_scheduling: bool = True, tp: int = 1, pp: int = 1,
                 devices: tuple[int, ...] = (), kv_pull: KVPull | None = None,
                 warmup: Callable[[], int] | None = None, pages_lock: Any = None,
                 after_command: Callable[[Any], None] | None = None, land_ready_pulls: bool = True):
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"unknown worker role {role!r}")
        self.name, self.role = name, role
        self.runner, self.blocks, self.scheduler = runner, blocks, scheduler
        self.emit, self.clock = emit, clock
        self.async_scheduling = async_scheduling and (pp == 1 or role != "decode")
        self.tp, self.pp, self.devices = tp, pp, tuple(devices)
        self.kv_pull, self._warmup, self._after_command = kv_pull, warmup, after_command
        self.land_ready_pulls = land_ready_pulls
        self.pages_lock = pages_lock if pages_lock is not None else contextlib.nullcontext()
        self.requests: dict[str, Request] = {}
        self.inflight: InFlightStep | None = None
        self.pulls: list[tuple[Request, str, Any, float]] = []  # (request, source, transfer, start)
        self.preempted: dict[str, Request] = {}  # evicted, reported once their token in flight lands
        self.handoffs: dict[str, Request] = {}  # paused by `HandOff`, offered once their tokens in flight land
        self.offered: dict[str, Request] = {}  # handed off: KV held until `Release` (or `Finish`)
        self.num_discarded_rows = 0
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.started = clock()
        self.step_time_buckets = [0] * (len(m.STEP_TIME_BUCKETS) + 1)  # the last: +Inf
        self.step_time_sum = 0.0
        self.stalled = False  # its last step did nothing: wait for a command before the next

    # ------------------------------------------------------------ the loop
    def turn(self, inbox: Any, *, block: bool = True, step_after_sync: bool = True) -> bool:
        """One turn of the worker's loop: apply the queued commands from `inbox` (a `queue.Queue`;
        waiting for one when idle and `block`), emit a `Status` if any was applied, then run a step
        if there is work. False once `STOP` is read.

        With `step_after_sync=False`, a turn that answered a `Sync` does not step (a caller that
        drives workers by hand then sees the state the commands left).
        """
        handled = synced = False
        while True:
            try:
                idle = block and not handled and (self.stalled or not self.has_work())
                if not idle:
                    cmd = inbox.get_nowait()
                elif not self._warm_runs_left():
                    cmd = inbox.get()
                elif self.runner.warm_runs_ready():
                    cmd = inbox.get_nowait()  # none waiting: do a warm-up run instead (below)
                else:
                    cmd = inbox.get(timeout=WARM_RUN_POLL_S)  # another instance is still compiling
            except queue.Empty:
                break
            if isinstance(cmd, str) and cmd == STOP:
                return False
            if isinstance(cmd, RaiseCommand):
                raise cmd.error
            self.handle(cmd)
            if self._after_command is not None:
                self._after_command(cmd)
            handled = True
            synced = synced or isinstance(cmd, m.Sync)
        if handled:
            self.emit(m.Status(self.load()))
        if synced and not step_after_sync:
            return True
        if not handled and not self.has_work() and self._warm_runs_left():
            if not self.runner.warm_runs_ready():
                return True
            with self.pages_lock:  # it writes the null page 0 of the donated cache, like a step
                self.runner.run_pending_warm_run()
            return True
        self.stalled = self.has_work() and not self.step()
        return True

    def _warm_runs_left(self) -> bool:
        """Whether the runner has step shapes left to run once after its warm-up (idle work)."""
        pending = getattr(self.runner, "has_pending_warm_runs", None)
        return pending is not None and pending()

    # ------------------------------------------------------------ commands
    def handle(self, cmd: Any) -> None:
        """Applies one command from the controller."""
        if isinstance(cmd, m.Admit):
            self._admit(cmd.request)
        elif isinstance(cmd, m.Pull):
            self._pull(cmd)
        elif isinstance(cmd, m.Release):
            r = self.requests.pop(cmd.request_id, None)
            if r is not None and self.offered.pop(cmd.request_id, None) is not None:
                self.blocks.free(r.request_id)  # a decode worker's handed-off request
            elif r is not None:
                self.scheduler.release(r)
        elif isinstance(cmd, m.HandOff):
            self._hand_off(cmd.request_id)
        elif isinstance(cmd, m.Finish):
            self._finish(cmd.request_id, _STATUS[cmd.reason])
        elif isinstance(cmd, m.Sync):
            shapes = self._warmup() if cmd.warmup and self._warmup is not None else 0
            self.emit(m.Synced(cmd.token, self.load(), self.num_discarded_rows, shapes))
        else:
            raise TypeError(f"{self.name}: unknown command {cmd!r}")

    @staticmethod
    def _new_request(st: m.RequestState) -> Request:
        """This worker's own copy of a request."""
        return Request(request_id=st.request_id, prompt_token_ids=list(st.prompt_token_ids), sampling=st.sampling,
                       seed=st.seed, arrival_time=st.arrival_time, max_tokens=st.max_tokens,
                       output_token_ids=list(st.output_token_ids), num_computed_tokens=st.num_computed_tokens,
                       num_preemptions=st.num_preemptions)

    def _admit(self, st: m.RequestState) -> None:
        if self.role == "decode":
            raise RuntimeError(f"{self.name}: a decode worker does not prefill ({st.request_id!r})")
        if st.request_id in self.requests:
            raise RuntimeError(f"{self.name}: request {st.request_id!r} is already here")
        r = self.requests[st.request_id] = self._new_request(st)
        self.scheduler.add(r)

    def _pull(self, cmd: m.Pull) -> None:
        if self.role != "decode" or self.kv_pull is None:
            raise RuntimeError(f"{self.name}: only a decode worker pulls KV ({cmd.request.request_id!r})")
        r = self._new_request(cmd.request)
        if r.request_id in self.requests or not self.scheduler.can_accept(r):
            self.emit(m.PullRefused(self.name, r.request_id))
            return
        self.requests[r.request_id] = r
        start = self.clock()
        dst_blocks = self.scheduler.begin_pull(r)
        try:
            transfer = self.kv_pull(cmd, dst_blocks)
        except KVSourceError:
            self.requests.pop(r.request_id, None)
            self.scheduler.remove(r, RequestStatus.FINISHED_ABORTED)
            self.emit(m.PullRefused(self.name, r.request_id))
            return
        self.pulls.append((r, cmd.source, transfer, start))

    def _hand_off(self, request_id: str) -> None:
        """Pauses a decode request (it is scheduled no more) to offer its KV once its tokens in
        flight have landed (`_report_handoffs`); a request not here (ended meanwhile) is ignored."""
        if self.role != "decode":
            raise RuntimeError(f"{self.name}: only a decode worker hands requests off ({request_id!r})")
        r = self.requests.get(request_id)
        if r is None or r.finished or request_id in self.preempted or request_id in self.offered:
            return
        self.handoffs[request_id] = r
        if r in self.scheduler.running:
            self.scheduler.running.remove(r)  # keeps its blocks
        self._report_handoffs()

    def _report_handoffs(self) -> None:
        for rid, r in list(self.handoffs.items()):
            if r.num_inflight_tokens or r in getattr(self.scheduler, "incoming", ()):
                continue  # its pull or a token in flight has not landed yet
            del self.handoffs[rid]
            if r.finished or rid not in self.requests:
                continue
            self.offered[rid] = r
            self.emit(m.HandedOff(self.name, rid, tuple(self.blocks.block_table(rid)), r.num_computed_tokens))

    def _finish(self, request_id: str, status: RequestStatus) -> None:
        r = self.requests.pop(request_id, None)
        if r is None:
            return
        self.preempted.pop(request_id, None)
        self.handoffs.pop(request_id, None)
        self.offered.pop(request_id, None)
        self.pulls = [p for p in self.pulls if p[0] is not r]
        if self.scheduler.find(request_id) is r or self.blocks.has(request_id):
            self.scheduler.remove(r, status)
        r.status = status

    # ------------------------------------------------------------ queries
    @property
    def warmup_modes(self) -> tuple[str, ...]:
        """The step kinds this worker runs (what its warm-up compiles)."""
        if self.role in ("prefill", "decode"):
            return (self.role,)
        if isinstance(self.scheduler, ChunkedPrefillScheduler):
            return ("prefill", "decode", "mixed")
        return ("prefill", "decode")

    def has_work(self) -> bool:
        return bool(self.inflight is not None or self.pulls or self.preempted or self.handoffs
                    or self.scheduler.waiting or self.scheduler.running)

    def held_request_ids(self) -> list[str]:
        return sorted(self.requests)

    def load(self) -> m.WorkerLoad:
        s = self.scheduler
        return m.WorkerLoad(
            name=self.name, role=self.role, tp=self.tp, pp=self.pp, devices=self.devices,
            num_waiting=s.num_waiting, num_running=s.num_running, queued_tokens=s.queued_tokens(),
            num_incoming=len(getattr(s, "incoming", ())),
            num_waiting_migration=len(getattr(s, "prefilled", ())) + len(self.offered) + len(self.handoffs),
            free_blocks=self.blocks.num_free, total_blocks=self.blocks.num_total, block_size=self.blocks.block_size,
            max_num_seqs=s.config.max_num_seqs, max_inflight_pulls=getattr(s, "max_inflight_pulls", 0),
            num_steps=self.num_steps, busy_seconds=self.busy_seconds, uptime_seconds=self.clock() - self.started,
            step_time_buckets=tuple(self.step_time_buckets), step_time_sum=self.step_time_sum,
            warming=bool(getattr(self.runner, "has_background_work", lambda: False)()))

    # ------------------------------------------------------------ steps
    def step(self) -> bool:
        """One iteration: land finished pulls, launch (ahead), collect, emit. Emits a `Status` at the end.

        Returns False when it did nothing (e.g. a prefill worker whose cache is full of requests
        waiting for a pull): the caller then waits for a command instead of stepping again.
        """
        t0 = self.clock()
        landed = self._land_pulls()
        if self.async_scheduling:
            current, self.inflight, dropped = next_to_fetch(self.inflight, self._launch, ahead=True)
            self.num_discarded_rows += dropped
            ran = current is not None
            if ran:
                live, dropped = fetch_step(self.runner, current)
                self.num_discarded_rows += dropped
                self._on_tokens(live)
        else:
            ran = self._step_sync()
        self._report_preempted()
        if self.handoffs:
            self._report_handoffs()
        dt = self.clock() - t0
        self.num_steps += 1
        self.busy_seconds += dt
        self.step_time_sum += dt
        for i in range(bisect.bisect_left(m.STEP_TIME_BUCKETS, dt), len(self.step_time_buckets)):
            self.step_time_buckets[i] += 1
        if not ran and self.scheduler.waiting and self.blocks.num_used == 0:
            raise RuntimeError(f"{self.name}: no request can be scheduled although the cache is empty")
        self.emit(m.Status(self.load()))
        return ran or landed

    def _launch(self, prev: InFlightStep | None) -> InFlightStep | None:
        with self.pages_lock:
            out, step = launch_step(self.scheduler, self.blocks, self.runner, prev, now=self.clock())
        self._on_preempted(out.preempted)
        return step

    def _step_sync(self) -> bool:
        """One step at a time; a pp > 1 decode batch runs as pp micro-batches so the stages overlap.
        False when nothing was scheduled."""
        out = self.scheduler.schedule()
        self._on_preempted(out.preempted)
        if not out:
            return False
        now = self.clock()
        works = [seq_work(s, self.blocks, now) for s in out.seqs]
        parts = _split(works, self.pp) if self.role == "decode" else [works]
        with self.pages_lock:
            pendings = [self.runner.launch(mb) for mb in parts]
        results = [r for p in pendings for r in self.runner.collect(p)]
        self.scheduler.after_step(out)
        live = [(s.request, res) for s, res in zip(out.seqs, results) if res is not None]
        self._on_tokens(live)
        return True

    def _on_tokens(self, live: list) -> None:
        t = self.clock()
        for r, res in live:
            if r.finished:
                continue
            r.output_token_ids.append(res.token_id)
            self.emit(m.Token(self.name, r.request_id, res.token_id, res.logprob, res.top_logprobs, t,
                              prefill_start=r.prefill_start if self.role != "decode" else None,
                              num_preemptions=r.num_preemptions, prompt_logprobs=res.prompt_logprobs))
            if r.request_id in self.preempted:
                continue  # reported `Preempted` once every token in flight has landed
            if len(r.output_token_ids) >= r.max_tokens:
                self._finish(r.request_id, RequestStatus.FINISHED_LENGTH)
            elif self.role == "prefill":
                self.scheduler.mark_prefilled(r)
                self.emit(m.Prefilled(self.name, r.request_id, tuple(self.blocks.block_table(r.request_id)),
                                      r.num_computed_tokens))

    def _on_preempted(self, preempted: list[Request]) -> None:
        if self.role == "decode":
            for r in preempted:
                self.preempted[r.request_id] = r

    def _report_preempted(self) -> None:
        for rid, r in list(self.preempted.items()):
            if r.num_inflight_tokens == 0:
                del self.preempted[rid]
                self.requests.pop(rid, None)
                self.emit(m.Preempted(self.name, rid))

    def _land_pulls(self) -> bool:
        """Lands the pulls started since earlier steps (see `land_ready_pulls`); their requests join
        the batch. A pull from a failed source ends its request with `PullFailed`."""
        if not self.pulls:
            return False
        if self.land_ready_pulls:
            done = [transfer_ready(p[2]) for p in self.pulls]
            if not any(done) and self.inflight is None and not self.scheduler.running:
                done[0] = True  # nothing else to run: wait for the oldest
            if not any(done):
                return False
            landing = [p for p, d in zip(self.pulls, done) if d]
            self.pulls = [p for p, d in zip(self.pulls, done) if not d]
        else:
            landing, self.pulls = self.pulls, []
        for r, source, transfer, start in landing:
            try:
                transfer.wait()
            except KVSourceError as e:
                self.requests.pop(r.request_id, None)
                self.scheduler.remove(r, RequestStatus.FINISHED_ABORTED)
                self.emit(m.PullFailed(self.name, r.request_id, str(e)))
                continue
            self.scheduler.end_pull(r)
            if r.request_id in self.handoffs:
                self.scheduler.running.remove(r)  # handed off while it was being pulled: not scheduled here
            self.emit(m.Pulled(self.name, r.request_id, source, transfer.num_bytes, start, self.clock()))
        return True


def transfer_ready(transfer: Any) -> bool:
    """Whether a pull can land without waiting (or has failed: `wait` raises at once). A transfer
    without `ready` is waited for."""
    ready = getattr(transfer, "ready", None)
    return True if ready is None else bool(ready())


def _split(works: list, parts: int) -> list[list]:
    """Splits a decode batch into up to `parts` micro-batches (one per pipeline stage)."""
    if parts <= 1 or len(works) < 2:
        return [works]
    size = -(-len(works) // parts)
    return [works[i:i + size] for i in range(0, len(works), size)]

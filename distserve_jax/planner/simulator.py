"""The simulator: the real controller, workers, schedulers and block managers on a virtual clock.

Owns `SimExecutor`, the virtual-clock sibling of `ThreadsExecutor`: it hosts one real
`InstanceWorker` per instance (its real scheduler and `BlockManager`, a `SimRunner` in place of
devices, a `SimLink` in place of KV pulls) behind the executor interface the `Controller` talks
to (`send`, `poll`, `wake`, `shutdown`). Nothing here decides what to schedule: every decision
is the production code's.

Discrete events (a heap of (time, seq, kind, payload)):
  - a worker *turn* at time t: the worker's clock is set to t, it applies its queued commands
    (emitting a `Status` if any), and steps if it has work, exactly as a worker thread's loop
    does; its runner moves its clock to when the step's samples are fetched. It takes its next
    turn at that time while it has work, else when a command arrives;
  - an *event* a worker emitted at time t (`Token`, `Prefilled`, `Pulled`, `Status`, ...)
    reaches the controller at t. At one instant, workers' turns run first, then the controller
    sees the events (a real worker continues at once; the controller reacts after).
`poll()` advances the clock to the next instant, runs it, and returns its events; the
controller's clock is the simulator's `now`. `lockstep=True` instead mirrors
`ThreadsExecutor(start=False)`: each `poll` gives every worker one turn, in order, the clock
advancing through them one after the other (the deterministic replay of a real run).

Fast-forward (`fast_forward`): when `can_fast_forward` is set (a callable: whether the
controller's state lets workers skip ahead; `run` sets it to "no request waits for a decode
instance"), a worker whose next turns are decode-only gets them planned at once (a `Stretch`);
its next heap turn is the stretch's end. The stretch's turns are applied (and their events
emitted) lazily: at its end; when a command reaches the worker (cut at the turn in progress,
except a `Finish` of a request it no longer holds); at an instant whose events the controller
may act on with this worker's state (anything but tokens, reports and landed pulls); and at
every instant while a request waits for a decode instance. The records are the turn-by-turn ones.

`add_worker` / `remove_worker` start and stop instances during a run (a placement change driven by
the same controller code as a server's): a new instance joins `startup_s` virtual seconds later.

`run(deployment, profile, requests)` replays requests (arrival time, prompt and output lengths)
through a `Controller` on this executor and returns one `metrics.RequestRecord` per request.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from typing import Any, Callable, Sequence

from distserve_jax.engine import messages as m
from distserve_jax.engine.controller import Controller
from distserve_jax.engine.worker import InstanceWorker
from distserve_jax.metrics import RequestRecord, meets_slo
from distserve_jax.planner import fast_forward
from distserve_jax.planner.deployment import Deployment, SimInstance
from distserve_jax.planner.latency_model import Profile, kv_blocks
from distserve_jax.planner.sim_runner import SimLink, SimRunner, VirtualClock
from distserve_jax.sampling_params import SamplingParams
from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.factory import make_scheduler
from distserve_jax.scheduler.policies import SchedulerConfig

_TURN, _EVENT = 0, 1
# Events the controller acts on without reading a decode worker's state (see "Fast-forward").
_SAFE = frozenset({m.Status, m.Token, m.TokenRun, m.Pulled})


class SimulationError(RuntimeError):
    """The simulation cannot go on (requests left but nothing will ever happen, or a runaway)."""


@dataclasses.dataclass(frozen=True)
class SimRequest:
    arrival_time: float
    prompt_len: int
    output_len: int


@dataclasses.dataclass(frozen=True)
class _SimConfig:
    vocab_size: int = 1 << 30
    eos_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class SimSpec:
    """The controller's view of the model: no tokenizer (token ids only), no EOS."""

    name: str = "simulated"
    config: _SimConfig = _SimConfig()
    tokenizer: Any = None


class _Slot:
    __slots__ = ("worker", "clock", "inbox", "scheduled", "stalled", "log", "plan", "epoch")

    def __init__(self, clock: VirtualClock, log: list | None):
        self.worker: InstanceWorker | None = None
        self.clock, self.log = clock, log
        self.inbox: collections.deque = collections.deque()
        self.scheduled = self.stalled = False
        self.plan: fast_forward.Stretch | None = None  # planned decode-only turns not all applied yet
        self.epoch = 0  # turns in the heap scheduled under another epoch are void (a plan was cut)


class SimExecutor:
    """Hosts a deployment's workers on a virtual clock (see the module docstring).

    Args:
      deployment: the instances and engine limits.
      profile: latency coefficients, KV capacities and links.
      step_models: optional per-instance stage-time models (name -> object with
        `stage_time(works)`), replacing the profile's (e.g. `ReplayTimes`, `InstantModel`).
      lockstep: mirror `ThreadsExecutor(start=False)` (see the module docstring).
      record_steps: keep each runner's launched batch compositions (`step_logs`).
      startup_s: virtual seconds an instance added during a run takes to join.
      num_devices: the devices a placement change may use (`Controller.apply_placement` refuses more).
    """

    def __init__(self, deployment: Deployment, profile: Profile, *, step_models: dict[str, Any] | None = None,
                 lockstep: bool = False, record_steps: bool = False, startup_s: float = 0.0,
                 num_devices: int | None = None):
        self.deployment, self.profile, self.lockstep = deployment, profile, lockstep
        self.startup_s = startup_s
        self.num_devices = num_devices  # the budget a placement change may use (None: no limit)
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self._ready: list = []
        self.slots: dict[str, _Slot] = {}
        self.step_logs: dict[str, list] = {}
        self.can_fast_forward: Callable[[], bool] | None = None
        self.num_plans = 0  # stretches planned (fast-forward)
        self._planned: dict[str, _Slot] = {}  # slots with a plan
        self._instances = {i.name: i for i in deployment.instances}
        self._record_steps = record_steps
        step_models = step_models or {}
        for inst in deployment.instances:
            self._add_slot(inst, step_models.get(inst.name))

    def _add_slot(self, inst: SimInstance, step_model: Any = None) -> _Slot:
        d, profile = self.deployment, self.profile
        sc = SchedulerConfig(d.max_num_seqs, d.max_num_batched_tokens)
        policy = "chunked" if d.mode == "chunked" else "prefill_first"
        bytes_per_block = d.block_size * profile.model.kv_bytes_per_token
        clock = VirtualClock(self.now)
        log = [] if self._record_steps else None
        if log is not None:
            self.step_logs[inst.name] = log
        model = step_model or profile.step_model(inst.tp, inst.pp)
        runner = SimRunner(model, clock, inst.pp, log)
        blocks = BlockManager(self._num_blocks(inst), d.block_size)
        slot = _Slot(clock, log)
        link = SimLink(clock, lambda src, n, dst=inst.name: self._transfer_seconds(src, dst, n),
                       bytes_per_block) if inst.role == "decode" else None
        slot.worker = InstanceWorker(
            inst.name, inst.role, runner=runner, blocks=blocks,
            scheduler=make_scheduler(inst.role, policy, sc, blocks), emit=self._emitter(slot), clock=clock,
            async_scheduling=d.async_scheduling, tp=inst.tp, pp=inst.pp, devices=inst.devices,
            kv_pull=(lambda cmd, db, link=link: link.pull(cmd.source, list(cmd.source_blocks), db)) if link is not None else None)
        self.slots[inst.name] = slot
        self._instances[inst.name] = inst
        return slot

    # ------------------------------------------------------------ placement changes
    def add_worker(self, name: str, role: str, tp: int, pp: int, devices: Sequence[Any] | None = None) -> None:
        """Starts an instance: it emits `WorkerJoined` `startup_s` (virtual) seconds from now, and takes
        no turn before. Devices: the ids given, else the lowest ids no live instance holds."""
        if name in self.slots:
            raise ValueError(f"worker {name!r} already exists")
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"unknown role {role!r} for worker {name!r}")
        held = {x for n in self.slots for x in self._instances[n].devices}
        if devices is None:
            free = (x for x in itertools.count() if x not in held)
            devices = tuple(next(free) for _ in range(tp * pp))
        devices = tuple(int(x) for x in devices)
        if len(devices) != tp * pp or held & set(devices):
            raise ValueError(f"worker {name!r}: tp={tp} x pp={pp} needs {tp * pp} devices no live instance holds, "
                             f"got {devices} (held: {sorted(held & set(devices))})")
        slot = self._add_slot(SimInstance(name, role, tp, pp, devices))
        slot.clock.t = self.now + self.startup_s
        slot.worker.emit(m.WorkerJoined(slot.worker.load()))

    def remove_worker(self, name: str) -> None:
        """Stops an instance (the controller calls it once the instance holds nothing)."""
        slot = self.slots.pop(name)
        slot.plan = None  # a planned stretch dies with it (it held no request)
        self._planned.pop(name, None)
        slot.worker = None  # a turn still on the heap finds no worker
        slot.inbox.clear()

    def _num_blocks(self, inst: SimInstance) -> int:
        if inst.num_blocks is not None:
            return inst.num_blocks
        tokens, _ = self.profile.kv_capacity_tokens(inst.tp, inst.pp)
        return kv_blocks(tokens, self.deployment.block_size)

    def _transfer_seconds(self, src: str, dst: str, num_bytes: int) -> float:
        g = self.deployment.gpus_per_node
        a, b = self._instances[src], self._instances[dst]
        sa, sb = a.stage_nodes(g), b.stage_nodes(g)
        layers = self.profile.model.num_layers
        same = sum(sa[layer * a.pp // layers] == sb[layer * b.pp // layers] for layer in range(layers))
        return self.profile.transfer_seconds(num_bytes, intra_bytes=num_bytes * same // layers)

    # ------------------------------------------------------------ the executor interface
    @property
    def workers(self) -> dict[str, InstanceWorker]:
        return {n: s.worker for n, s in self.slots.items()}

    def clock(self) -> float:
        return self.now

    def send(self, name: str, cmd: Any) -> None:
        slot = self.slots[name]
        slot.inbox.append(cmd)
        if slot.plan is not None and not (isinstance(cmd, m.Finish) and cmd.request_id not in slot.worker.requests):
            self._cut(slot, self.now)
        if not self.lockstep and not slot.scheduled:
            self._schedule(slot, max(self.now, slot.clock.t))

    def poll(self, timeout: float | None = None) -> list[Any]:
        """The events of the next instant (see the module docstring); [] when nothing is left."""
        if self.lockstep:
            for slot in self.slots.values():
                slot.clock.t = max(slot.clock.t, self.now)
                self._turn(slot, lockstep=True)
                self.now = slot.clock.t
        elif not self._ready and self._heap:
            self._check_plans()
            t = self._heap[0][0]
            self.now = t
            n = 0
            while self._heap and self._heap[0][0] <= t:
                _, _, kind, x = heapq.heappop(self._heap)
                if kind == _TURN:
                    slot, epoch = x
                    if epoch != slot.epoch:
                        continue
                    self._turn(slot)
                    n += 1
                    if n > 100_000:
                        raise SimulationError(f"over {n} worker turns at t={t}: a worker steps without time passing")
                else:
                    self._ready.append(x)
            if self._planned and any(type(e) not in _SAFE for e in self._ready):
                for slot in self._planned.values():
                    slot.plan.apply(slot.plan.ended_by(t))
        out, self._ready = self._ready, []
        return out

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    # ------------------------------------------------------------ driving
    def next_time(self) -> float | None:
        """When the next thing happens (now, if events are waiting); None when nothing is scheduled."""
        if self._ready:
            return self.now
        return self._heap[0][0] if self._heap else None

    def advance(self, t: float) -> None:
        """Moves the clock to `t` (an arrival), which must not pass anything scheduled."""
        if t < self.now or (self._heap and t > self._heap[0][0]) or self._ready:
            raise SimulationError(f"cannot advance to {t} (now {self.now}, next {self.next_time()})")
        self._check_plans()
        self.now = t

    def _schedule(self, slot: _Slot, t: float) -> None:
        slot.scheduled = True
        heapq.heappush(self._heap, (t, next(self._seq), _TURN, (slot, slot.epoch)))

    def _emitter(self, slot: _Slot):
        def emit(e: Any) -> None:
            t = slot.clock.t
            if self.lockstep or t <= self.now:
                self._ready.append(e)
            else:
                heapq.heappush(self._heap, (t, next(self._seq), _EVENT, e))
        return emit

    def _turn(self, slot: _Slot, lockstep: bool = False) -> None:
        """One iteration of a worker's loop (`ThreadsExecutor._iterate`)."""
        slot.scheduled = False
        w = slot.worker
        if w is None:
            return  # removed
        if slot.plan is not None:  # the end of a stretch: its last turns
            p, slot.plan = slot.plan, None
            del self._planned[w.name]
            p.apply(p.k)
        if slot.clock.t < self.now:
            slot.clock.t = self.now
        handled = synced = False
        while slot.inbox:
            cmd = slot.inbox.popleft()
            w.handle(cmd)
            handled = True
            synced = synced or isinstance(cmd, m.Sync)
        if handled:
            slot.worker.emit(m.Status(w.load()))
        if synced and lockstep:
            return  # as ThreadsExecutor(start=False): a turn that answers a Sync does not step
        if not lockstep and self.can_fast_forward is not None and self.can_fast_forward():
            p = fast_forward.plan(w, w.runner)
            if p is not None:
                slot.plan, slot.stalled = p, False
                self._planned[w.name] = slot
                self.num_plans += 1
                self._schedule(slot, p.end)
                return
        slot.stalled = w.has_work() and not w.step()
        if not lockstep and w.has_work() and not slot.stalled:
            self._schedule(slot, slot.clock.t)

    def _check_plans(self) -> None:
        """Before time moves on: once the controller has a request waiting for a decode instance, every
        stretch ends at its turn in progress (the controller retries at every report from then on)."""
        if self._planned and not self.can_fast_forward():
            for slot in list(self._planned.values()):
                self._cut(slot, self.now)

    def _cut(self, slot: _Slot, t: float) -> None:
        """Ends a worker's stretch at its turn in progress at `t` (applied); its next turn is a real one."""
        p, slot.plan = slot.plan, None
        del self._planned[slot.worker.name]
        j = p.started_by(t)
        p.apply(j - 1)  # the turns ended by t: their events now
        p.apply(j)  # the turn in progress: its events when it ends
        slot.epoch += 1
        self._schedule(slot, p.times[j - 1])


def make_controller(executor: SimExecutor) -> Controller:
    """The production `Controller` over a simulated deployment (its clock is the simulator's)."""
    d = executor.deployment
    return Controller(SimSpec(), executor, {i.name: i.role for i in d.instances}, max_model_len=d.max_model_len,
                      mode=d.mode, placement=d.describe(), seed=0, clock=executor.clock, poll_timeout=0.0,
                      log_preemptions=False)


def to_record(request_id: str, prompt_len: int, out: Any) -> RequestRecord:
    """A finished `RequestOutput` as the metrics module's record (token times dropped: TPOT reads
    the finish time, which is the last token's)."""
    mt = out.metrics or {}
    return RequestRecord(request_id, prompt_len, output_len=len(out.token_ids), arrival_time=mt.get("arrival_time", 0.0),
                         first_token_time=mt.get("first_token_time"), finish_time=mt.get("finish_time"),
                         prefill_start=mt.get("prefill_start"), prefill_end=mt.get("prefill_end"),
                         migration_start=mt.get("migration_start"), migration_end=mt.get("migration_end"),
                         decode_start=mt.get("decode_start"), finish_reason=out.finish_reason)


def run(deployment: Deployment, profile: Profile, requests: Sequence[SimRequest], *,
        step_models: dict[str, Any] | None = None, record_steps: bool = False,
        executor: SimExecutor | None = None, stop_after: tuple[Any, int] | None = None,
        fast_forward: bool = True, controller: Controller | None = None, on_step: Any = None
        ) -> list[RequestRecord]:
    """Serves `requests` on the simulated `deployment`; one record per request, in input order.

    A request the engine refuses (longer than an instance's KV cache) gets a record that never
    completed (it misses every SLO), as the server would answer it with an error.
    `stop_after=(slo, k)` ends the simulation as soon as more than k finished requests missed
    `slo` (a goodput search needs no more to know a rate fails); the requests not finished by then
    get records that never completed. `fast_forward=False` steps every worker turn by turn (the same
    records, slower; see the module docstring). `controller` (over `executor`) is driven instead of a
    new one; `on_step()` is called after each of its steps (a replanner's tick, on the engine's loop as
    in a server).
    """
    ex = executor or SimExecutor(deployment, profile, step_models=step_models, record_steps=record_steps)
    ctrl = controller or make_controller(ex)
    if fast_forward and not ex.lockstep:
        ex.can_fast_forward = lambda: not ctrl.migration_queue
    order = sorted(range(len(requests)), key=lambda k: requests[k].arrival_time)
    records: list[RequestRecord | None] = [None] * len(requests)
    params: dict[int, SamplingParams] = {}
    misses = 0
    i = 0
    while i < len(order) or ctrl.has_unfinished_requests():
        nt = ex.next_time()
        if i < len(order) and (nt is None or requests[order[i]].arrival_time < nt):
            k = order[i]
            r = requests[k]
            i += 1
            ex.advance(max(ex.now, r.arrival_time))
            p = params.get(r.output_len)
            if p is None:
                p = params[r.output_len] = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
            try:
                ctrl.add_request(str(k), prompt_token_ids=[0] * r.prompt_len, params=p, arrival_time=r.arrival_time)
            except ValueError as e:
                records[k] = RequestRecord(str(k), r.prompt_len, arrival_time=r.arrival_time, finish_reason=f"error: {e}")
            continue
        if nt is None:
            raise SimulationError(f"{len(ctrl.requests)} requests unfinished at t={ex.now} and nothing scheduled")
        for out in ctrl.step():
            if out.finished:
                k = int(out.request_id)
                records[k] = rec = to_record(out.request_id, requests[k].prompt_len, out)
                if stop_after is not None and not meets_slo(rec, stop_after[0]):
                    misses += 1
        if on_step is not None:
            on_step()
        if stop_after is not None and misses > stop_after[1]:
            return [r if r is not None else RequestRecord(str(k), requests[k].prompt_len,
                                                          arrival_time=requests[k].arrival_time)
                    for k, r in enumerate(records)]
    return records  # type: ignore[return-value]

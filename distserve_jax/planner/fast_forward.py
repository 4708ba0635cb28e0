"""Fast-forward: a simulated worker's stretch of decode-only turns, planned at once and applied lazily.

Between the things that can change what an instance does next (a command from the controller, a
full cache), a decode or colocated instance whose running requests are all past their prompts
steps in a way that depends only on lengths: each step gives every request in the batch one
token, a request leaves the batch when its length reaches `max_tokens`, and a step's time is the
latency model's decode time of the batch size and the contexts. `plan` computes the times of up
to `max_turns` such turns (a few float operations per turn; pulls that are due land first, for
real, as the worker's next step would land them); `Stretch.apply` applies the outcome of the
turns up to a point to the real worker, scheduler and block manager (tokens, computed lengths,
KV slots, finished requests through the worker's own `_finish`, the step launched ahead, the
runner's stage clocks, the worker's step statistics) and emits what those turns would have
emitted, as one `TokenRun` and the last turn's `Status`.

What keeps the outcome the step-by-step one:
  - the turns mirror `InstanceWorker.step`: every pull has landed before the stretch (a worker
    with a pull still in flight, landed at whichever later turn finds it done, steps turn by
    turn); with launch-ahead (`async_scheduling`) the step
    launched at turn j is fetched at turn j + 1 and leaves out a request whose token in flight
    is its last (a request pulled at turn 0 is first fetched at turn 1); without, a decode batch
    runs as `pp` micro-batches (`worker._split`); stage times and the runner's stage booking use
    `SimRunner.launch`'s arithmetic (`StepModel.decode_time`);
  - no step can run out of KV blocks (the slots of all planned turns fit in the free blocks, frees
    ignored), so none preempts;
  - the simulator (`SimExecutor`) cuts a stretch at the turn in progress when a command reaches
    the worker, and applies the turns ended so far before the controller sees any event it may
    act on with this worker's state (anything but tokens, reports and landed pulls) or while a
    request waits for a decode instance.
`tests/planner/test_fast_forward.py` checks that simulations with and without it give identical
per-request records.
"""

from __future__ import annotations

import bisect
from typing import Any

from distserve_jax.engine import messages as m
from distserve_jax.engine.step_launcher import InFlightStep
from distserve_jax.engine.worker import InstanceWorker, transfer_ready
from distserve_jax.planner.sim_runner import SAMPLE_TOKEN, SimRunner, _Pending
from distserve_jax.scheduler.batch import ScheduledSeq, SchedulerOutput
from distserve_jax.scheduler.request import RequestStatus

NO_PULLS = False
MAX_TURNS = 48  # turns planned at once (a stretch cut early wastes the rest of its plan)


class _Row:
    """A launched-ahead row as `InFlightStep` and `SimRunner.collect` read it."""

    __slots__ = ("sample", "sampling")

    def __init__(self, sampling: Any):
        self.sample, self.sampling = True, sampling


def _decode_ready(r: Any, in_flight: int) -> bool:
    """One token to feed, `in_flight` of them still in flight."""
    return (r.num_inflight_tokens == in_flight and r.num_computed_tokens > 0
            and r.num_tokens - r.num_computed_tokens == 1)


def eligible(w: InstanceWorker, runner: SimRunner) -> bool:
    """Whether the worker's next turns are decode-only (see the module docstring): nothing waits for
    a prefill or a recomputation, every running request (and every pulled one) has one token to
    feed, and with launch-ahead the step in flight holds every running request."""
    if runner.log is not None or not hasattr(runner.model, "decode_time"):
        return False
    if w.role == "prefill" or w.preempted or (NO_PULLS and w.pulls):
        return False
    if w.land_ready_pulls and not all(transfer_ready(p[2]) for p in w.pulls):
        return False  # a pull in flight lands at a later turn: step by step until it has
    s = w.scheduler
    run = s.running
    if s.waiting or len(getattr(s, "incoming", ())) != len(w.pulls) or not (run or w.pulls):
        return False
    asyn = w.async_scheduling
    for p in w.pulls:
        r = p[0]
        if not _decode_ready(r, 0) or (asyn and r.sampling.uses_penalties):
            return False
    if asyn:
        f = w.inflight
        if f is None or len(f.scheduled.seqs) != len(run) or len(f.rows) != len(run):
            return False
        for sq, r in zip(f.scheduled.seqs, run):
            if sq.request is not r or sq.num_new_tokens != 1 or not _decode_ready(r, 1) or r.sampling.uses_penalties:
                return False
        return True
    return w.inflight is None and all(_decode_ready(r, 0) for r in run)


class Stretch:
    """A worker's planned decode-only turns (`plan`); `apply(j)` applies turns up to j (exclusive).

    Turn j starts at `start(j)` and its tokens land at `times[j]`; the worker's next real turn is
    at `end` (`times[-1]`).
    """

    def __init__(self, w: InstanceWorker, runner: SimRunner, t0: float, max_turns: int):
        self.w, self.runner, self.t0 = w, runner, t0
        run = self.run = list(w.scheduler.running)
        asyn = self.asyn = w.async_scheduling
        pp = runner.pp
        split = not asyn and w.role == "decode" and pp > 1
        n0 = len(run)
        old = len(w.inflight.scheduled.seqs) if asyn else n0  # the rest were pulled at turn 0
        c = [r.num_computed_tokens for r in run]  # context of the step launched at turn j: c + j
        # s: the first turn that fetches a token for it; f: the last; g: the last that launches it.
        self.s = s = [0] * old + [1 if asyn else 0] * (n0 - old)
        self.f = f = [r.max_tokens - len(r.output_token_ids) - 1 + si for r, si in zip(run, s)]
        self.g = g = [x - 1 for x in f] if asyn else f
        model = runner.model
        by_g: dict[int, list[int]] = {}
        for i, x in enumerate(g):
            by_g.setdefault(x, []).append(i)
        members = [i for i in range(n0) if g[i] >= 0]  # launched at the current turn, in running order

        def chunks() -> list[tuple[int, int]]:
            n = len(members)
            if not split or n < 2:
                return [(n, sum(c[i] for i in members))] if n else []
            size = -(-n // pp)
            return [(len(p), sum(c[i] for i in p)) for p in (members[k:k + size] for k in range(0, n, size))]

        parts = chunks()
        free = list(runner.stage_free)
        t = runner.clock.t
        d_cur = w.inflight.pending.done if asyn else 0.0
        last = max(f)
        self.times: list[float] = []  # times[j]: when turn j ends (its tokens' time)
        self.frees: list[tuple[float, ...]] = []
        self.dones: list[float] = []  # with launch-ahead: when the step launched at turn j completes
        self.launches: list[int] = []
        j = 0
        while True:
            done_max = t
            for cnt, base in parts:
                dt = model.decode_time(cnt, base + j * cnt + cnt)
                u = t
                for k in range(pp):
                    if free[k] > u:
                        u = free[k]
                    u += dt
                    free[k] = u
                if u > done_max:
                    done_max = u
            if asyn:
                t_end = d_cur if d_cur > t else t
                d_cur = done_max if parts else 0.0
                self.dones.append(d_cur)
            else:
                t_end = done_max
            self.times.append(t_end)
            self.frees.append(tuple(free))
            self.launches.append(len(parts))
            gone = by_g.get(j)
            if gone:
                out = set(gone)
                members = [i for i in members if i not in out]
                parts = chunks()
            j += 1
            t = t_end
            if j > last or j >= max_turns:
                break
        self.k = j
        self.applied = 0

    # ------------------------------------------------------------ queries
    @property
    def end(self) -> float:
        return self.times[self.k - 1]

    def start(self, j: int) -> float:
        return self.t0 if j == 0 else self.times[j - 1]

    def ended_by(self, t: float) -> int:
        """Turns whose tokens have landed by `t`."""
        return bisect.bisect_right(self.times, t, 0, self.k)

    def started_by(self, t: float) -> int:
        """Turns started by `t` (turn 0 always)."""
        return 1 + bisect.bisect_right(self.times, t, 0, self.k - 1)

    def _need(self, turns: int, held: list[int], bs: int) -> int:
        tot = 0
        for i, h in enumerate(held):
            ns = min(turns, self.g[i] + 1)
            if ns > 0:
                tot += -(-(h + ns) // bs) - -(-h // bs)
        return tot

    def fit_blocks(self) -> bool:
        """Shortens the plan to the turns whose KV slots fit in the free blocks; False if none does."""
        blocks = self.w.blocks
        held = [blocks.num_tokens(r.request_id) for r in self.run]
        free = blocks.num_free
        if self._need(self.k, held, blocks.block_size) <= free:
            return True
        lo, hi = 0, self.k  # need(lo) fits, need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._need(mid, held, blocks.block_size) <= free:
                lo = mid
            else:
                hi = mid
        self.k = lo
        return lo > 0

    # ------------------------------------------------------------ applying
    def apply(self, j1: int) -> None:
        """Applies turns [applied, j1) and emits their tokens and the last one's report (at its end)."""
        j0 = self.applied
        if j1 <= j0:
            return
        self.applied = j1
        w, runner, blocks, f, g, s = self.w, self.runner, self.w.blocks, self.f, self.g, self.s
        runs: dict[int, tuple[list, list, list]] = {}  # first turn of the tokens -> (ids, tokens, preemptions)
        finished = []
        asyn = self.asyn
        for i, r in enumerate(self.run):
            fi = f[i]
            if fi < j0:
                continue  # finished earlier
            ns = min(j1, g[i] + 1) - j0
            if ns > 0:
                blocks.append_slots(r.request_id, ns)
                r.num_computed_tokens += ns
            first = max(j0, s[i])
            nt = min(j1, fi + 1) - first
            if nt > 0:
                tt = (SAMPLE_TOKEN,) * nt
                r.output_token_ids.extend(tt)
                ids, toks, npre = runs.get(first) or runs.setdefault(first, ([], [], []))
                ids.append(r.request_id)
                toks.append(tt)
                npre.append(r.num_preemptions)
            if fi < j1:
                finished.append(r)
            elif asyn:
                r.num_inflight_tokens = 1
        for r in finished:
            r.num_inflight_tokens = 0
            w._finish(r.request_id, RequestStatus.FINISHED_LENGTH)
        times = self.times
        prev = self.start(j0)
        buckets = w.step_time_buckets
        nb = len(buckets)
        for jj in range(j0, j1):
            dt = times[jj] - prev
            prev = times[jj]
            w.num_steps += 1
            w.busy_seconds += dt
            w.step_time_sum += dt
            for b in range(bisect.bisect_left(m.STEP_TIME_BUCKETS, dt), nb):
                buckets[b] += 1
        runner.num_steps += sum(self.launches[j0:j1])
        runner.stage_free[:] = self.frees[j1 - 1]
        runner.clock.t = times[j1 - 1]
        if asyn:
            members = [r for i, r in enumerate(self.run) if g[i] >= j1 - 1]
            cur = w.inflight
            if not members:
                w.inflight = None
            elif len(members) == len(cur.scheduled.seqs) and all(
                    sq.request is r for sq, r in zip(cur.scheduled.seqs, members)):
                cur.pending.done = self.dones[j1 - 1]
            else:
                w.inflight = InFlightStep(SchedulerOutput([ScheduledSeq(r, 1) for r in members]),
                                          _Pending([_Row(r.sampling) for r in members], self.dones[j1 - 1]),
                                          {id(r): row for row, r in enumerate(members)})
        for first, (ids, toks, npre) in sorted(runs.items()):  # a request pulled at turn 0 starts at turn 1
            w.emit(m.TokenRun(w.name, tuple(ids), tuple(toks), tuple(times[first:j1]), tuple(npre)))
        w.emit(m.Status(w.load()))


def _fits_one_turn(w: InstanceWorker) -> bool:
    """Whether the step launched at the next turn gets its KV slots without preempting."""
    blocks, bs = w.blocks, w.blocks.block_size
    asyn = w.async_scheduling
    need = 0
    launched = [r for r in w.scheduler.running if not asyn or r.max_tokens - len(r.output_token_ids) >= 2]
    for r in launched + [p[0] for p in w.pulls]:
        h = blocks.num_tokens(r.request_id)
        need += -(-(h + 1) // bs) - -(-h // bs)
    return need <= blocks.num_free


def plan(w: InstanceWorker, runner: SimRunner, max_turns: int = MAX_TURNS) -> Stretch | None:
    """The worker's next decode-only turns from now (its due pulls landed first, as its next step
    would land them), or None (nothing done) when its next turn is not decode-only or would preempt."""
    if not eligible(w, runner) or not _fits_one_turn(w):
        return None
    t0 = runner.clock.t
    if w.pulls:
        w._land_pulls()  # emits the Pulled events at the landing times, as a step does
    st = Stretch(w, runner, t0, max_turns)
    if not st.fit_blocks():
        raise RuntimeError(f"{w.name}: a planned turn does not fit the KV cache although the next step does")
    return st

"""Fast-forward (planned decode stretches, applied lazily) gives the turn-by-turn simulation's records
exactly: same TTFT, TPOT, finish and migration times for every request, on every kind of instance."""

import logging
from pathlib import Path

import numpy as np
import pytest

from distserve_jax import SamplingParams
from distserve_jax.engine import messages as m
from distserve_jax.planner import deployment as dp
from distserve_jax.planner import simulator as sim
from distserve_jax.planner.latency_model import Profile
from distserve_jax.planner.workload import at_rate

# Decode time grows with the contexts.
PROFILE = Profile.load(Path(__file__).resolve().parents[2] / "configs/profiles/a100-opt-66b.distserve.json")
LIMITS = dict(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024)

CASES = {
    "1p1d launch-ahead": ("disaggregated", [("prefill", 4, 1), ("decode", 4, 1)], {}),
    "1p1d pp2 micro-batches": ("disaggregated", [("prefill", 4, 1), ("decode", 2, 2)], {}),
    "2p2d": ("disaggregated", [("prefill", 2, 1), ("prefill", 2, 1), ("decode", 2, 1), ("decode", 4, 1)], {}),
    "colocated launch-ahead": ("colocated", [("colocated", 4, 1)], {}),
    "colocated step at a time": ("colocated", [("colocated", 4, 1)], {"async_scheduling": False}),
    "chunked": ("chunked", [("colocated", 4, 1)], {}),
}


def _lens(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [(int(p), int(o)) for p, o in zip(rng.integers(8, 400, n), rng.integers(1, 120, n))]


def _both(dep, reqs):
    """(records with fast-forward, records turn by turn, the fast executor, the events the slow one's workers emitted)."""
    ex, slow_ex = sim.SimExecutor(dep, PROFILE), sim.SimExecutor(dep, PROFILE)
    events = []
    for slot in slow_ex.slots.values():
        emit = slot.worker.emit
        slot.worker.emit = lambda e, emit=emit: (events.append(e), emit(e))
    fast = sim.run(dep, PROFILE, reqs, executor=ex)
    slow = sim.run(dep, PROFILE, reqs, executor=slow_ex, fast_forward=False)
    return fast, slow, ex, events


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rate", [2.0, 12.0])
def test_fast_forward_gives_the_turn_by_turn_records(case, rate):
    mode, insts, kw = CASES[case]
    dep = dp.build(mode, insts, **LIMITS, **kw)
    fast, slow, ex, _ = _both(dep, at_rate(_lens(), rate, seed=1))
    assert ex.num_plans > 0, "no stretch was fast-forwarded"
    assert all(r.finish_time is not None for r in slow)
    assert fast == slow  # every field of every record: TTFT, TPOT, migration, finish


def test_fast_forward_with_a_full_decode_cache(caplog):
    # A small decode cache: pulls wait for room (back-pressure) and running requests get preempted.
    dep = dp.Deployment("disaggregated", (dp.SimInstance("prefill-0", "prefill", 4, 1, (0, 1, 2, 3)),
                                          dp.SimInstance("decode-0", "decode", 4, 1, (4, 5, 6, 7), num_blocks=60)),
                        **LIMITS)
    with caplog.at_level(logging.INFO):
        fast, slow, ex, events = _both(dep, at_rate(_lens(80, seed=2), 8.0, seed=3))
    assert sum(isinstance(e, m.Preempted) for e in events) > 0
    # A simulation logs its preemptions at DEBUG (a planner search simulates thousands).
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "preempted" in r.getMessage()]
    assert ex.num_plans > 0
    assert fast == slow


def _serve(ff: bool, params):
    """Requests with per-token output rules (stop strings, logprobs): the controller applies a
    `TokenRun` token by token for them."""
    dep = dp.build("colocated", [("colocated", 4, 1)], **LIMITS)
    ex = sim.SimExecutor(dep, PROFILE)
    ctrl = sim.make_controller(ex)
    if ff:
        ex.can_fast_forward = lambda: not ctrl.migration_queue
    for i, p in enumerate(params):
        ctrl.add_request(str(i), prompt_token_ids=[0] * (10 + 7 * i), params=p, arrival_time=0.0)
    done = {}
    while ctrl.has_unfinished_requests():
        for out in ctrl.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason, out.logprobs, out.metrics)
    return done, ex, ctrl


def test_token_runs_of_requests_with_per_token_rules():
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=["never"]),
              SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    fast, ex, fast_ctrl = _serve(True, params)
    slow, _, slow_ctrl = _serve(False, params)
    assert ex.num_plans > 0
    assert fast == slow
    assert [len(fast[str(i)][0]) for i in range(3)] == [40, 25, 30]
    assert len(fast["1"][2]) == 25  # one logprobs entry per token, through the per-token path
    # The workload monitor sees every completion either way (the plain request's came in a run).
    for ctrl in (fast_ctrl, slow_ctrl):
        window = ctrl.monitor.window(ctrl.clock(), 600.0)
        assert sorted(window.output_lens) == [25, 30, 40]


def test_fast_forward_while_pulls_wait_for_a_batch_slot():
    # Long requests fill the decode batch (32 rows): prefilled requests wait for a slot, and the
    # controller retries at every decode report; arrivals come in between.
    rng = np.random.default_rng(0)
    for _ in range(3):  # the third draw: a trace where the controller's retries and arrivals interleave
        lens = [(int(p), int(o)) for p, o in zip(rng.integers(8, 600, 120), rng.integers(1, 500, 120))]
    dep = dp.build("disaggregated", [("prefill", 4, 1), ("decode", 2, 2)], max_num_seqs=32, max_model_len=2048)
    fast, slow, ex, _ = _both(dep, at_rate(lens, 3.0, seed=1))
    assert ex.num_plans > 0
    assert fast == slow

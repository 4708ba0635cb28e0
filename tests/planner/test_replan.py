"""The workload monitor, drift detection and the replanner policy (on a toy profile: fast)."""

import math

import numpy as np
import pytest

from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.engine.workload_monitor import WorkloadMonitor
from distserve_jax.planner import drift as dr
from distserve_jax.planner.replan_search import WindowPlanner
from distserve_jax.planner.replanner import Replanner, ReplanSettings, ReplanSettingsError
from tests.planner.test_search import LIMITS, SLO_, profile


def lognormal_lens(n, mean_prompt, mean_out, seed):
    rng = np.random.default_rng(seed)
    p = np.clip(rng.lognormal(math.log(mean_prompt) - 0.5, 1.0, n), 1, 2000).astype(int)
    o = np.clip(rng.lognormal(math.log(mean_out) - 0.5, 1.0, n), 1, 2000).astype(int)
    return list(zip(p.tolist(), o.tolist()))


def feed(mon, t0, t1, rate, lens, seed, latency=1.0):
    """Poisson arrivals at `rate` in [t0, t1), each finishing `latency` later."""
    rng = np.random.default_rng(seed)
    t, i = t0, 0
    while True:
        t += rng.exponential(1 / rate)
        if t >= t1:
            return
        p, o = lens[i % len(lens)]
        mon.on_arrival(t, p)
        mon.on_finish(t + latency, p, o)
        i += 1


def test_monitor_windows_rate_lengths_and_history():
    mon = WorkloadMonitor(0.0, history_s=100.0)
    for k in range(50):  # one arrival every 0.5 s, prompts 10..59, outputs 2x
        mon.on_arrival(k * 0.5, 10 + k)
        mon.on_finish(k * 0.5 + 0.1, 10 + k, 2 * (10 + k))
    w = mon.window(25.0, 10.0)  # arrivals at 15.0 .. 24.5: 20 of them
    assert (w.start, w.end, w.num_arrivals) == (15.0, 25.0, 20)
    assert w.rate == pytest.approx(2.0) and w.rate_since(20.0) == pytest.approx(2.0)
    assert w.prompt_lens == tuple(range(40, 60)) and w.output_lens == tuple(2 * x for x in range(40, 60))
    s = w.summary()
    assert s["prompt_len_mean"] == pytest.approx(49.5) and s["prompt_len_p50"] == pytest.approx(49.5)
    assert s["arrival_rate"] == pytest.approx(2.0) and s["num_completions"] == 20
    young = mon.window(5.0, 60.0)  # the monitor started at 0: the window does not reach before it
    assert young.span_s == 5.0 and young.num_arrivals == 11
    assert all(p in w.completed for p in w.sample_lengths(30, seed=1))
    mon.on_arrival(300.0, 5)  # history is 100 s: everything older is dropped
    assert mon.window(300.0, 100.0).num_arrivals == 1 and mon.num_arrivals == 51
    with pytest.raises(ValueError, match="span_s"):
        mon.window(1.0, 0.0)
    with pytest.raises(ValueError, match="longer than the history"):
        mon.window(1.0, 500.0)
    with pytest.raises(ValueError, match="no completed request"):
        WorkloadMonitor().window(1.0, 1.0).sample_lengths(3)


def test_drift_on_synthetic_windows():
    chat = lognormal_lens(400, 300, 200, seed=0)
    planned = dr.PlannedWorkload(4.0, tuple(chat))
    th = dr.DriftThresholds(rate_ratio=1.5, distance=0.25, min_requests=20)

    def window(rate, lens, seed):
        mon = WorkloadMonitor(0.0)
        feed(mon, 0.0, 60.0, rate, lens, seed)
        return mon.window(60.0, 60.0)

    same = dr.detect(planned, window(4.0, lognormal_lens(400, 300, 200, seed=7), 1), th)
    assert not same.drifted and same.rate_ratio < 1.3 and same.prompt_distance < 0.15, same
    fast = dr.detect(planned, window(12.0, chat, 2), th)
    assert fast.drifted and fast.rate_ratio == pytest.approx(3.0, rel=0.15) and "rate" in fast.reason
    slow = dr.detect(planned, window(4.0 / 3, chat, 3), th)  # a drop counts as much as a rise
    assert slow.drifted and slow.rate_ratio > 2.4 and "rate" in slow.reason
    long_prompts = dr.detect(planned, window(4.0, lognormal_lens(400, 1700, 90, seed=4), 4), th)
    assert long_prompts.drifted and long_prompts.rate_ratio < 1.3
    assert long_prompts.prompt_distance > 0.6 and "prompt lengths" in long_prompts.reason
    assert long_prompts.output_distance > 0.25 and "output lengths" in long_prompts.reason
    assert dr.detect(planned, window(0.2, chat, 5), th) is None  # ~12 arrivals: no evidence
    assert dr.ks_distance([1, 2, 3], [1, 2, 3]) == 0.0 and dr.ks_distance([1, 2], [5, 6]) == 1.0


@pytest.mark.parametrize("kw, name", [
    (dict(interval_s=-1.0), "interval_s"), (dict(interval_s=0), "interval_s"), (dict(dwell_s=-5), "dwell_s"),
    (dict(window_s=float("nan")), "window_s"), (dict(min_gain=0.0), "min_gain"), (dict(min_gain=10.0), "min_gain"),
    (dict(min_gain=-0.2), "min_gain"), (dict(window_s=5.0, interval_s=10.0), "window_s"),
    (dict(confirm=0), "confirm"), (dict(min_requests=2.5), "min_requests"), (dict(rate_ratio=1.0), "rate_ratio"),
    (dict(distance=1.5), "distance"), (dict(drain_s=0), "drain_s"),
])
def test_bad_settings_are_refused_by_name(kw, name):
    with pytest.raises(ReplanSettingsError, match=name):
        ReplanSettings(**kw)


class Engine:
    """The controller surface the replanner uses, on a clock the test moves (the simulator tests drive
    the real controller; here each tick's inputs are chosen exactly)."""

    def __init__(self, placement):
        self.now = 0.0
        self.monitor = WorkloadMonitor(0.0)
        self.requests, self.migration_queue = {}, []
        self.placement, self.applied = placement, []
        self.placement_change = None

    def clock(self):
        return self.now

    def current_placement(self):
        return self.placement

    def apply_placement(self, target):
        if target.num_devices > 8:
            raise ValueError("more devices than the executor has")
        self.applied.append(target)
        self.placement = target


ONE_PAIR = Placement((InstanceSpec(2),), (InstanceSpec(1),))  # toy optimum: P(tp2)+D(tp1), ~200 req/s


def replanner(engine, rate=60.0, **kw):
    s = ReplanSettings(interval_s=2.0, window_s=6.0, dwell_s=30.0, confirm=2, min_requests=20, startup_s=0.0,
                       num_requests=80, **kw)
    planner = WindowPlanner(profile(), SLO_, budget=8, limits=LIMITS)
    return Replanner(engine, planner, dr.PlannedWorkload(rate, ((16, 8),) * 50), s, background=False)


def run(engine, rp, t1, rate, seed, lens=((16, 8),)):
    feed(engine.monitor, engine.now, t1, rate, list(lens), seed, latency=0.05)
    while engine.now < t1:
        engine.now = min(t1, engine.now + 0.5)
        rp.tick()


def test_constant_load_never_flaps():
    eng = Engine(ONE_PAIR)
    rp = replanner(eng)
    for k in range(10):  # 10 x 30 s of the load the placement was planned for, seeded noise
        run(eng, rp, eng.now + 30.0, 60.0, seed=k)
    assert rp.num_changes == 0 and eng.applied == [] and not any(e["kind"] == "plan" for e in rp.log)


def test_rate_shift_switches_once_then_holds():
    eng = Engine(ONE_PAIR)
    rp = replanner(eng, rate=100.0)
    run(eng, rp, 20.0, 100.0, seed=1)
    run(eng, rp, 120.0, 600.0, seed=2)  # 6x: beyond one pair's ~200 req/s
    assert rp.num_changes == 1 and len(eng.applied) == 1, rp.log
    new = eng.applied[0]
    assert 2 <= len(new.prefill) == len(new.decode) and new.num_devices <= 8
    assert {(i.tp, i.devices) for i in new.prefill} == {(2, None)} and {i.tp for i in new.decode} == {1}
    kinds = [e["kind"] for e in rp.log]
    assert kinds.count("switch") == 1 and rp.planned_for.rate >= 550, rp.log


def test_small_gain_keeps_the_placement_and_is_not_planned_again():
    # 2 pairs planned for 300 req/s; the load halves to 150: one pair serves it on half the devices
    # (about +100% per device), which a min_gain of 9.0 (+900%) refuses; the same drifted load is
    # then not planned again on every later tick.
    two = Placement((InstanceSpec(2), InstanceSpec(2)), (InstanceSpec(1), InstanceSpec(1)))
    eng = Engine(two)
    rp = replanner(eng, rate=300.0, min_gain=9.0)
    run(eng, rp, 60.0, 150.0, seed=3)
    kinds = [e["kind"] for e in rp.log]
    assert eng.applied == [] and kinds.count("plan") == 1 and kinds.count("keep") == 1, rp.log
    assert "needs > 900%" in rp.log[-1]["detail"]


def test_vanished_metrics_and_budget():
    eng = Engine(ONE_PAIR)
    rp = replanner(eng, rate=100.0)
    run(eng, rp, 20.0, 100.0, seed=4)
    # Traffic (or its metrics) stops: the windows empty out, nothing is planned, nothing changes.
    for _ in range(200):
        eng.now += 0.5
        rp.tick()
    assert eng.applied == [] and rp.last_drift is None and not any(e["kind"] == "plan" for e in rp.log)
    # A rate no budget can serve: the most pairs that fit 8 devices (3 x 3), never more.
    run(eng, rp, eng.now + 40.0, 5000.0, seed=5)
    assert len(eng.applied) == 1, rp.log
    assert eng.applied[0].num_devices == 6 and len(eng.applied[0].prefill) == len(eng.applied[0].decode) == 2
    assert "budget of 8 holds" in rp.last_proposal.note


def slow_profile():
    """The search toy at a tenth of its speed: P(tp2) ~21 req/s, D(tp1) ~20 req/s (16-token prompts)."""
    from distserve_jax.planner.latency_model import Hardware, Profile, StepCoefficients
    from tests.planner.test_search import DECODE_A, PREFILL_B, TOY_MODEL

    cfg = {(tp, 1): StepCoefficients(prefill=(0.0, 10 * PREFILL_B[tp], 0.0), decode_small=(10 * DECODE_A[tp], 0.0, 0.0),
                                     decode_large=(10 * DECODE_A[tp], 0.0, 0.0), max_num_tokens=16 * 200)
           for tp in PREFILL_B}
    hw = Hardware("toy", gpus_per_node=8, memory_bytes=1, intra_node_gbit_s=1e6, inter_node_gbit_s=1e6)
    return Profile(TOY_MODEL, hw, cfg, pp_model="measured", name="toy-slow")


def test_simulated_step_shift_switches_once_and_recovers():
    from distserve_jax.metrics import SLO
    from distserve_jax.planner import deployment as dp
    from distserve_jax.planner.replan_sim import attainment_over_time, recovery_time, run_with_replanner
    from distserve_jax.planner.simulator import SimRequest

    slo = SLO(0.5, 0.2)
    rng = np.random.default_rng(0)
    arrivals = list(np.cumsum(rng.exponential(1 / 8.0, 200)))  # 8 req/s for ~25 s
    shift = arrivals[-1]
    arrivals += list(shift + np.cumsum(rng.exponential(1 / 24.0, 1200)))  # then 3x for ~50 s
    reqs = [SimRequest(float(t), 16, 8) for t in arrivals]
    start = dp.build("disaggregated", [("prefill", 2, 1), ("decode", 1, 1)], gpus_per_node=8, **LIMITS)
    planner = WindowPlanner(slow_profile(), slo, budget=8, limits=LIMITS, num_requests=80,
                            timer=lambda: 0.0)  # the search takes no virtual time: deterministic on any host
    s = ReplanSettings(interval_s=3.0, window_s=9.0, dwell_s=60.0, confirm=2, min_requests=20, startup_s=5.0,
                       drain_s=10.0, num_requests=80)
    run = run_with_replanner(start, slow_profile(), reqs, planner=planner, planned_for=dr.PlannedWorkload(
        8.0, ((16, 8),) * 50), settings=s, startup_s=5.0)
    assert len(run.records) == len(reqs) and all(r.finish_reason == "length" for r in run.records)  # none lost
    assert len(run.changes) == 1 and run.changes[0].state == "done" and run.replanner.num_changes == 1
    assert run.placements[0][1] == "P(tp2)+D(tp1)" and run.placements[-1][1].startswith(("2xP", "3xP"))
    series = attainment_over_time(run.records, slo, 2.0)
    assert all(a >= 0.9 for t, a, n in series if t + 2.0 <= shift)  # planned-for load: met
    assert min(a for t, a, n in series if t >= shift) < 0.5  # the shift overloads one pair
    rec = recovery_time(series, shift)
    assert rec is not None and rec <= 5.0 + 20.0, (rec, series, run.replanner.log)  # start-up + 20 s

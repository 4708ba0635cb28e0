"""The simulator drives the real controller and workers on a virtual clock: latencies computable by hand."""

import sys

import pytest

from distserve_jax import metrics
from distserve_jax.metrics import SLO
from distserve_jax.planner import deployment as dp
from distserve_jax.planner import simulator as sim
from tests.planner.toy import toy_profile

LIMITS = dict(block_size=16, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256)


def test_colocated_two_requests_by_hand():
    # One step at a time: prefill 100 ms, decode 10 ms, a 16-token budget (one prompt per prefill).
    d = dp.build("colocated", [("colocated", 1, 1)], async_scheduling=False, **LIMITS)
    recs = sim.run(d, toy_profile(), [sim.SimRequest(0.0, 16, 5), sim.SimRequest(0.0, 16, 5)])
    # r0 prefilled 0-0.1, r1 0.1-0.2, then both decode 4 steps: 0.21, 0.22, 0.23, 0.24.
    assert [r.ttft for r in recs] == pytest.approx([0.1, 0.2])
    assert [r.tpot for r in recs] == pytest.approx([(0.24 - 0.1) / 4, (0.24 - 0.2) / 4])
    assert [r.output_len for r in recs] == [5, 5] and all(r.finish_reason == "length" for r in recs)
    assert metrics.attainment(recs, SLO(0.15, 0.05)) == 0.5  # r1 misses TTFT
    assert metrics.attainment(recs, SLO(0.25, 0.02)) == 0.5  # r0 misses TPOT
    assert metrics.attainment(recs, SLO(0.25, 0.05)) == 1.0


def test_launch_ahead_keeps_the_device_busy():
    # Launching ahead: the decode steps run back to back after the prefill, tokens at 0.1, 0.11, ...
    d = dp.build("colocated", [("colocated", 1, 1)], **LIMITS)
    (r,) = sim.run(d, toy_profile(), [sim.SimRequest(1.0, 16, 5)])
    assert (r.ttft, r.tpot, r.finish_time) == pytest.approx((0.1, 0.01, 1.14))


def test_disaggregated_by_hand_with_kv_transfer():
    # Prefill 100 ms; the 1-block KV moves in 50 ms; decode steps 10 ms; step at a time.
    d = dp.build("disaggregated", [("prefill", 1, 1), ("decode", 1, 1)], async_scheduling=False, **LIMITS)
    recs = sim.run(d, toy_profile(), [sim.SimRequest(0.0, 16, 3), sim.SimRequest(2.0, 10, 1)])
    r = recs[0]
    assert (r.ttft, r.migration_start, r.migration_end) == pytest.approx((0.1, 0.1, 0.15))
    assert r.tpot == pytest.approx((0.17 - 0.1) / 2)  # tokens at 0.1, 0.16, 0.17
    assert recs[1].ttft == pytest.approx(0.1) and recs[1].migration_start is None  # one token: no migration
    assert metrics.attainment(recs, SLO(0.2, 0.03)) == 0.5


def test_prefill_queueing_and_kv_back_pressure_by_hand():
    # Both caches hold 3 blocks (48 tokens); prompts of 24 tokens (2 blocks), 24 output tokens.
    # b cannot be prefilled until a's KV is pulled (prefill back-pressure), and cannot be pulled
    # until a has finished decoding and freed the decode cache (decode back-pressure).
    prof = toy_profile(kv_tokens=48, transfer_s_per_block=0.0)
    d = dp.build("disaggregated", [("prefill", 1, 1), ("decode", 1, 1)], async_scheduling=False,
                 **{**LIMITS, "max_num_batched_tokens": 64})
    a, b = sim.run(d, prof, [sim.SimRequest(0.0, 24, 24), sim.SimRequest(0.0, 24, 24)])
    assert (a.ttft, a.finish_time) == pytest.approx((0.1, 0.1 + 23 * 0.01))
    assert (b.prefill_start, b.ttft) == pytest.approx((0.1, 0.2))
    assert b.migration_start == pytest.approx(a.finish_time)
    assert b.finish_time == pytest.approx(a.finish_time + 23 * 0.01)
    assert b.tpot == pytest.approx((b.finish_time - 0.2) / 23)


def test_refused_requests_count_as_misses():
    d = dp.build("colocated", [("colocated", 1, 1)], **LIMITS)
    recs = sim.run(d, toy_profile(kv_tokens=64), [sim.SimRequest(0.0, 60, 20), sim.SimRequest(0.0, 10, 2)])
    assert not recs[0].completed and "KV cache" in recs[0].finish_reason and recs[1].completed
    assert metrics.attainment(recs, SLO(1, 1)) == 0.5


def test_simulation_imports_no_jax():
    code = ("import sys; import distserve_jax.planner.simulator, distserve_jax.planner.search, "
            "distserve_jax.planner.cli; assert 'jax' not in sys.modules, [m for m in sys.modules if 'jax.' in m]")
    import subprocess
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))

"""Tests for distserve_jax.metrics: per-request latencies, attainment, goodput, SLO scale.

`pytest.approx` here (default rel 1e-6) compares float64 results of a few additions and
divisions of exact inputs with their exact values: rounding is ~1e-16, so the bound only absorbs
that; the `abs=1e-4` ones match the goodput search's own `abs_tol`.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distserve_jax import metrics
from distserve_jax.metrics import SLO, RequestRecord


def _record(rid, arrival, token_times, prompt_len=8, finish=None):
    return RequestRecord(request_id=rid, prompt_len=prompt_len, output_len=len(token_times),
                         arrival_time=arrival,
                         first_token_time=token_times[0] if token_times else None,
                         finish_time=(token_times[-1] if finish is None and token_times
                                      else finish),
                         token_times=list(token_times))


def test_ttft_tpot_itl_e2e_hand_computed():
    r = _record("a", 1.0, [1.5, 1.75, 2.0, 2.75], finish=3.0)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx((2.75 - 1.5) / 3)
    assert r.itl == pytest.approx([0.25, 0.25, 0.75])
    assert r.e2e_latency == pytest.approx(2.0)
    assert r.completed


def test_record_token_and_finish_build_the_same_record():
    r = RequestRecord(request_id="a", prompt_len=8, arrival_time=1.0)
    assert r.ttft is None and r.tpot is None and not r.completed
    for t in (1.5, 1.75, 2.0, 2.75):
        r.record_token(t)
    r.finish(3.0, "length")
    assert r.output_len == 4 and r.first_token_time == 1.5
    assert r.tpot == pytest.approx((2.75 - 1.5) / 3)
    assert r.finish_reason == "length"
    with pytest.raises(ValueError, match="earlier"):
        r.record_token(2.0)


def test_tpot_falls_back_on_finish_time_without_token_times():
    r = RequestRecord(request_id="s", prompt_len=4, output_len=5, arrival_time=0.0,
                      first_token_time=0.25, finish_time=1.25)
    assert r.tpot == pytest.approx(0.25)
    assert r.itl == []


def test_one_token_output_has_no_tpot_and_meets_any_tpot_target():
    r = _record("one", 0.0, [0.5])
    assert r.tpot is None and r.itl == []
    assert metrics.meets_slo(r, SLO(ttft_s=0.5, tpot_s=1e-9))
    assert not metrics.meets_slo(r, SLO(ttft_s=0.4, tpot_s=1e-9))


def test_token_times_length_mismatch_raises():
    r = RequestRecord(request_id="x", prompt_len=4, output_len=3, arrival_time=0.0,
                      first_token_time=0.1, finish_time=0.3, token_times=[0.1, 0.2])
    with pytest.raises(ValueError, match="token_times"):
        _ = r.tpot


def test_bad_record_and_slo_arguments_raise():
    with pytest.raises(ValueError, match="prompt_len"):
        RequestRecord(request_id="x", prompt_len=-1)
    with pytest.raises(ValueError, match="arrival_time"):
        RequestRecord(request_id="x", prompt_len=1, arrival_time=math.nan)
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0.0, tpot_s=1.0)
    with pytest.raises(ValueError, match="tpot_s"):
        SLO(ttft_s=1.0, tpot_s=-1.0)
    with pytest.raises(ValueError, match="empty"):
        metrics.attainment([], SLO(1.0, 1.0))


def test_attainment_needs_both_targets():
    slo = SLO(ttft_s=1.0, tpot_s=0.25)
    records = [
        _record("ok", 0.0, [0.5, 0.75, 1.0]),                  # ttft 0.5, tpot 0.25
        _record("slow_first", 0.0, [1.5, 1.75]),               # ttft 1.5 misses
        _record("slow_decode", 0.0, [0.5, 1.0, 1.5]),          # tpot 0.5 misses
        _record("one_token", 0.0, [1.0]),                      # ttft 1.0 meets, no tpot
        RequestRecord(request_id="failed", prompt_len=4, arrival_time=0.0),  # no token
    ]
    assert [metrics.meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    assert metrics.attainment(records, slo) == pytest.approx(2 / 5)
    # A request that produced tokens but never finished misses the SLO.
    unfinished = _record("unfinished", 0.0, [0.5, 0.75])
    unfinished.finish_time = None
    assert not metrics.meets_slo(unfinished, slo)


def _threshold_fn(threshold):
    return lambda rate: 1.0 if rate <= threshold else 0.5


def test_find_goodput_finds_step_threshold():
    res = metrics.find_goodput(_threshold_fn(3.7), low=0.5, high=16.0, rel_tol=0.001)
    assert res.status == "ok"
    assert 3.7 - 0.001 * 16.0 <= res.rate <= 3.7
    assert res.points[0] == (0.5, 1.0) and res.points[1] == (16.0, 0.5)
    passing = [r for r, a in res.points if a >= 0.9]
    assert res.rate == max(passing)


def test_find_goodput_on_a_smooth_attainment_curve():
    def att(rate):  # Falls linearly from 1 at rate 2 to 0 at rate 12: 0.9 at rate 3.
        return float(np.clip(1.0 - (rate - 2.0) / 10.0, 0.0, 1.0))

    res = metrics.find_goodput(att, low=1.0, high=12.0, abs_tol=1e-4, rel_tol=0.0,
                               max_iters=40)
    assert res.rate == pytest.approx(3.0, abs=1e-4)
    assert att(res.rate) >= 0.9
    strict = metrics.find_goodput(att, low=1.0, high=12.0, target=0.99, abs_tol=1e-4,
                                  rel_tol=0.0, max_iters=40)
    assert strict.rate == pytest.approx(2.1, abs=1e-4)


def test_find_goodput_edges_and_iteration_cap():
    below = metrics.find_goodput(_threshold_fn(0.1), low=0.5, high=4.0)
    assert below.status == "below_low" and below.rate == 0.0 and len(below.points) == 1
    above = metrics.find_goodput(_threshold_fn(100.0), low=0.5, high=4.0)
    assert above.status == "above_high" and above.rate == 4.0 and len(above.points) == 2
    capped = metrics.find_goodput(_threshold_fn(3.7), low=0.5, high=16.0, rel_tol=1e-12,
                                  max_iters=5)
    assert len(capped.points) == 2 + 5
    json.dumps(capped.to_dict())
    with pytest.raises(ValueError, match="low"):
        metrics.find_goodput(_threshold_fn(1.0), low=0.0, high=1.0)
    with pytest.raises(ValueError, match="high"):
        metrics.find_goodput(_threshold_fn(1.0), low=2.0, high=1.0)
    with pytest.raises(ValueError, match="target"):
        metrics.find_goodput(_threshold_fn(1.0), low=1.0, high=2.0, target=1.5)
    with pytest.raises(ValueError, match="outside"):
        metrics.find_goodput(lambda r: 2.0, low=1.0, high=2.0)


def test_slo_scale_exact_on_constructed_records():
    slo = SLO(ttft_s=2.0, tpot_s=0.5)
    # Request i needs scale (i + 1) / 10: from TTFT for even i, from TPOT for odd i.
    records = []
    for i in range(10):
        need = (i + 1) / 10
        if i % 2 == 0:
            ttft, tpot = need * 2.0, 0.01
        else:
            ttft, tpot = 0.01, need * 0.5
        records.append(_record(f"r{i}", 0.0, [ttft, ttft + tpot, ttft + 2 * tpot]))
    for r, i in zip(records, range(10)):
        assert metrics.required_scale(r, slo) == pytest.approx((i + 1) / 10)
    scale = metrics.slo_scale(records, slo, target=0.9)
    assert scale == pytest.approx(0.9)
    assert metrics.attainment(records, slo.scaled(scale)) >= 0.9
    assert metrics.attainment(records, slo.scaled(scale * (1 - 1e-9))) < 0.9
    assert metrics.slo_scale(records, slo, target=0.5) == pytest.approx(0.5)
    assert metrics.slo_scale(records, slo, target=1.0) == pytest.approx(1.0)
    # Two failed requests out of 11 make 90% unreachable at any scale.
    failed = [RequestRecord(request_id=f"f{i}", prompt_len=4) for i in range(2)]
    assert metrics.slo_scale(records + failed, slo, target=0.9) == math.inf


# Latencies are 0 or at least a nanosecond: subnormal seconds (5e-324) underflow to a zero SLO
# when scaled, which no clock produces.
_SECONDS = st.one_of(st.just(0.0), st.floats(1e-9, 10.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_SECONDS, st.one_of(st.just(0.0), st.floats(1e-9, 1.0)),
                          st.integers(1, 4)), min_size=1, max_size=30),
       st.sampled_from([0.5, 0.9, 0.95, 1.0]))
def test_slo_scale_is_the_tightest_passing_scale(cases, target):
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    records = [_record(f"r{i}", 0.0, [ttft + k * tpot for k in range(n)])
               for i, (ttft, tpot, n) in enumerate(cases)]
    scale = metrics.slo_scale(records, slo, target)
    if scale == 0.0:
        assert metrics.attainment(records, slo.scaled(1e-300)) >= target
        return
    assert metrics.attainment(records, slo.scaled(scale)) >= target
    assert metrics.attainment(records, slo.scaled(scale * (1 - 1e-6))) < target


def test_percentile_summary_matches_numpy_linear_interpolation():
    s = metrics.percentile_summary(range(1, 101))
    assert s["count"] == 100 and s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["min"] == 1.0 and s["max"] == 100.0
    empty = metrics.percentile_summary([], percentiles=(50, 99.9))
    assert empty == {"count": 0, "mean": None, "min": None, "max": None, "p50": None,
                     "p99.9": None}
    with pytest.raises(ValueError, match="percentiles"):
        metrics.percentile_summary([1.0], percentiles=(101,))


def test_summarize_hand_computed_run():
    records = [
        _record("a", 0.0, [1.0, 2.0, 3.0], prompt_len=10),   # ttft 1, tpot 1
        _record("b", 1.0, [1.5], prompt_len=6),               # ttft 0.5, one token
        RequestRecord(request_id="c", prompt_len=7, arrival_time=2.0),  # never served
    ]
    out = metrics.summarize(records, slos={"loose": SLO(1.0, 1.0), "tight": SLO(0.6, 1.0)})
    json.dumps(out, allow_nan=False)
    assert out["num_requests"] == 3 and out["num_completed"] == 2 and out["num_failed"] == 1
    assert out["duration_s"] == pytest.approx(3.0)
    assert out["offered_rate"] == pytest.approx(1.0)
    assert out["input_tokens"] == 16 and out["output_tokens"] == 4
    assert out["output_throughput"] == pytest.approx(4 / 3)
    assert out["total_token_throughput"] == pytest.approx(20 / 3)
    assert out["request_throughput"] == pytest.approx(2 / 3)
    assert out["ttft_s"]["mean"] == pytest.approx(0.75)
    assert out["tpot_s"]["count"] == 1 and out["tpot_s"]["mean"] == pytest.approx(1.0)
    assert out["itl_s"]["count"] == 2 and out["itl_s"]["p50"] == pytest.approx(1.0)
    assert out["e2e_s"]["max"] == pytest.approx(3.0)
    assert out["slo"]["loose"]["attainment"] == pytest.approx(2 / 3)
    assert out["slo"]["loose"]["request_goodput"] == pytest.approx(2 / 3)
    assert out["slo"]["tight"]["attainment"] == pytest.approx(1 / 3)
    assert out["slo"]["loose"]["slo_scale"] is None  # 1 of 3 failed: 90% unreachable.
    single = metrics.summarize(records[:2], slos=SLO(1.0, 1.0), duration_s=4.0)
    assert single["slo"]["slo"]["slo_scale"] == pytest.approx(1.0)
    assert single["output_throughput"] == pytest.approx(1.0)


def test_goodput_from_curve_interpolates_the_last_crossing():
    # 0.95 at 4 and 0.85 at 6: the line crosses 0.9 halfway, at 5.
    res = metrics.goodput_from_curve({1.0: 1.0, 4.0: 0.95, 6.0: 0.85, 8.0: 0.2}, target=0.9)
    assert res.status == "ok" and res.rate == pytest.approx(5.0, rel=1e-12)
    assert [r for r, _ in res.points] == [1.0, 4.0, 6.0, 8.0]
    assert metrics.dips_below(res) == ()


def test_goodput_from_curve_is_not_decided_by_a_dip():
    # A noisy miss at rate 2 below passing rates 4 and 6: bisection would stop below 2; the curve
    # rule reports the crossing after 6 and names the dip.
    curve = {1.0: 0.97, 2.0: 0.88, 4.0: 0.93, 6.0: 0.91, 8.0: 0.5}
    res = metrics.goodput_from_curve(curve, target=0.9)
    assert res.status == "ok"
    assert 6.0 < res.rate < 8.0 and res.rate == pytest.approx(6.0 + 2.0 * 0.01 / 0.41, rel=1e-12)
    assert metrics.dips_below(res) == (2.0,)


def test_goodput_from_curve_edges_and_bad_input():
    assert metrics.goodput_from_curve({1.0: 0.5, 2.0: 0.1}).status == "below_low"
    top = metrics.goodput_from_curve({1.0: 1.0, 2.0: 0.95})
    assert top.status == "above_high" and top.rate == 2.0
    with pytest.raises(ValueError, match="at least one"):
        metrics.goodput_from_curve({})
    with pytest.raises(ValueError, match="outside"):
        metrics.goodput_from_curve({1.0: 1.5})
    with pytest.raises(ValueError, match="positive"):
        metrics.goodput_from_curve({0.0: 1.0})

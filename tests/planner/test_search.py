"""Placement search on a toy profile whose optimum is known; bad inputs give named errors."""

import pytest

from distserve_jax.metrics import SLO
from distserve_jax.planner import goodput as g
from distserve_jax.planner import search
from distserve_jax.planner.latency_model import Hardware, Profile, StepCoefficients
from distserve_jax.planner.workload import UnknownWorkloadError, lengths
from tests.planner.toy import TOY_MODEL

# Prefill costs b ms per prompt token, decode a ms per step (any batch up to 8 rows):
#   prefill capacity (16-token prompts): tp1 62 req/s (62/GPU), tp2 208 (104/GPU), tp4 250 (62/GPU)
#   decode capacity (8 rows, 8 tokens):  tp1 200 req/s (200/GPU), tp2 222 (111/GPU), tp4 250 (62/GPU)
# Per GPU: Alg. 1 picks P(tp2) and D(tp1); Alg. 2's best pair on a 4-GPU node is P(tp2)+D(tp1)
# (~200/3 = 67/GPU against P(tp2)+D(tp2) 52, P(tp1)+D(tp1) 31, P(tp1)+D(tp2) 21).
PREFILL_B = {1: 1.0, 2: 0.3, 4: 0.25}
DECODE_A = {1: 5.0, 2: 4.5, 4: 4.0}
LIMITS = dict(block_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
SLO_ = SLO(0.05, 0.02)


def profile() -> Profile:
    cfg = {(tp, 1): StepCoefficients(prefill=(0.0, PREFILL_B[tp], 0.0), decode_small=(DECODE_A[tp], 0.0, 0.0),
                                     decode_large=(DECODE_A[tp], 0.0, 0.0), max_num_tokens=16 * 200)
           for tp in PREFILL_B}
    hw = Hardware("toy", gpus_per_node=4, memory_bytes=1, intra_node_gbit_s=1e6, inter_node_gbit_s=1e6)
    return Profile(TOY_MODEL, hw, cfg, pp_model="measured", name="toy-search")


@pytest.fixture(scope="module")
def work():
    return g.Workload.make([(16, 8)] * 80, seed=1)


def test_search_rate_bisects_to_one_percent():
    res = g.search_rate(lambda r: 1.0 if r <= 3.21 else 0.5, guess=1.0, target=0.9)
    assert res.status == "ok" and 3.21 * 0.99 <= res.rate <= 3.21
    fails = [r for r, a in res.points if a < 0.9]
    assert min(fails) - res.rate <= 0.01 * min(fails) and len(res.points) <= 12


def test_alg1_picks_each_phases_best_and_replicates(work):
    plan = search.alg1(profile(), search.Cluster(4, 4), work, SLO_, rate=500.0, limits=LIMITS)
    assert [s.unit.describe() for s in plan.prefill][0] == "P(tp2)"
    assert [s.unit.describe() for s in plan.decode][0] == "D(tp1)"
    bp, bd = plan.prefill[0], plan.decode[0]
    assert 150 < bp.goodput < 320 and 120 < bd.goodput < 320  # near the analytic capacities
    n, m = g.ceil_div(500, bp.goodput), g.ceil_div(500, bd.goodput)
    roles = [(i.role, i.tp) for i in plan.placement.instances]
    n2, m2 = roles.count(("prefill", 2)), roles.count(("decode", 1))
    assert n2 + m2 == len(roles) and n <= n2 and m <= m2 and n2 + m2 <= n + m + 2  # ceil(R/goodput), +verification
    assert plan.attainment_at_rate >= 0.9 and plan.error is None


def test_alg2_finds_the_best_pair(work):
    plan = search.alg2(profile(), search.Cluster(2, 4), work, SLO_, rate=100.0, limits=LIMITS, exhaustive=True)
    ranked = [s.unit.describe() for s in plan.ranked]
    assert ranked[0] == "P(tp2)+D(tp1)" and set(ranked) >= {"P(tp1)+D(tp1)", "P(tp2)+D(tp2)", "P(tp1)+D(tp2)"}
    pruned = search.alg2(profile(), search.Cluster(2, 4), work, SLO_, rate=100.0, limits=LIMITS)
    assert pruned.ranked[0].unit.describe() == "P(tp2)+D(tp1)" and len(pruned.ranked) <= len(plan.ranked)
    (p, d) = pruned.placement.instances
    assert {x // 4 for x in p.devices} == {x // 4 for x in d.devices}  # the pair shares a node


def test_baselines_and_placement_yaml(work, tmp_path):
    plans = search.baselines(profile(), search.Cluster(1, 4), work, SLO_, rate=50.0, limits=LIMITS)
    assert set(plans) == {"colocated", "chunked"} and all(p.ranked for p in plans.values())
    plan = search.alg2(profile(), search.Cluster(2, 4), work, SLO_, rate=100.0, limits=LIMITS)
    plan.placement.write_placement(tmp_path / "p.yaml", header="test")
    from distserve_jax.engine.placement import Placement
    loaded = Placement.from_yaml(tmp_path / "p.yaml")
    assert [(i.tp, i.pp) for i in loaded.prefill] == [(2, 1)] and [(i.tp, i.pp) for i in loaded.decode] == [(1, 1)]


def test_bad_inputs_are_named_errors(work):
    with pytest.raises(UnknownWorkloadError):
        lengths("no-such-workload", 10)
    with pytest.raises(g.ImpossibleSLOError):  # TTFT below every prefill's service time
        search.alg1(profile(), search.Cluster(1, 4), work, SLO(0.001, 0.02), rate=10.0, limits=LIMITS)
    with pytest.raises(g.NoFittingPlacementError):  # no profiled degree fits 1-GPU nodes but tp1, which
        search.alg2(profile(), search.Cluster(1, 1), work, SLO_, rate=10.0, limits=LIMITS)  # cannot pair
    plan = search.alg1(profile(), search.Cluster(1, 4), work, SLO_, rate=5000.0, limits=LIMITS)
    assert plan.placement is None and "GPUs" in plan.error


def test_pruning_keeps_each_phases_best_with_fewer_simulations(work):
    g._CACHE.clear()
    full = search.alg1(profile(), search.Cluster(4, 4), work, SLO_, rate=500.0, limits=LIMITS, prune=False)
    g._CACHE.clear()
    pruned = search.alg1(profile(), search.Cluster(4, 4), work, SLO_, rate=500.0, limits=LIMITS)
    for a, b in ((full.prefill, pruned.prefill), (full.decode, pruned.decode)):
        assert b[0].unit == a[0].unit and b[0].goodput == pytest.approx(a[0].goodput, rel=0.01) and not b[0].pruned
        assert any(s.pruned for s in b) and not any(s.pruned for s in a)
        for s in b:  # a pruned candidate's goodput is an upper bound of its real one, below the best
            if s.pruned:
                real = next(x for x in a if x.unit == s.unit)
                assert real.goodput <= s.goodput and real.per_gpu <= a[0].per_gpu * 1.01
    assert pruned.num_simulations < full.num_simulations
    assert pruned.placement.describe() == full.placement.describe()
    # Scores are memoized: the same search again simulates only the placement check.
    again = search.alg1(profile(), search.Cluster(4, 4), work, SLO_, rate=500.0, limits=LIMITS)
    assert [s.goodput for s in again.prefill] == [s.goodput for s in pruned.prefill]

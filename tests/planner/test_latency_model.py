"""The latency model against hand-computed values, on the published A100 coefficients and a toy profile."""

import json

import pytest

from distserve_jax.planner.latency_model import Profile, ProfileError, UnprofiledConfigError, kv_blocks
from distserve_jax.planner.published import PUBLISHED, ROOT, convert
from distserve_jax.step_types import SeqWork
from tests.planner.toy import toy_profile

P13 = ROOT / "a100-opt-13b.distserve.json"


def works(lens_ctx):
    return [SeqWork([0] * n, c, [], None) for n, c in lens_ctx]


def test_published_13b_prefill_and_decode_by_hand():
    p = Profile.load(P13)
    m = p.step_model(1, 1)
    # README example: one 512-token prompt on TP1 = 18.10 + 0.1019*512 + 7.12e-6*512^2 = 72.1 ms.
    assert m.stage_time(works([(512, 0)])) == pytest.approx(0.0721, abs=5e-5)
    a, b, c = 18.10254647486372, 0.1019122572698738, 7.122264314252114e-06
    assert m.stage_time(works([(100, 0), (300, 0)])) == pytest.approx((a + b * 400 + c * (100**2 + 300**2)) / 1e3)
    # Decode B=64 rows at context 1000 (each attends to ctx+1 keys): small-batch coefficients.
    a, b, c = 19.934702624895458, 0.0006269356524350583, 0.03850697740828398
    assert m.stage_time(works([(1, 1000)] * 64)) == pytest.approx((a + b * 64 * 1001 + c * 64) / 1e3)
    # B=100 >= threshold 95: large-batch coefficients.
    a, b, c = 7.1661889468253595, 0.0005798000403396046, 0.15831096191764046
    assert m.stage_time(works([(1, 500)] * 100)) == pytest.approx((a + b * 100 * 501 + c * 100) / 1e3)


def test_pp_is_analytic_and_flagged():
    p = Profile.load(P13)
    one, two = p.step_model(2, 1), p.step_model(2, 2)
    assert one.estimated == "" and "pp=2" in two.estimated
    w = works([(512, 0)])
    assert two.stage_time(w) == pytest.approx(one.stage_time(w) / 2 + 0.001)  # T/pp + 1 ms per stage


def test_unprofiled_and_invalid_degrees_are_named_errors():
    p = Profile.load(P13)
    with pytest.raises(UnprofiledConfigError, match="tp=8"):
        p.step_model(8, 1)  # 40 heads divide by 8, but TP8 was never profiled for 13B
    with pytest.raises(UnprofiledConfigError, match="does not divide"):
        p.step_model(3, 1)
    measured = toy_profile(pp_model="measured")
    with pytest.raises(UnprofiledConfigError, match="pp=2"):
        measured.step_model(1, 2)


def test_kv_capacity_tabulated_or_estimated():
    p = Profile.load(P13)
    assert p.kv_capacity_tokens(2, 1) == (163008, False)  # the published CSV
    tokens, est = p.kv_capacity_tokens(2, 3)  # not in the CSV: memory minus weights
    assert est and tokens == int((6 * 80e9 * 0.95 - 12.85e9 * 2) // (2 * 40 * 40 * 128 * 2))
    assert kv_blocks(163008, 16) == 1 + 10188


def test_transfer_time_intra_vs_inter_node():
    p = Profile.load(ROOT / "a100-opt-66b.distserve.json")
    n = 755 * p.model.kv_bytes_per_token  # a ShareGPT-mean prompt of OPT-66B: 1.78 GB
    assert p.model.kv_bytes_per_token == 2 * 64 * 9216 * 2
    assert p.transfer_seconds(n, intra_bytes=0) == pytest.approx(n * 8 / 25e9)
    assert p.transfer_seconds(n) == pytest.approx(n * 8 / 2400e9)
    assert p.transfer_seconds(n, intra_bytes=n // 2) == pytest.approx(n * 4 / 2400e9 + n * 4 / 25e9, rel=1e-6)


def test_mixed_step_estimate_and_padding():
    p = toy_profile(prefill_ms=100, decode_ms=10, per_token_ms=1.0)
    c = p.configs[(1, 1)]
    # Estimated mixed step: the prefill form on the chunk (b * 32 tokens) plus the decode rows' costs (0 here).
    assert c.mixed_ms([(32, 16)], 3, 300) == pytest.approx(100 + 32)
    padded = type(c)(prefill=(0, 1, 0), decode_small=(0, 0, 1), decode_large=(0, 0, 1),
                     token_buckets=(16, 32, 64), seq_buckets=(2, 4, 8))
    assert padded.prefill_ms([20]) == 32 and padded.decode_ms(3, 0) == 4


def test_profile_round_trip_and_bad_files(tmp_path):
    p = Profile.load(P13)
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert q.configs == p.configs and q.kv_capacity == p.kv_capacity and q.model == p.model
    with pytest.raises(ProfileError, match="no profile file"):
        Profile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ProfileError, match="not a distserve-jax-profile"):
        Profile.load(tmp_path / "bad.json")


def test_committed_profiles_match_the_published_files():
    for engine in ("distserve", "vllm"):
        for model in ("opt-13b", "opt-66b"):
            fresh = convert(PUBLISHED / f"a100-80g-opt-latency.{engine}.json", PUBLISHED / "a100-80g-opt-kv-capacity.csv",
                            f"facebook/{model}", engine)
            assert Profile.load(ROOT / f"a100-{model}.{engine}.json").configs == fresh.configs

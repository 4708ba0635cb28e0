"""Tests for distserve_jax.workloads: arrivals, synthetic workloads, ShareGPT, HumanEval."""

import dataclasses
import json
import math

import numpy as np
import pytest

from distserve_jax import workloads
from distserve_jax.workloads import WorkloadRequest, datasets

SHAREGPT_HEAD = 300  # Records read from the head of the ShareGPT file in these tests.


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode("utf-8"))


class WhitespaceTokenizer:
    def encode(self, text):
        return [len(w) % 1000 for w in text.split()]


class EncodingTokenizer:
    """Mimics `tokenizers.Tokenizer`: encode returns an object with `.ids`."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self._Encoding([ord(c) % 256 for c in text])


# --------------------------------------------------------------------------- arrivals
@pytest.mark.parametrize("cv", [1.0, 0.5, 3.0])
def test_arrivals_have_the_requested_mean_rate(cv):
    n, rate = 20_000, 5.0
    times = workloads.arrival_times(n, rate, cv=cv, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    # The mean of n-1 i.i.d. gaps has std (cv / rate) / sqrt(n-1): allow 5 standard errors.
    tol = 5 * cv / math.sqrt(n - 1)
    assert abs(gaps.mean() * rate - 1.0) < tol


def test_burstiness_changes_the_coefficient_of_variation():
    n = 20_000
    cvs = {}
    for cv in (0.5, 1.0, 3.0):
        gaps = workloads.inter_arrival_gaps(n, 2.0, cv=cv, seed=11)
        cvs[cv] = gaps.std() / gaps.mean()
        # Seeded sampling, not rounding: the estimate's relative standard error is <= 1.4% (cv 3,
        # heavy-tailed gamma gaps), so 15% is ten of those (observed <= 1.5%).
        assert cvs[cv] == pytest.approx(cv, rel=0.15)
    assert cvs[0.5] < cvs[1.0] < cvs[3.0]


def test_arrivals_are_seeded_and_validated():
    a = workloads.poisson_arrivals(100, 3.0, seed=7)
    b = workloads.poisson_arrivals(100, 3.0, seed=7)
    c = workloads.poisson_arrivals(100, 3.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(workloads.gamma_arrivals(50, 3.0, cv=2.0, seed=1),
                                  workloads.gamma_arrivals(50, 3.0, cv=2.0, seed=1))
    np.testing.assert_array_equal(workloads.arrival_times(4, math.inf, start=2.0),
                                  [2.0] * 4)
    with pytest.raises(ValueError, match="rate"):
        workloads.poisson_arrivals(10, 0.0)
    with pytest.raises(ValueError, match="rate"):
        workloads.poisson_arrivals(10, -1.0)
    with pytest.raises(ValueError, match="n must"):
        workloads.poisson_arrivals(0, 1.0)
    with pytest.raises(ValueError, match="cv"):
        workloads.gamma_arrivals(10, 1.0, cv=0.0)
    with pytest.raises(ValueError, match="start"):
        workloads.arrival_times(10, 1.0, start=-1.0)


def test_with_arrivals_stamps_copies_in_order():
    reqs = workloads.fixed_workload(5, prompt_len=3, output_len=2, max_model_len=8,
                                    vocab_size=10)
    stamped = workloads.with_arrivals(reqs, 2.0, seed=4, start=1.0)
    np.testing.assert_allclose([r.arrival_time for r in stamped],
                               workloads.poisson_arrivals(5, 2.0, seed=4, start=1.0))
    assert all(r.arrival_time == 0.0 for r in reqs)
    assert [r.prompt_token_ids for r in stamped] == [r.prompt_token_ids for r in reqs]
    with pytest.raises(ValueError, match="empty"):
        workloads.with_arrivals([], 1.0)


# ------------------------------------------------------------------------- synthetic
def test_fixed_and_uniform_workloads():
    fixed = workloads.fixed_workload(4, prompt_len=6, output_len=3, max_model_len=16,
                                     vocab_size=50, seed=2)
    assert all(r.prompt_len == 6 and r.max_tokens == 3 and r.prompt is None for r in fixed)
    assert all(len(r.prompt_token_ids) == 6 for r in fixed)
    assert all(0 <= t < 50 for r in fixed for t in r.prompt_token_ids)
    uni = workloads.uniform_workload(2000, prompt_len_range=(5, 9), output_len_range=(1, 3),
                                     max_model_len=12, vocab_size=7, seed=5)
    p = np.array([r.prompt_len for r in uni])
    o = np.array([r.max_tokens for r in uni])
    assert set(p.tolist()) == set(range(5, 10)) and set(o.tolist()) == {1, 2, 3}
    assert p.mean() == pytest.approx(7.0, abs=0.15)  # std 1.41 / sqrt(2000) = 0.03.
    again = workloads.uniform_workload(2000, prompt_len_range=(5, 9),
                                       output_len_range=(1, 3), max_model_len=12,
                                       vocab_size=7, seed=5)
    assert again == uni
    no_ids = workloads.uniform_workload(2000, prompt_len_range=(5, 9),
                                        output_len_range=(1, 3), max_model_len=12, seed=5,
                                        with_token_ids=False)
    assert [r.prompt_len for r in no_ids] == p.tolist()
    assert all(r.prompt_token_ids is None for r in no_ids)


def test_synthetic_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_model_len"):
        workloads.fixed_workload(2, prompt_len=10, output_len=10, max_model_len=16,
                                 vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size"):
        workloads.fixed_workload(2, prompt_len=1, output_len=1, max_model_len=16)
    with pytest.raises(ValueError, match="prompt_len_range"):
        workloads.uniform_workload(2, prompt_len_range=(9, 5), output_len_range=(1, 1),
                                   max_model_len=16, vocab_size=5)
    with pytest.raises(ValueError, match="max_model_len"):
        workloads.uniform_workload(2, prompt_len_range=(1, 10), output_len_range=(1, 10),
                                   max_model_len=16, vocab_size=5)
    with pytest.raises(ValueError, match="n must"):
        workloads.fixed_workload(0, prompt_len=1, output_len=1, max_model_len=4,
                                 vocab_size=5)


@pytest.mark.parametrize("max_model_len", [2048, 1 << 20])
def test_longbench_like_means_match_the_paper(max_model_len):
    n = 20_000
    reqs = workloads.longbench_workload(n, max_model_len=max_model_len, seed=0,
                                        with_token_ids=False)
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.max_tokens for r in reqs])
    # Seeded sampling: relative standard errors <= 0.6% at n = 20,000; 3% also covers the bias
    # of the max_model_len cut (observed <= 0.4%).
    assert p.mean() == pytest.approx(workloads.LONGBENCH_MEAN_INPUT, rel=0.03)
    assert o.mean() == pytest.approx(workloads.LONGBENCH_MEAN_OUTPUT, rel=0.03)
    assert np.all(p >= 1) and np.all(o >= 1) and np.all(p + o <= max_model_len)


def test_longbench_seeds_token_ids_and_infeasible_lengths():
    a = workloads.longbench_workload(20, max_model_len=2048, vocab_size=100, seed=9)
    b = workloads.longbench_workload(20, max_model_len=2048, vocab_size=100, seed=9)
    c = workloads.longbench_workload(20, max_model_len=2048, vocab_size=100, seed=10)
    assert a == b and a != c
    assert all(len(r.prompt_token_ids) == r.prompt_len for r in a)
    assert all(0 <= t < 100 for r in a for t in r.prompt_token_ids)
    lengths_only = workloads.longbench_workload(20, max_model_len=2048, seed=9,
                                                with_token_ids=False)
    assert [r.prompt_len for r in lengths_only] == [r.prompt_len for r in a]
    with pytest.raises(ValueError, match="mean_input"):
        workloads.longbench_workload(5, max_model_len=1024, with_token_ids=False)


# -------------------------------------------------------------------------- ShareGPT
def test_sharegpt_stream_reader_handles_chunks_and_a_truncated_tail(tmp_path, monkeypatch):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "x" * (i * 7)},
                                                  {"from": "gpt", "value": "[ok], {y}"}]}
               for i in range(6)]
    text = json.dumps(records, indent=2)
    cut = text.rindex('"c5"')  # Cut inside the last record.
    path = tmp_path / "truncated.json"
    path.write_text(text[:cut])
    monkeypatch.setattr(datasets, "_CHUNK_CHARS", 16)
    assert list(workloads.iter_sharegpt_conversations(path)) == records[:5]
    assert list(workloads.iter_sharegpt_conversations(path, limit=2)) == records[:2]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(records))
    assert list(workloads.iter_sharegpt_conversations(whole)) == records
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "an array"}')
    with pytest.raises(ValueError, match="JSON array"):
        list(workloads.iter_sharegpt_conversations(bad))


def _sharegpt(n, **kwargs):
    kwargs.setdefault("tokenizer", ByteTokenizer())
    kwargs.setdefault("max_model_len", 4096)
    return workloads.sharegpt_workload(n, max_conversations=SHAREGPT_HEAD, **kwargs)


def test_sharegpt_packaged_file_loads_with_sane_lengths():
    reqs = _sharegpt(40, seed=0)
    assert len(reqs) == 40
    for r in reqs:
        assert r.prompt and r.prompt_token_ids == list(r.prompt.encode("utf-8"))
        assert r.prompt_len >= 4 and r.max_tokens >= 4 and r.total_len <= 4096
    assert np.mean([r.prompt_len for r in reqs]) > 10
    assert np.mean([r.max_tokens for r in reqs]) > 10
    words = _sharegpt(40, seed=0, tokenizer=WhitespaceTokenizer(), max_model_len=2048)
    assert np.mean([r.prompt_len for r in words]) > 10
    assert all(r.total_len <= 2048 for r in words)


def test_sharegpt_is_seeded_and_filters():
    a, b, c = _sharegpt(15, seed=1), _sharegpt(15, seed=1), _sharegpt(15, seed=2)
    assert a == b and a != c
    short = _sharegpt(30, seed=0, max_prompt_len=64, min_output_len=20)
    assert all(r.prompt_len <= 64 and r.max_tokens >= 20 for r in short)
    one = _sharegpt(30, seed=3)
    multi = _sharegpt(30, seed=3, prompt_turns=3)
    assert np.mean([r.prompt_len for r in multi]) > np.mean([r.prompt_len for r in one])
    assert all(r.prompt.count("\n") >= 2 for r in multi)
    ranged = _sharegpt(30, seed=3, prompt_turns=1, max_prompt_turns=5)
    assert all(r.total_len <= 4096 for r in ranged)
    with pytest.raises(ValueError, match="n=100000"):
        _sharegpt(100_000)
    with pytest.raises(ValueError, match="tokenizer"):
        workloads.sharegpt_workload(3, tokenizer=None, max_model_len=2048,
                                    max_conversations=SHAREGPT_HEAD)
    with pytest.raises(ValueError, match="max_prompt_turns"):
        _sharegpt(3, prompt_turns=2, max_prompt_turns=1)


# ------------------------------------------------------------------------- HumanEval
def test_humaneval_loads_and_repeats_in_permutations():
    reqs = workloads.humaneval_workload(400, tokenizer=ByteTokenizer(), max_model_len=8192,
                                        seed=0)
    prompts = [r.prompt for r in reqs]
    assert len(set(prompts)) == 164
    assert len(set(prompts[:164])) == 164 and len(set(prompts[164:328])) == 164
    assert all("def " in r.prompt for r in reqs)
    assert np.mean([r.prompt_len for r in reqs]) > 100
    assert all(r.max_tokens >= 1 for r in reqs)
    assert reqs == workloads.humaneval_workload(400, tokenizer=ByteTokenizer(),
                                                max_model_len=8192, seed=0)
    tight = workloads.humaneval_workload(50, tokenizer=ByteTokenizer(), max_model_len=512,
                                         seed=1)
    assert all(r.total_len <= 512 for r in tight)
    encoded = workloads.humaneval_workload(3, tokenizer=EncodingTokenizer(),
                                           max_model_len=8192)
    assert all(r.prompt_token_ids == [ord(ch) % 256 for ch in r.prompt] for r in encoded)
    with pytest.raises(ValueError, match="max_model_len"):
        workloads.humaneval_workload(3, tokenizer=ByteTokenizer(), max_model_len=10)


# ------------------------------------------------------------------------ dispatcher
def test_load_workload_by_name():
    tok = ByteTokenizer()
    reqs = workloads.load_workload("sharegpt", 5, tokenizer=tok, seed=0, max_model_len=4096,
                                   rate=4.0, max_conversations=SHAREGPT_HEAD)
    assert len(reqs) == 5 and reqs[0].arrival_time == 0.0
    assert all(b.arrival_time >= a.arrival_time for a, b in zip(reqs, reqs[1:]))
    assert reqs[-1].arrival_time > 0.0
    he = workloads.load_workload("humaneval", 3, tokenizer=tok, max_model_len=4096)
    assert all(r.arrival_time == 0.0 for r in he)
    lb = workloads.load_workload("longbench", 3, vocab_size=32, max_model_len=2048,
                                 rate=1.0, cv=2.0)
    assert lb[0].prompt_token_ids is not None
    fx = workloads.load_workload("fixed", 2, vocab_size=32, max_model_len=64,
                                 prompt_len=8, output_len=4)
    assert [r.total_len for r in fx] == [12, 12]
    un = workloads.load_workload("uniform", 2, max_model_len=64, prompt_len_range=(2, 4),
                                 output_len_range=(1, 2), with_token_ids=False)
    assert all(2 <= r.prompt_len <= 4 for r in un)
    with pytest.raises(ValueError, match="name"):
        workloads.load_workload("alpaca", 2)
    with pytest.raises(ValueError, match="tokenizer"):
        workloads.load_workload("humaneval", 2)
    with pytest.raises(ValueError, match="fixed"):
        workloads.load_workload("fixed", 2, vocab_size=32)  # prompt_len missing.
    with pytest.raises(ValueError, match="sharegpt"):
        workloads.load_workload("sharegpt", 2, tokenizer=tok, prompt_len=3)  # Unknown kwarg.
    with pytest.raises(ValueError, match="rate"):
        workloads.load_workload("fixed", 2, vocab_size=32, prompt_len=1, output_len=1,
                                rate=0.0)
    with pytest.raises(ValueError, match="n must"):
        workloads.load_workload("longbench", 0, vocab_size=32)


def test_workload_request_validation():
    r = WorkloadRequest(prompt="hi", prompt_token_ids=[1, 2], prompt_len=2, max_tokens=3)
    assert r.total_len == 5
    assert dataclasses.replace(r, arrival_time=1.5).arrival_time == 1.5
    with pytest.raises(ValueError, match="prompt_token_ids"):
        WorkloadRequest(prompt=None, prompt_token_ids=[1], prompt_len=2, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        WorkloadRequest(prompt=None, prompt_token_ids=None, prompt_len=2, max_tokens=0)
    with pytest.raises(ValueError, match="arrival_time"):
        WorkloadRequest(prompt=None, prompt_token_ids=None, prompt_len=2, max_tokens=1,
                        arrival_time=-1.0)

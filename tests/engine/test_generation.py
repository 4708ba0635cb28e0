"""Greedy generation matches transformers; batching, tp and preemption do not change tokens.

Each of these compares greedy tokens between two computations whose logits differ by float32
rounding (transformers vs JAX, another tp, batch or cache history). Before comparing, the
reference run's top-two logit gaps are checked to be clear of ties
(`tests.tolerances.assert_clear_greedy_margins`), so no token can flip on another host.
"""

import dataclasses

import numpy as np
import pytest

from distserve_jax import SamplingParams
from distserve_jax.engine.config import EngineConfig
from tests.engine.engine_checks import worker
from distserve_jax.runtime.model_runner import RunnerConfig
from distserve_jax.runtime import compile_counter
from tests.hf_checkpoints import VARIANTS, hf_greedy_generate
from tests.tolerances import LOGIT_PARITY_ATOL, assert_clear_greedy_margins

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=1)


def _clear(outs, what: str) -> None:
    """The reference outputs (asked for logprobs >= 2) have no near-tie greedy step."""
    assert_clear_greedy_margins([o.logprobs for o in outs], what=what)


def _prompts(n, seed=0, lo=3, hi=60, vocab=256):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, int(rng.integers(lo, hi)))] for _ in range(n)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logprobs_match_transformers(variant, make_llm, hf_checkpoint):
    llm = make_llm(variant)
    prompts = [_prompts(1, seed=7, lo=20, hi=21)[0], _prompts(1, seed=8, lo=33, hi=34)[0]]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref_ids, ref_lp, ref_gaps = hf_greedy_generate(hf_checkpoint(variant), p, 32)
        assert_clear_greedy_margins([ref_gaps], what=f"{variant} transformers")
        assert out.token_ids == ref_ids
        assert out.finish_reason == "length"
        got_lp = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        # The parity bound, on logit - logsumexp: both terms carry a logit-sized error, and the
        # observed error stays under 5.3e-6 (a wrong token or position is O(1)).
        np.testing.assert_allclose(got_lp, ref_lp, atol=LOGIT_PARITY_ATOL, rtol=0)


def test_engine_config_mirrors_runner_config():
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for f in dataclasses.fields(RunnerConfig):
        assert f.name in engine, f"EngineConfig lacks RunnerConfig.{f.name}"
        if f.name != "max_model_len":
            assert engine[f.name] == f.default, f"EngineConfig.{f.name} default differs from RunnerConfig's"
    rc = EngineConfig(block_size=8, fuse_projections=False, num_blocks=40).runner_config(4096)
    assert (rc.block_size, rc.fuse_projections, rc.num_blocks, rc.max_model_len) == (8, False, 40, 2048)
    assert EngineConfig(max_model_len=300).runner_config(4096).max_model_len == 300


def test_separate_projections_give_the_same_tokens_as_fused(make_llm):
    prompts = _prompts(3, seed=4, lo=5, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    fused, separate = make_llm("llama3"), make_llm("llama3", fuse_projections=False)
    assert "qkv_proj" in worker(fused.engine).runner.stages[0].params["layers_0"]["self_attn"]
    assert "q_proj" in worker(separate.engine).runner.stages[0].params["layers_0"]["self_attn"]
    want = fused.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _clear(want, "fused projections")
    got = [o.token_ids for o in separate.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    assert got == [o.token_ids for o in want]


def test_batched_equals_one_at_a_time(make_llm):
    llm = make_llm("llama3")
    prompts = _prompts(12, seed=1, lo=1, hi=90)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    batched = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _clear(batched, "batched")  # a batch's GEMMs may block (and so round) differently from one row's
    for p, b in zip(prompts, batched):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=params, use_tqdm=False)[0]
        assert b.token_ids == alone.token_ids


@pytest.mark.parametrize("variant", ["llama3", "opt_project"])
def test_tp2_and_tp4_give_the_same_tokens_as_tp1(variant, make_llm):
    prompts = _prompts(6, seed=2, lo=2, hi=70)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = make_llm(variant).generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _clear(outs, f"{variant} tp=1")
    ref = [o.token_ids for o in outs]
    for tp in (2, 4):
        got = [o.token_ids for o in make_llm(variant, tp=tp).generate(prompt_token_ids=prompts,
                                                                      sampling_params=params, use_tqdm=False)]
        assert got == ref, f"tp={tp}"


def test_preemption_under_a_tiny_cache_keeps_greedy_output(make_llm):
    prompts = _prompts(8, seed=3, lo=10, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    outs = make_llm("qwen2").generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _clear(outs, "qwen2 without preemption")  # a preempted request recomputes its KV by prefill
    ref = [o.token_ids for o in outs]
    # 12 usable blocks of 16 tokens: far fewer than 8 requests of up to 80 tokens need.
    tiny = make_llm("qwen2", num_blocks=13)
    outs = tiny.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0, "the cache was big enough: nothing was preempted"


def _warm_runs_done(workers) -> bool:
    return all(not w.runner.has_pending_warm_runs() and w.runner._warm_run_seconds > 0 for w in workers)


def test_no_recompilation_after_warmup(make_llm):
    llm = make_llm("llama2", max_num_seqs=8, max_num_batched_tokens=128, max_model_len=128, num_blocks=64)
    # Waits for what warm-up leaves for later: the background sampler variants, and the queued
    # short shapes that the idle worker threads run once.
    llm.engine.warmup(wait_background=True, timeout=120)
    workers = llm.engine.executor.workers.values()
    assert _warm_runs_done(workers), "warmup(wait_background=True) returned before the idle warm runs"
    assert not any(w.runner.has_background_work() for w in workers)
    assert [i["warming"] for i in llm.engine.info()["instances"]] == [False] * len(workers)
    before = compile_counter.count()
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 256, int(rng.integers(1, 100)))] for _ in range(200)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_p=float(rng.choice([1.0, 0.9])),
                             max_tokens=int(rng.integers(1, 28)), seed=int(i), ignore_eos=True)
              for i in range(200)]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert all(o.finished for o in outs)
    assert compile_counter.count() == before, f"{compile_counter.count() - before} compilations after warm-up"

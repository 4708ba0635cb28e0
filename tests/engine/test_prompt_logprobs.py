"""Prompt logprobs (`SamplingParams.prompt_logprobs`): equal to the engine's own logprobs of the same
tokens when it generated them (teacher forcing), to transformers' log-softmax of the same prompt,
in one prefill, over several chunks, and across a disaggregated placement; absent unless asked for."""

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.placement import InstanceSpec, Placement
from tests.engine.engine_checks import assert_engine_empty
from tests.hf_checkpoints import hf_prefill_logits

KW = dict(max_model_len=64, num_blocks=24, max_num_seqs=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


def _prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 256, n)]


def _scored(llm: LLM, prompts, k: int = 3):
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=k)
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def _teacher_forced_matches_generation(llm: LLM, seed: int) -> None:
    prompts = [_prompt(seed, 11), _prompt(seed + 1, 5)]
    gens = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    full = [p + g.token_ids for p, g in zip(prompts, gens)]
    for p, g, s in zip(prompts, gens, _scored(llm, full)):
        plp = s.prompt_logprobs
        assert len(plp) == len(p) + len(g.token_ids) and plp[0] is None
        assert all(len(e) >= 3 and all(v <= 0 for v in e.values()) for e in plp[1:])
        got = [plp[len(p) + i][t] for i, t in enumerate(g.token_ids)]
        want = [e[t] for e, t in zip(g.logprobs, g.token_ids)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # greedy tokens are the most likely ones: each is the top of its entry
        for i, t in enumerate(g.token_ids):
            e = plp[len(p) + i]
            assert max(e, key=e.get) == t


def test_prompt_logprobs_equal_the_engines_own_decode_logprobs(make_llm):
    _teacher_forced_matches_generation(make_llm("llama3", **KW), seed=1)


def test_prompt_logprobs_over_several_chunks(make_llm):
    """A 40-token prompt in 16-token chunks (paged context) gives the one-step prefill's values."""
    whole = make_llm("llama3", **KW)
    chunked = make_llm("llama3", mode="chunked", **dict(KW, max_num_batched_tokens=16))
    prompts = [_prompt(7, 40), _prompt(8, 17), _prompt(9, 1)]
    want = _scored(whole, prompts)
    got = _scored(chunked, prompts)
    for w, g in zip(want, got):
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) and g.prompt_logprobs[0] is None
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert set(a) == set(b)
            np.testing.assert_allclose([a[t] for t in b], [b[t] for t in b], rtol=1e-5, atol=1e-5)
    assert got[2].prompt_logprobs == [None]  # a one-token prompt has nothing to score
    _teacher_forced_matches_generation(chunked, seed=3)


def test_prompt_logprobs_match_transformers(make_llm, hf_checkpoint):
    llm = make_llm("llama3", **KW)
    ids = _prompt(4, 30)
    ref = hf_prefill_logits(hf_checkpoint("llama3"), ids).astype(np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref_lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    plp = _scored(llm, [ids], k=5)[0].prompt_logprobs
    for i in range(1, len(ids)):
        assert abs(plp[i][ids[i]] - ref_lp[i - 1, ids[i]]) <= 2e-4
        top = np.argsort(-ref_lp[i - 1])[:5]
        np.testing.assert_allclose([plp[i][int(t)] for t in top], ref_lp[i - 1, top], atol=2e-4)


def test_prompt_logprobs_in_a_disaggregated_placement(hf_checkpoint, make_llm):
    llm = LLM(str(hf_checkpoint("llama3")), mode="disaggregated",
              placement=Placement((InstanceSpec(tp=2),), (InstanceSpec(tp=1),)), **KW)
    ids = [_prompt(5, 13)]
    got = _scored(llm, ids)[0].prompt_logprobs
    want = _scored(make_llm("llama3", **KW), ids)[0].prompt_logprobs
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose([a[t] for t in b], [b[t] for t in b], rtol=1e-5, atol=1e-5)
    assert_engine_empty(llm.engine)
    llm.engine.shutdown()


def test_no_prompt_logprobs_unless_asked(make_llm):
    llm = make_llm("llama3", **KW)
    out = llm.generate(prompt_token_ids=[_prompt(6, 9)], sampling_params=GREEDY, use_tqdm=False)[0]
    assert out.prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)

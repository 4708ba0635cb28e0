"""KV pages of one request never affect another: with every page of an idle engine (page 0 included)
filled with NaN/+Inf/-Inf, as a request whose activations overflowed or stale data would leave
them, later requests give the same tokens and logprobs as on a clean cache, on every attention
backend, in prefill-first and chunked scheduling, and across a disaggregated KV pull."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.placement import InstanceSpec, Placement
from tests.engine.engine_checks import assert_engine_empty, worker

KW = dict(max_model_len=64, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)
CHUNKED_KW = dict(KW, max_num_batched_tokens=16)  # prompts past 16 tokens run as chunks with paged context


def _poison(runner, seed: int) -> None:
    """Every page of every layer of `runner` set to NaN, +Inf or -Inf (per slot), in place of the arrays."""
    rng = np.random.default_rng(seed)
    for st in runner.stages:
        new = []
        for k, v in st.pages:
            fills = []
            for x in (k, v):
                pattern = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=x.shape[1:3])
                full = np.broadcast_to(pattern[None, :, :, None], x.shape).astype(np.dtype(x.dtype))
                fills.append(jax.device_put(jnp.asarray(full), x.sharding))
            new.append(tuple(fills))
        st.pages = tuple(new)


def _run(llm: LLM, prompts, params):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.token_ids for o in outs], [[max(e.values()) for e in o.logprobs] for o in outs]


def _prompts(seed: int):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 256, n)] for n in (5, 30)]


PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)


def _check_isolated(llm: LLM, runners, seed: int):
    prompts = _prompts(seed)
    want_tokens, want_lps = _run(llm, prompts, PARAMS)
    for i, runner in enumerate(runners):
        _poison(runner, seed + i)
    got_tokens, got_lps = _run(llm, prompts, PARAMS)
    assert got_tokens == want_tokens
    assert np.isfinite(np.array(sum(got_lps, []))).all()
    np.testing.assert_allclose(np.array(sum(got_lps, [])), np.array(sum(want_lps, [])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,mode", [
    ("reference", "colocated"), ("xla", "colocated"), ("native", "colocated"), ("pallas_interpret", "colocated"),
    ("native", "chunked"), ("pallas_interpret", "chunked")])  # chunked prefill runs the reference on CPU
def test_stale_nan_pages_do_not_reach_later_requests(make_llm, backend, mode):
    kw = CHUNKED_KW if mode == "chunked" else KW
    llm = make_llm("llama3", attention_backend=backend, mode=mode, **kw)
    _check_isolated(llm, [worker(llm.engine).runner], seed=len(backend) + len(mode))


def test_stale_nan_pages_do_not_cross_a_disaggregated_pull(hf_checkpoint):
    placement = Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=2),))
    llm = LLM(str(hf_checkpoint("llama3")), mode="disaggregated", placement=placement, **KW)
    _check_isolated(llm, [w.runner for w in llm.engine.executor.workers.values()], seed=3)
    assert_engine_empty(llm.engine)
    llm.engine.shutdown()

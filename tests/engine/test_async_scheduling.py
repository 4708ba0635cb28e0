"""Launching step N+1 before fetching step N (`async_scheduling`) changes no output.

Against an engine that runs one step at a time, on the same checkpoint: greedy and seeded
sampling, stop tokens (rows discarded after a request stops), max_tokens, logprobs, penalties
(which run one step at a time), preemption under a tiny cache, and aborting a request while a
step that holds it is in flight. Also the runner's on-device token feed on its own.
"""

import numpy as np
import pytest

from distserve_jax import LLM, SamplingParams
from distserve_jax.engine.placement import InstanceSpec, Placement
from distserve_jax.runtime.model_runner import SeqWork
from tests.engine.engine_checks import assert_engine_empty, worker
from tests.tolerances import LOGIT_PARITY_ATOL, assert_clear_greedy_margins


def _prompts(n, seed, lo=4, hi=40, vocab=256):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, int(rng.integers(lo, hi)))] for _ in range(n)]


def _count_fed_rows(w) -> list[int]:
    """Wraps a worker's runner's launch; the returned list fills with each launch's number of fed rows."""
    counts, launch = [], w.runner.launch

    def counting(works, prev=None):
        counts.append(sum(w.prev_row is not None for w in works))
        return launch(works, prev)

    w.runner.launch = counting
    return counts


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    """Greedy requests without penalties ask for two logprobs, so that `_assert_no_near_ties` can
    check their reference steps; the sampled and penalised ones are the rows without them."""
    return [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token], logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=12, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_token], logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=1.3, frequency_penalty=0.2),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2),
    ]


def _assert_no_near_ties(ref, params) -> None:
    """Launching ahead batches rows differently, so logits round differently (observed <= 4e-6):
    the compared greedy tokens must not sit on a near tie in the reference."""
    assert_clear_greedy_margins([r.logprobs for r, p in zip(ref, params) if p.logprobs == 2],
                                what="one-step-at-a-time reference")


def _assert_same_outputs(got, ref):
    for g, r in zip(got, ref):
        assert (g.token_ids, g.finish_reason, g.text) == (r.token_ids, r.finish_reason, r.text)
        if r.logprobs is not None:
            for a, b in zip(g.logprobs, r.logprobs):
                assert a.keys() == b.keys()
                # Launching ahead batches rows differently (rows of stopped requests ride along),
                # so the GEMMs may round differently: logit - logsumexp within the logit bound
                # (observed <= 4.1e-6; a row fed the wrong token is O(1) off).
                np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], atol=LOGIT_PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("mode,num_blocks", [("colocated", 96), ("colocated", 9), ("chunked", 96)])
def test_launching_ahead_gives_the_same_outputs(make_llm, mode, num_blocks):
    prompts = _prompts(8, seed=5)
    sync = make_llm("llama2", mode=mode, num_blocks=num_blocks, async_scheduling=False)
    ahead = make_llm("llama2", mode=mode, num_blocks=num_blocks)
    # A stop token that the greedy continuation of prompt 1 produces some tokens in (after the
    # penalised request, which turns launching ahead off while it runs, has ended).
    free = sync.generate(prompt_token_ids=[prompts[1]], sampling_params=SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    params = _mixed_params(free.token_ids[9])
    ref = sync.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _assert_no_near_ties(ref, params)
    fed = _count_fed_rows(worker(ahead.engine))
    discarded = ahead.engine.num_discarded_rows
    got = ahead.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _assert_same_outputs(got, ref)
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) <= 10
    assert sum(fed) > 0, "no step was fed tokens on the device"
    assert ahead.engine.num_discarded_rows > discarded, "no row was computed after its request stopped"
    if num_blocks < 20:
        assert sum(o.metrics["num_preemptions"] for o in got) > 0, "nothing was preempted"


def test_disaggregated_decode_launching_ahead_gives_the_same_outputs(make_llm, hf_checkpoint):
    prompts = _prompts(8, seed=6)
    ref_llm = make_llm("llama2", async_scheduling=False)
    free = ref_llm.generate(prompt_token_ids=[prompts[1]], sampling_params=SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    params = _mixed_params(free.token_ids[9])
    ref = ref_llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _assert_no_near_ties(ref, params)
    # A small cache (6 usable blocks) so that decoding preempts, and requests go back to prefill.
    placement = Placement((InstanceSpec(tp=1),), (InstanceSpec(tp=1),))
    llm = LLM(str(hf_checkpoint("llama2")), placement=placement, max_model_len=256, num_blocks=7,
              max_num_seqs=8, max_num_batched_tokens=256)
    core = llm.engine
    fed = _count_fed_rows(worker(core, "decode-0"))
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _assert_same_outputs(got, ref)
    assert sum(fed) > 0 and core.num_discarded_rows > 0
    assert sum(o.metrics["num_preemptions"] for o in got) > 0, "nothing was preempted"
    assert_engine_empty(core)
    core.shutdown()


def test_abort_while_a_step_is_in_flight_leaves_a_clean_cache(make_llm):
    sync = make_llm("llama2", async_scheduling=False)
    ahead = make_llm("llama2", start_workers=False)  # one worker turn per step(): deterministic
    eng = ahead.engine
    w = worker(eng)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    eng.add_request("doomed", prompt_token_ids=_prompts(1, seed=9, lo=30, hi=31)[0], params=long)
    for _ in range(3):
        eng.step()
    assert w.inflight is not None and w.blocks.num_used > 0
    out = eng.abort_request("doomed")
    assert out.finish_reason == "abort" and len(out.token_ids) == 3
    eng.quiesce()  # the worker applies the abort
    assert w.blocks.num_used == 0
    # The freed blocks go to new requests; the step still in flight must not disturb them.
    prompts = _prompts(3, seed=10, lo=20, hi=40)
    ref = sync.generate(prompt_token_ids=prompts, sampling_params=long, use_tqdm=False)
    got = ahead.generate(prompt_token_ids=prompts, sampling_params=long, use_tqdm=False)
    _assert_same_outputs(got, ref)


def test_runner_feeds_the_previous_steps_tokens_on_the_device(make_llm):
    runner = worker(make_llm("llama2", async_scheduling=False).engine).runner
    greedy = SamplingParams(temperature=0.0, logprobs=1)
    prompts = _prompts(2, seed=12, lo=10, hi=30)
    tables = [[1, 2, 3], [4, 5, 6]]

    def prefill():
        return [SeqWork(p, 0, t, greedy) for p, t in zip(prompts, tables)]

    def decode(tokens, prev_rows):
        return [SeqWork([tok], len(p), t, greedy, num_generated=1, prev_row=row)
                for p, t, tok, row in zip(prompts, tables, tokens, prev_rows)]

    first = runner.execute(prefill())
    host = runner.execute(decode([r.token_id for r in first], [None, None]))
    pending = runner.launch(prefill())
    # Rows swapped on purpose: item i reads row i of the previous step whatever its own index.
    fed = runner.launch(decode([0, 0], [0, 1])[::-1], prev=pending)
    assert [r.token_id for r in runner.collect(pending)] == [r.token_id for r in first]
    got = runner.collect(fed)[::-1]
    assert [r.token_id for r in got] == [r.token_id for r in host]
    # The same two rows, swapped, through the same executable: a row's arithmetic does not depend
    # on its position (observed 0.0); 1e-6 is a few ulps of these logprobs, slack for the last bit.
    np.testing.assert_allclose([r.logprob for r in got], [r.logprob for r in host], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="no previous step"):
        runner.launch(decode([0, 0], [0, 1]))
    with pytest.raises(ValueError, match="prev_row=2 is not a sampled row"):
        runner.launch(decode([0, 0], [0, 2]), prev=runner.launch(prefill()))

"""Seeds, stop conditions, logprobs and bad input through the whole engine."""

import numpy as np
import pytest

from distserve_jax import SamplingParams
from tests.engine.engine_checks import worker
from tests.tolerances import assert_clear_greedy_margins


def _ids(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(4, 256, n)]


def test_same_seed_same_output_whatever_the_batch(make_llm):
    llm = make_llm("llama2")
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[_ids(9, 0)], sampling_params=p, use_tqdm=False)[0].token_ids
    others = [_ids(n, 10 + n) for n in (3, 30, 12)]
    batch = llm.generate(prompt_token_ids=others[:2] + [_ids(9, 0)] + others[2:],
                         sampling_params=[SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)] * 2
                         + [p] + [SamplingParams(temperature=0.7, max_tokens=5, ignore_eos=True)],
                         use_tqdm=False)
    assert batch[2].token_ids == alone
    other_seed = llm.generate(prompt_token_ids=[_ids(9, 0)], sampling_params=SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=99, ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.token_ids != alone


def test_stop_token_ids_and_eos(make_llm):
    llm = make_llm("llama2")
    prompt = _ids(10, 1)
    free = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    # EOS is honoured unless ignore_eos: make the engine treat that token as EOS.
    eng = llm.engine
    saved = eng.outputs.eos
    eng.outputs.eos = {stop_at}
    try:
        eos = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20),
                           use_tqdm=False)[0]
        ignored = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    finally:
        eng.outputs.eos = saved
    assert eos.token_ids == free[:first + 1] and eos.finish_reason == "stop"
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_stop_strings_cut_the_text(make_llm):
    llm = make_llm("llama2")
    prompt = "Hello there"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    assert len(free.text) >= 6, free.text
    stop = free.text[3:5]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert stop not in out.text
    incl = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0]
    assert incl.text == free.text[:free.text.index(stop) + len(stop)]


def test_streamed_text_never_passes_a_stop_string(make_llm):
    llm = make_llm("llama2")
    eng = llm.engine
    free = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    stop = free.text[6:9]
    eng.add_request("stream", prompt="abc", params=SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    deltas = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            deltas.append(o.text_delta)
            assert stop not in "".join(deltas)
    assert "".join(deltas) == free.text[:free.text.index(stop)]


def test_max_tokens_and_logprobs(make_llm):
    llm = make_llm("llama2")
    out = llm.generate(prompt_token_ids=[_ids(7, 2)], sampling_params=SamplingParams(
        temperature=0.8, seed=3, max_tokens=9, logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    assert len(out.logprobs) == 9
    for t, lp in zip(out.token_ids, out.logprobs):
        assert t in lp and len(lp) >= 3
        assert all(v <= 0 for v in lp.values())
    one = llm.generate(prompt_token_ids=[_ids(7, 2)], sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(one[0].token_ids) == 1


def test_generation_stops_at_the_context_length(make_llm):
    llm = make_llm("llama2", max_model_len=48, num_blocks=16)
    out = llm.generate(prompt_token_ids=[_ids(40, 3)], sampling_params=SamplingParams(
        temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-1), "seed"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(make_llm):
    llm = make_llm("llama2")
    ok = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([""], ok, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=ok, use_tqdm=False)
    with pytest.raises(ValueError, match="longer than the model's context"):
        llm.generate(prompt_token_ids=[_ids(300, 4)], sampling_params=ok, use_tqdm=False)
    with pytest.raises(ValueError, match="token id 100000 outside the vocabulary"):
        llm.generate(prompt_token_ids=[[5, 100000]], sampling_params=ok, use_tqdm=False)
    with pytest.raises(ValueError, match="token id -1 outside the vocabulary"):
        llm.generate(prompt_token_ids=[[5, -1]], sampling_params=ok, use_tqdm=False)
    # A bad prompt in a batch rejects the batch before anything is queued.
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate(prompt_token_ids=[[5, 6], []], sampling_params=ok, use_tqdm=False)
    # Mid-stream: a bad request next to a running one does not disturb it (workers stepped one
    # turn per step(), so "good" is still running when the bad ones come).
    eng = make_llm("llama2", start_workers=False).engine
    eng.add_request("good", prompt_token_ids=_ids(6, 5), params=ok)
    eng.step()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("bad", prompt_token_ids=[999999], params=ok)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("good", prompt_token_ids=[5], params=ok)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "good" and len(outs[-1].token_ids) == 4


def test_abort_frees_blocks_at_every_stage(make_llm):
    llm = make_llm("llama2", start_workers=False)  # one worker turn per step()
    eng = llm.engine
    blocks = worker(eng).blocks
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    eng.add_request("queued", prompt_token_ids=_ids(5, 6), params=p)
    assert eng.abort_request("queued").finish_reason == "abort"
    eng.add_request("running", prompt_token_ids=_ids(5, 7), params=p)
    eng.step()
    eng.step()
    assert blocks.num_used > 0
    out = eng.abort_request("running")
    assert out.finish_reason == "abort" and len(out.token_ids) >= 1
    assert eng.abort_request("running") is None
    eng.quiesce()  # the worker applies the abort
    assert blocks.num_used == 0


def test_repetition_penalty_matches_transformers(make_llm, hf_checkpoint):
    import torch
    import transformers

    d = hf_checkpoint("llama2")
    prompt = _ids(12, 9)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        gen = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=24, min_new_tokens=24, eos_token_id=None,
                             repetition_penalty=1.5, output_scores=True, return_dict_in_generate=True)
    ref = gen.sequences[0, len(prompt):].tolist()
    # transformers and JAX sum in other orders: the penalised scores must not have a near tie.
    assert_clear_greedy_margins([[float(g[0] - g[1]) for g in (torch.topk(sc[0], 2).values for sc in gen.scores)]],
                                what="transformers with repetition_penalty")
    llm = make_llm("llama2")
    plain = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0].token_ids
    got = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5), use_tqdm=False)[0].token_ids
    assert got == ref
    assert got != plain, "the penalty changed nothing, so the test proves nothing"

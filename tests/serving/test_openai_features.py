"""OpenAI completions features that clients and evaluation harnesses rely on, against the real server:
echo with logprobs (how lm-eval's `local-completions` scores log-likelihoods) equal to the engine's
teacher-forced logprobs and to transformers, text_offset, n > 1 (seeded choices), several prompts
per request, refused parameters, and the context-overflow policy (truncation with finish_reason
"length", the same on gRPC and HTTP)."""

import json

import numpy as np
import openai
import pytest

from serving.client import Client
from tests.serving.conftest import ENGINE_KW, post, wait_all_free

MODEL = "tiny-llama"


@pytest.fixture(autouse=True)
def all_blocks_free_after_test(server):
    yield
    wait_all_free(server.address)


def test_n_choices_are_seeded_independent_requests(server, oai):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    r = oai.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == oai.completions.create(
        **dict(kw, max_tokens=1)).usage.prompt_tokens
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1, texts  # different seeds, different samples
    # choice i is the request with seed + i
    for i in range(3):
        one = oai.completions.create(**dict(kw, seed=1234 + i))
        assert one.choices[0].text == texts[i]
    again = oai.completions.create(n=3, **kw)
    assert [c.text for c in again.choices] == texts
    # streaming: the same choices, interleaved by index
    chunks = list(oai.completions.create(n=3, stream=True, **kw))
    by_index = {i: "" for i in range(3)}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] += c.text
    assert [by_index[i] for i in range(3)] == texts


def test_n_null_is_the_default_and_best_of_is_refused(server, oai):
    status, data = post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": None, "best_of": None}).encode())
    assert status == 200 and len(json.loads(data)["choices"]) == 1
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=3)
    assert err.value.body["param"] == "best_of"
    ok = oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2, best_of=2)
    assert len(ok.choices) == 2
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=0)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # more choices than the server runs at once
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=50)
    assert err.value.body["param"] == "n"
    for field, value in (("suffix", "tail"), ("logit_bias", {"5": 10})):
        with pytest.raises(openai.BadRequestError) as err:
            oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, **{field: value})
        assert err.value.body["param"] == field and "not supported" in err.value.body["message"]


def test_chat_n_and_several_prompts(server, oai):
    msgs = [{"role": "user", "content": "Tell me"}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=2, seed=5, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.role == "assistant" for c in r.choices)
    prompts = ["first prompt", "second one"]
    batch = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for p, i in ((prompts[0], 0), (prompts[1], 2)):
        alone = oai.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
        assert batch.choices[i].text == batch.choices[i + 1].text == alone.choices[0].text


def test_one_refused_choice_refuses_the_request_and_frees_the_others(server):
    body = {"model": MODEL, "prompt": ["fine", "z" * 200], "max_tokens": 30, "ignore_eos": True}
    status, data = post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 400 and "max_model_len" in json.loads(data)["error"]["message"]
    # the admitted choice was aborted: nothing is held (checked by the autouse fixture)


def test_context_overflow_truncates_with_length_on_both_fronts(server, oai):
    max_len = ENGINE_KW["max_model_len"]
    prompt = [1] + [40 + i % 50 for i in range(max_len - 5)]  # leaves 4 positions
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == max_len - len(prompt)
    with Client(server.address) as c:
        g = c.generate(prompt_token_ids=prompt, sampling={"temperature": 0.0, "max_tokens": 100, "ignore_eos": True})
    assert g.finish_reason == "length" and len(g.token_ids) == max_len - len(prompt)
    assert g.text == r.choices[0].text
    # a prompt longer than the context is refused on both
    too_long = prompt + [5] * 10
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    assert "max_model_len" in err.value.body["message"]


def _lm_eval_payload(prompt_ids, max_tokens=1):
    """What lm-eval's local-completions sends to score a continuation (tokenized requests)."""
    return {"model": MODEL, "prompt": [prompt_ids], "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
            "seed": 1234, "echo": True}


def test_echo_logprobs_are_the_engines_teacher_forced_logprobs(server, tiny_model):
    from tests.hf_checkpoints import hf_prefill_logits
    context = [1] + [40 + (7 * i) % 90 for i in range(11)]
    with Client(server.address) as c:  # the engine's own logprobs of the tokens it generates
        gen = c.generate(prompt_token_ids=context, sampling={"temperature": 0.0, "max_tokens": 6, "logprobs": 1,
                                                               "ignore_eos": True})
        msgs = list(c.stream(prompt_token_ids=context, sampling={"temperature": 0.0, "max_tokens": 6, "logprobs": 1,
                                                                  "ignore_eos": True}))
    decode_lps = [lp.logprob for m in msgs for lp in m.logprobs]
    full = context + gen.token_ids
    status, data = post(server, "/v1/completions", json.dumps(_lm_eval_payload(full)).encode())
    assert status == 200, data[:300]
    choice = json.loads(data)["choices"][0]
    lp = choice["logprobs"]
    n = len(full) + 1  # the prompt, then the one generated token
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # lm-eval sums token_logprobs[ctxlen:-1]: the continuation's logprobs under the prompt
    cont = lp["token_logprobs"][len(context):-1]
    np.testing.assert_allclose(cont, decode_lps, rtol=1e-5, atol=1e-5)
    for tok, top in zip(lp["tokens"][len(context):-1], lp["top_logprobs"][len(context):-1]):
        assert max(top, key=top.get) == tok  # greedy: is_greedy holds
    # and transformers agrees at every prompt position
    logits = hf_prefill_logits(tiny_model, full).astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    want = [ref[i - 1, full[i]] for i in range(1, len(full))]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(full)], want, atol=2e-4)
    from distserve_jax.models.tokenizer import load_tokenizer
    assert choice["text"].startswith(load_tokenizer(tiny_model).decode(full, skip_special_tokens=False))
    # text_offset: each token's position in the returned text (vLLM's rule: cumulative token strings)
    assert lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))


def test_echo_max_tokens_zero_scores_the_prompt_only(server):
    ids = [1] + [50 + i for i in range(9)]
    status, data = post(server, "/v1/completions", json.dumps(_lm_eval_payload(ids, max_tokens=0)).encode())
    assert status == 200, data[:300]
    body = json.loads(data)
    choice = body["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    with_one = json.loads(post(server, "/v1/completions", json.dumps(_lm_eval_payload(ids)).encode())[1])
    assert with_one["choices"][0]["logprobs"]["token_logprobs"][:len(ids)] == choice["logprobs"]["token_logprobs"]
    status, data = post(server, "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": ids, "max_tokens": 0}).encode())  # without echo there is nothing to return
    assert status == 400 and json.loads(data)["error"]["param"] == "max_tokens"


def test_echo_text_streaming_and_text_offset(server, oai):
    r = oai.completions.create(model=MODEL, prompt="Echo this", max_tokens=5, temperature=0, echo=True,
                               logprobs=2)
    plain = oai.completions.create(model=MODEL, prompt="Echo this", max_tokens=5, temperature=0, logprobs=2)
    c, p = r.choices[0], plain.choices[0]
    assert c.text == "Echo this" + p.text
    assert c.logprobs.token_logprobs[-5:] == pytest.approx(p.logprobs.token_logprobs, abs=1e-5)
    assert p.logprobs.text_offset[0] == 0 and len(p.logprobs.text_offset) == len(p.logprobs.tokens)
    assert all(b - a == len(t) for a, b, t in zip(p.logprobs.text_offset, p.logprobs.text_offset[1:],
                                                  p.logprobs.tokens))
    chunks = list(oai.completions.create(model=MODEL, prompt="Echo this", max_tokens=5, temperature=0,
                                         echo=True, logprobs=2, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = sum((ch.choices[0].logprobs.token_logprobs for ch in chunks if ch.choices[0].logprobs), [])
    assert streamed[0] is None and streamed[1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-5)
    offsets = sum((ch.choices[0].logprobs.text_offset for ch in chunks if ch.choices[0].logprobs), [])
    assert offsets == c.logprobs.text_offset


def test_grpc_prompt_logprobs_agree_with_http_echo(server):
    ids = [1] + [60 + 3 * i for i in range(8)]
    with Client(server.address) as c:
        msgs = list(c.stream(prompt_token_ids=ids, sampling={"temperature": 0.0, "max_tokens": 3, "ignore_eos": True,
                                                              "prompt_logprobs": 2}))
    plp = msgs[0].prompt_logprobs
    assert [p.token_id for p in plp] == ids[1:] and all(len(p.top_logprobs) >= 2 for p in plp)
    assert not any(m.prompt_logprobs for m in msgs[1:])
    http = json.loads(post(server, "/v1/completions", json.dumps(_lm_eval_payload(ids, max_tokens=0)).encode())[1])
    np.testing.assert_allclose([p.logprob for p in plp], http["choices"][0]["logprobs"]["token_logprobs"][1:],
                               rtol=1e-6, atol=1e-6)

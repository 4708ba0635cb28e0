"""OpenAI completions features that clients and evaluation harnesses rely on, against the real server:
n > 1 (seeded choices), several prompts per request, refused parameters, and the context-overflow
policy (truncation with finish_reason "length", the same on gRPC and HTTP)."""

import json

import openai
import pytest

from serving.client import Client
from tests.serving.conftest import ENGINE_KW, wait_all_free
from tests.serving.test_fuzz_http import post

MODEL = "tiny-llama"


@pytest.fixture(autouse=True)
def all_blocks_free_after_test(server):
    yield
    wait_all_free(server.address)


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


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

"""The OpenAI-compatible HTTP front against the real server, through the official `openai` client."""

import asyncio
import json
import re

import aiohttp
import openai
import pytest

from serving.chat import plain_chat_prompt, render_chat
from serving.client import Client
from tests.serving.conftest import CHAT_TEMPLATE, MAX_QUEUE, MAX_REQUEST_BYTES, wait_all_free

MODEL = "tiny-llama"


@pytest.fixture(autouse=True)
def no_resources_held_after_test(server):
    yield
    wait_all_free(server.address)


def test_models_and_health(server, oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    import urllib.request
    with urllib.request.urlopen(server.http + "/health") as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_completions_match_grpc_streaming_and_not(server, oai):
    with Client(server.address) as c:
        ref = c.generate("Once upon", sampling={"temperature": 0.0, "max_tokens": 10})
    r = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == ref.prompt_tokens
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    by_ids = oai.completions.create(model=MODEL, prompt=[1, 40, 41, 42], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 4 and by_ids.usage.completion_tokens >= 1


def test_chat_uses_the_template_streaming_and_not(server, oai, tiny_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    from distserve_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model)
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = render_chat(messages, tok)
    assert prompt == "<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>"
    ref = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.choices[0].text
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.choices[0].text
    assert chunks[-1].choices[0].finish_reason == ref.choices[0].finish_reason


def test_plain_chat_format_without_template():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}]
    assert render_chat(msgs, None) == "user: Hello!\nassistant:"
    assert plain_chat_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == \
        "system: s\nuser: u\nassistant:"


BAD_HTTP = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("too long", dict(prompt="z" * 100), "max_model_len"),
    ("token id outside vocab", dict(prompt=[1, 99999]), "prompt_token_ids"),
    ("bad temperature", dict(prompt="hi", temperature=-2), "temperature"),
    ("bad top_p", dict(prompt="hi", top_p=1.5), "top_p"),
    ("bad max_tokens", dict(prompt="hi", max_tokens=0), "max_tokens"),
    ("unknown model", dict(prompt="hi", model="gpt-9"), "model"),
    ("oversized body", dict(prompt="q" * (MAX_REQUEST_BYTES + 100)), "max_request_bytes"),
]


@pytest.mark.parametrize("case,kwargs,field", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_input_is_400(server, oai, case, kwargs, field):
    kw = dict(model=MODEL, max_tokens=4)
    kw.update(kwargs)
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(**kw)
    assert err.value.status_code == 400
    assert field in err.value.body["message"], (case, err.value.body)
    r = oai.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_chat_messages_and_json(server, oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    assert "role" in err.value.body["message"]

    async def raw():
        async with aiohttp.ClientSession() as s:
            async with s.post(server.http + "/v1/completions", data=b"{not json") as r:
                return r.status, await r.json()

    status, body = asyncio.run(raw())
    assert status == 400 and "JSON" in body["error"]["message"]


def test_overload_is_429(server):
    async def one(s, i):
        body = {"model": MODEL, "prompt": f"load {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        async with s.post(server.http + "/v1/completions", json=body) as r:
            return r.status, await r.json()

    async def run():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*[one(s, i) for i in range(3 * MAX_QUEUE)])

    results = asyncio.run(run())
    statuses = [st for st, _ in results]
    assert statuses.count(429) >= 2 * MAX_QUEUE - 1 and set(statuses) <= {200, 429}, statuses
    for st, body in results:
        if st == 200:
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 24
        else:
            assert body["error"]["type"] == "rate_limit_error"


def test_http_stream_disconnect_frees_resources(server):
    async def run():
        body = {"model": MODEL, "prompt": "stream then leave", "max_tokens": 40, "ignore_eos": True,
                "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(server.http + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()
                await r.content.readline()
                with Client(server.address) as c:
                    busy = c.server_info()
                r.close()  # drop the connection mid-stream
        return busy

    busy = asyncio.run(run())
    assert busy.num_in_flight == 1
    wait_all_free(server.address)


def test_metrics_endpoint(server, oai):
    oai.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    import urllib.request
    with urllib.request.urlopen(server.http + "/metrics") as r:
        text = r.read().decode()

    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+-]+)", text)
        assert m, pattern
        return float(m.group(1))

    assert value(r"distserve_ttft_seconds_count") >= 1
    assert value(r"distserve_tpot_seconds_count") >= 1
    assert value(r"distserve_e2e_seconds_count") >= 1
    assert value(r'distserve_requests_finished_total\{finish_reason="length"\}') >= 1
    assert value(r'distserve_kv_cache_utilisation\{instance="colocated-0",role="both"\}') == 0.0
    assert value(r'distserve_queue_length\{instance="colocated-0",role="both"\}') == 0.0
    assert value(r'distserve_slo_attainment\{slo="loose"\}') == 1.0
    assert value(r'distserve_slo_attainment\{slo="tight"\}') == 0.0
    assert "distserve_migration_seconds" in text and "distserve_migration_bytes_total" in text

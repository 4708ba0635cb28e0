"""Property-based fuzzing of the OpenAI HTTP front (hypothesis, derandomized and bounded): JSON values
of every type in every field (nested ones included), invalid Unicode, deep nesting and oversized
bodies. Every response is a 2xx or a 4xx with an OpenAI error naming a field (never a 5xx), every
stream ends with `data: [DONE]` and no error event, and afterwards every KV block is free."""

import http.client
import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.client import Client
from tests.serving.conftest import MAX_REQUEST_BYTES, post, wait_all_free

MODEL = "tiny-llama"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BASE_COMPLETION = {"model": MODEL, "prompt": "fuzz me", "max_tokens": 2, "temperature": 0}
BASE_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
             "max_tokens": 2}
# Paths the fuzzer overwrites: every known top-level field, and the nested ones.
TOP_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
              "min_p", "n", "best_of", "seed", "stop", "stop_token_ids", "ignore_eos", "stream", "stream_options",
              "logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "include_stop_str_in_output", "suffix", "logit_bias", "user", "response_format", "tools",
              "tool_choice", "prompt_logprobs"]
NESTED = [("stream_options", "include_usage"), ("messages", 0, "role"), ("messages", 0, "content"),
          ("messages", 0, "content", 0, "type"), ("messages", 0, "content", 0, "text"), ("response_format", "type")]

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                    max_leaves=6)


@pytest.fixture(autouse=True)
def all_blocks_free_after_test(server):
    yield
    wait_all_free(server.address)


def check_response(status: int, data: bytes, fields: set[str]) -> None:
    """A 2xx (a whole JSON response or SSE stream) or a 4xx OpenAI error that names one of `fields`."""
    assert status < 500, (status, data[:500])
    if status >= 400:
        err = json.loads(data)["error"]
        assert err["code"] == status and err["message"], err
        if fields:
            assert err["param"] in fields or any(f in err["message"] for f in fields), (fields, err)
        return
    assert status == 200
    if data.startswith(b"data: "):
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for e in events[:-1]:
            chunk = json.loads(e[len("data: "):])
            assert "error" not in chunk, chunk
            assert "choices" in chunk
    else:
        body = json.loads(data)
        assert body["choices"] and all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


def set_path(body: dict, path: tuple, value) -> None:
    """Sets `body[path]` (int keys: the first list element), creating the containers on the way."""
    node = body
    for key, nxt in zip(path[:-1], path[1:]):
        if isinstance(key, int):
            if not isinstance(node, list) or not node:
                return
            node = node[0]
        elif isinstance(node, dict):
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {} if isinstance(nxt, str) else [{}]
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(last, int) and isinstance(node, list) and node:
        node[0] = value
    elif isinstance(last, str) and isinstance(node, dict):
        node[last] = value


MUTATION = st.one_of(st.tuples(st.sampled_from(TOP_FIELDS).map(lambda f: (f,)), JSON),
                     st.tuples(st.sampled_from(NESTED), JSON),
                     st.tuples(st.sampled_from(TOP_FIELDS).map(lambda f: ("del", f)), st.none()))


@FUZZ
@given(chat=st.booleans(), mutations=st.lists(MUTATION, min_size=1, max_size=3), stream=st.booleans())
def test_json_values_of_any_type_in_any_field(server, chat, mutations, stream):
    body = json.loads(json.dumps(BASE_CHAT if chat else BASE_COMPLETION))
    if stream:
        body["stream"] = True
    fields = set()
    for path, value in mutations:
        if path[0] == "del":
            body.pop(path[1], None)
            fields.add(path[1])
        else:
            set_path(body, path, value)
            fields.add(path[0])
    status, data = post(server, "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode())
    check_response(status, data, fields)


@FUZZ
@given(text=TEXT, where=st.sampled_from(["prompt", "prompt_list", "chat", "stop", "model", "key"]))
def test_text_that_is_not_valid_unicode(server, text, where):
    text = "x" + text  # never empty
    if where == "chat":
        body = dict(BASE_CHAT, messages=[{"role": "user", "content": text}])
        path = "/v1/chat/completions"
    else:
        body = dict(BASE_COMPLETION)
        path = "/v1/completions"
        if where == "prompt":
            body["prompt"] = text
        elif where == "prompt_list":
            body["prompt"] = ["ok", text]
        elif where == "stop":
            body["stop"] = [text]
        elif where == "model":
            body["model"] = text
        else:
            body["metadata"] = {text: 1}
    status, data = post(server, path, json.dumps(body).encode())  # ensure_ascii: surrogates as \ud800
    lone = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    expect = {"chat": "messages", "prompt_list": "prompt"}.get(where, where if where != "key" else "metadata")
    if lone:
        assert status == 400, (status, data[:300])
        err = json.loads(data)["error"]
        assert "not valid Unicode" in err["message"] and expect in err["message"], err
    else:
        check_response(status, data, {expect})


@pytest.mark.parametrize("depth", [40, 1000, 30000])
@pytest.mark.parametrize("shape", ["array", "object", "in_prompt"])
def test_deeply_nested_json_is_400(server, depth, shape):
    if shape == "array":
        raw = "[" * depth + "]" * depth
    elif shape == "object":
        raw = '{"a":' * depth + "1" + "}" * depth
    else:
        raw = '{"model": "%s", "prompt": %s}' % (MODEL, "[" * depth + "1" + "]" * depth)
    status, data = post(server, "/v1/completions", raw.encode())
    assert status == 400, (status, data[:200])
    err = json.loads(data)["error"]
    assert any(w in err["message"] for w in ("nested", "JSON object", "prompt")), err


def test_sizes_bad_bytes_and_chunked_bodies(server):
    cases = [
        (json.dumps(dict(BASE_COMPLETION, prompt="q" * (MAX_REQUEST_BYTES + 10))).encode(), "max_request_bytes"),
        (json.dumps(dict(BASE_COMPLETION, prompt="q" * (3 * MAX_REQUEST_BYTES))).encode(), "max_request_bytes"),
        (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', "JSON"),
        (b"\x00\x01\x02", "JSON"),
        (b"", "JSON"),
        (b'{"model": "tiny-llama", "max_tokens": 1' + b"1" * 5000 + b"}", "JSON"),  # too many digits for int()
        (b"[1, 2]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (json.dumps(dict(BASE_COMPLETION, prompt=list(range(1, 200)))).encode(), "max_model_len"),
    ]
    for raw, word in cases:
        status, data = post(server, "/v1/completions", raw)
        assert status == 400, (raw[:60], status, data[:200])
        assert word in json.loads(data)["error"]["message"], (raw[:60], data[:300])

    # a body without Content-Length, chunked, over the limit
    url = urllib.parse.urlparse(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    big = json.dumps(dict(BASE_COMPLETION, prompt="c" * (4 * MAX_REQUEST_BYTES))).encode()
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    assert status == 400 and "max_request_bytes" in json.loads(data)["error"]["message"], (status, data[:200])

    with Client(server.address) as c:  # still serving
        ok = c.generate("still here", sampling={"temperature": 0.0, "max_tokens": 2})
    assert ok.finish_reason in ("stop", "length")


def test_stream_options_of_the_wrong_type_is_400_not_a_broken_stream(server):
    for options in ("x", 1, [], {"include_usage": "yes"}):
        body = dict(BASE_COMPLETION, stream=True, stream_options=options)
        status, data = post(server, "/v1/completions", json.dumps(body).encode())
        assert status == 400, (options, status, data[:200])
        assert json.loads(data)["error"]["param"] == "stream_options"

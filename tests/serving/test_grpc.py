"""gRPC API against a real server process: parity with the offline LLM, bad input, overload,
disconnects, abort, server info, health and reflection."""

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.client import AsyncClient, Client
from tests.serving.conftest import ENGINE_KW, MAX_QUEUE, MAX_REQUEST_BYTES, wait_all_free
from tests.tolerances import assert_clear_greedy_margins

PROMPTS = ["Hello, world", "The quick brown fox jumps", "a"]
TOKEN_PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(autouse=True)
def no_resources_held_after_test(server):
    yield
    wait_all_free(server.address)


def test_streamed_tokens_equal_offline_llm(server, tiny_model):
    from distserve_jax import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    llm = LLM(tiny_model, **ENGINE_KW)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    expected = [o.token_ids for o in outs]
    expected_ids = llm.generate(prompt_token_ids=[TOKEN_PROMPT], sampling_params=params, use_tqdm=False)[0]
    # The server batches the four requests together, the offline runs did not: no near tie.
    assert_clear_greedy_margins([o.logprobs for o in outs] + [expected_ids.logprobs], what="offline reference")

    async def run():
        async with AsyncClient(server.address) as c:
            sampling = {"temperature": 0.0, "max_tokens": 12}
            texts = [c.generate(p, sampling=sampling) for p in PROMPTS]
            ids = c.generate(prompt_token_ids=TOKEN_PROMPT, sampling=sampling)
            return await asyncio.gather(*texts, ids)

    *results, from_ids = asyncio.run(run())
    for res, exp in zip(results, expected):
        assert res.token_ids == exp
        assert res.completion_tokens == len(exp)
        assert res.finish_reason in ("stop", "length")
        assert res.timing["ttft_s"] > 0 and res.timing["e2e_s"] >= res.timing["ttft_s"]
        assert res.timing["queueing_s"] >= 0 and res.timing["prefill_s"] > 0
        assert len(res.token_times) == len(exp)
    assert from_ids.token_ids == expected_ids.token_ids
    assert from_ids.text == expected_ids.text
    assert from_ids.prompt_tokens == len(TOKEN_PROMPT)


BAD_INPUTS = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("prompt longer than the context", dict(prompt="x" * 100), "max_model_len"),
    ("token id outside the vocabulary", dict(prompt_token_ids=[1, 5, 100000]), "prompt_token_ids"),
    ("negative token id", dict(prompt_token_ids=[1, -3]), "prompt_token_ids"),
    ("negative temperature", dict(prompt="hi", sampling={"temperature": -1.0}), "temperature"),
    ("top_p zero", dict(prompt="hi", sampling={"top_p": 0.0}), "top_p"),
    ("top_k zero", dict(prompt="hi", sampling={"top_k": 0}), "top_k"),
    ("max_tokens zero", dict(prompt="hi", sampling={"max_tokens": 0}), "max_tokens"),
    ("seed out of range", dict(prompt="hi", sampling={"seed": -5}), "seed"),
    ("logprobs too many", dict(prompt="hi", sampling={"logprobs": 50}), "logprobs"),
    ("oversized message", dict(prompt="y" * (MAX_REQUEST_BYTES + 10)), "max_request_bytes"),
    ("unknown model", dict(prompt="hi", model="no-such-model"), "model"),
    ("both prompt kinds", dict(prompt="hi", prompt_token_ids=[1, 2]), "prompt"),
]


@pytest.mark.parametrize("case,kwargs,field", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument(server, case, kwargs, field):
    with Client(server.address) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.generate(**kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.value.details())
        assert field in err.value.details(), (case, err.value.details())
        assert time.monotonic() - t0 < 5.0
        assert c.health() == "SERVING"
        ok = c.generate("hi", sampling={"temperature": 0.0, "max_tokens": 2})
        assert ok.finish_reason in ("stop", "length") and 1 <= len(ok.token_ids) <= 2


def test_request_id_in_use_is_invalid(server):
    async def run():
        async with AsyncClient(server.address) as c:
            call = c.stream("hello", sampling={"max_tokens": 30, "ignore_eos": True}, request_id="dup-1")
            first = await call.read()
            assert first.request_id == "dup-1"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate("hello", request_id="dup-1")
            call.cancel()
            return err.value

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()


def test_overload_rejects_at_once_and_accepted_finish(server):
    n = 3 * MAX_QUEUE

    async def one(c, i):
        t0 = time.monotonic()
        try:
            res = await c.generate(f"request {i}", sampling={"temperature": 0.0, "max_tokens": 24,
                                                             "ignore_eos": True})
            return "ok", res, time.monotonic() - t0
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details(), time.monotonic() - t0

    async def run():
        async with AsyncClient(server.address) as c:
            return await asyncio.gather(*[one(c, i) for i in range(n)])

    results = asyncio.run(run())
    accepted = [r for r in results if r[0] == "ok"]
    rejected = [r for r in results if r[0] != "ok"]
    assert len(accepted) >= 1 and len(rejected) >= n - MAX_QUEUE - 1, results
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _, _ in rejected)
    slowest_accepted = max(t for _, _, t in accepted)
    assert all(t < slowest_accepted for _, _, t in rejected), "rejections must not wait for accepted requests"
    for _, res, _ in accepted:
        assert res.finish_reason == "length" and len(res.token_ids) == 24
    info = wait_all_free(server.address)
    assert info.max_queue == MAX_QUEUE


def test_client_disconnect_frees_resources(server):
    async def run():
        async with AsyncClient(server.address) as c:
            calls = [c.stream(f"disconnect {i}", sampling={"max_tokens": 40, "ignore_eos": True})
                     for i in range(3)]
            for call in calls:
                await call.read()
                await call.read()
            busy = await c.server_info()
            for call in calls:
                call.cancel()
            return busy

    busy = asyncio.run(run())
    assert busy.num_in_flight == 3
    assert busy.instances[0].free_blocks < busy.instances[0].total_blocks
    wait_all_free(server.address)


def test_abort_rpc_ends_the_stream(server):
    async def run():
        async with AsyncClient(server.address) as c:
            call = c.stream("abort me", sampling={"max_tokens": 40, "ignore_eos": True}, request_id="to-abort")
            got = [await call.read()]
            assert await c.abort("to-abort")
            assert not await c.abort("never-existed")
            while (msg := await call.read()) is not grpc.aio.EOF:
                got.append(msg)
            return got

    msgs = asyncio.run(run())
    assert msgs[-1].finished and msgs[-1].finish_reason == "abort"
    assert sum(len(m.token_ids) for m in msgs) < 40


def test_server_info(server):
    with Client(server.address) as c:
        info = c.server_info()
    assert info.model == "tiny-llama" and info.mode == "colocated" and info.ready
    assert info.max_model_len == ENGINE_KW["max_model_len"] and info.vocab_size == 512
    assert info.max_request_bytes == MAX_REQUEST_BYTES
    assert len(info.instances) == 1 and info.instances[0].role == "both" and info.instances[0].total_blocks > 0
    inst = info.instances[0]
    assert list(inst.devices) == [0] and inst.alive and 0 <= inst.busy_fraction <= 1 and inst.num_steps >= 0
    assert not inst.warming  # started with --nowarmup: no warm-up work left for later


def test_health_and_reflection(server):
    with Client(server.address) as c:
        assert c.health() == "SERVING"
        assert c.health("distserve.v1.DistServe") == "SERVING"
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"distserve.v1.DistServe", "grpc.health.v1.Health"} <= names


def test_logprobs_and_stop_strings(server):
    with Client(server.address) as c:
        res = c.generate(prompt_token_ids=TOKEN_PROMPT, sampling={"temperature": 0.0, "max_tokens": 4, "logprobs": 2})
        msgs = list(c.stream(prompt_token_ids=TOKEN_PROMPT,
                             sampling={"temperature": 0.0, "max_tokens": 4, "logprobs": 2}))
    lps = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in lps] == res.token_ids
    for lp in lps:
        assert lp.logprob <= 0.0 and len(lp.top_logprobs) >= 2
        assert max(lp.top_logprobs.values()) == pytest.approx(lp.logprob)  # greedy: the sampled token is the top one

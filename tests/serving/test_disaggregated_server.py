"""The server's default mode end to end: prefill and decode on disjoint devices, served over gRPC."""

import asyncio

import pytest

from serving.client import AsyncClient, Client
from tests.serving.conftest import ENGINE_KW, ServerProcess, wait_all_free
from tests.tolerances import assert_clear_greedy_margins

PROMPTS = ["Hello, world", "The quick brown fox jumps over", "a", "Serving, disaggregated"]


@pytest.fixture(scope="module")
def disagg_server(tiny_model, tmp_path_factory):
    extra = ["--mode=disaggregated", "--placement=configs/placements/p2-d1.yaml", "--nowarmup",
             "--max_queue=16"] + [f"--{k}={v}" for k, v in ENGINE_KW.items()]
    proc = ServerProcess(tiny_model, extra=extra, log_path=tmp_path_factory.mktemp("disagg") / "server.log")
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def test_disaggregated_server_streams_offline_tokens(disagg_server, tiny_model):
    from distserve_jax import LLM, SamplingParams

    expected = LLM(tiny_model, **ENGINE_KW).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10,
                                                                             logprobs=2), use_tqdm=False)
    # The server prefills at tp=2, in another order than the offline tp=1: no near tie.
    assert_clear_greedy_margins([o.logprobs for o in expected], what="offline reference")

    async def run():
        async with AsyncClient(disagg_server.address) as c:
            return await asyncio.gather(*[c.generate(p, sampling={"temperature": 0.0, "max_tokens": 10})
                                          for p in PROMPTS])

    for res, exp in zip(asyncio.run(run()), expected):
        assert res.token_ids == exp.token_ids and res.text == exp.text
        assert res.finish_reason == exp.finish_reason
        if len(exp.token_ids) > 1:
            assert res.timing["migration_s"] > 0, res.timing  # its KV was pulled to the decode mesh
    info = wait_all_free(disagg_server.address)
    assert info.mode == "disaggregated"
    roles = sorted((i.role, i.tp) for i in info.instances)
    assert roles == [("decode", 1), ("prefill", 2)], roles


def test_disaggregated_server_cancel_frees_both_instances(disagg_server):
    with Client(disagg_server.address) as c:
        stream = c.stream("cancel me", sampling={"max_tokens": 40, "ignore_eos": True})
        next(iter(stream))
        stream.cancel()
    wait_all_free(disagg_server.address)

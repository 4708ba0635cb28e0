"""AsyncEngine: streams equal offline output, cancellation and abort free everything, the queue limit holds."""

import asyncio

import numpy as np
import pytest

from distserve_jax import AsyncEngine, LLM, SamplingParams
from distserve_jax.engine.async_engine import QueueFullError
from tests.tolerances import assert_clear_greedy_margins

KW = dict(max_model_len=128, num_blocks=48, max_num_seqs=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(4, 256, int(rng.integers(2, 40)))] for _ in range(n)]


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def engine(request, hf_checkpoint):
    kw = dict(KW)
    if request.param == "disaggregated":
        kw["placement"] = "configs/placements/p2-d1.yaml"
    eng = AsyncEngine.from_model(str(hf_checkpoint("llama3")), mode=request.param, max_queue=6, **kw)
    yield eng
    eng.shutdown()


async def _collect(eng, prompt, params=GREEDY, rid=None, started: asyncio.Event | None = None):
    toks, last = [], None
    async for out in eng.generate(prompt_token_ids=prompt, sampling_params=params, request_id=rid):
        toks += out.new_token_ids
        last = out
        if started is not None:
            started.set()
    return toks, last


LONG = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)


async def _assert_idle(eng):
    for _ in range(100):
        info = await eng.info()
        if all(i["free_blocks"] == i["total_blocks"] and i["num_running"] == 0 and i["num_waiting"] == 0
               for i in info["instances"]):
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still holds work: {info}")


def test_streams_equal_offline_output(engine, hf_checkpoint):
    prompts = _prompts(5)
    ref = LLM(str(hf_checkpoint("llama3")), **KW).generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                 logprobs=2), use_tqdm=False)
    # The disaggregated engine prefills at tp=2, in another order: no near tie in the reference.
    assert_clear_greedy_margins([r.logprobs for r in ref], what="offline reference")

    async def main():
        res = await asyncio.gather(*[_collect(engine, p) for p in prompts])
        for (toks, last), r in zip(res, ref):
            assert toks == r.token_ids and last.finished and last.finish_reason == "length"
            assert last.metrics["ttft"] > 0 and last.metrics["tpot"] > 0
        await _assert_idle(engine)

    asyncio.run(main())


def test_cancelled_stream_frees_its_request(engine):
    async def main():
        agen = engine.generate(prompt_token_ids=[7, 8, 9], sampling_params=LONG)
        async for _ in agen:
            break
        await agen.aclose()
        await _assert_idle(engine)
        # Task cancellation mid-stream, right after the first token.
        started = asyncio.Event()
        task = asyncio.create_task(_collect(engine, [7, 8, 9], LONG, started=started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _assert_idle(engine)

    asyncio.run(main())


def test_abort_ends_the_stream(engine):
    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(_collect(engine, [7, 8, 9], LONG, rid="victim", started=started))
        await started.wait()
        assert await engine.abort("victim")
        toks, last = await task
        assert last.finished and last.finish_reason == "abort" and 1 <= len(toks) < 80
        await _assert_idle(engine)

    asyncio.run(main())


def test_abort_whose_caller_is_cancelled_still_aborts_and_the_engine_survives(engine):
    """A client that goes away while its abort waits for the engine thread (the HTTP/gRPC disconnect
    path) must neither kill the engine thread nor leave the request or its stream behind."""
    import threading

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(_collect(engine, [7, 8, 9], LONG, rid="orphan", started=started))
        await started.wait()
        gate = threading.Event()
        engine._submit(lambda: gate.wait(10))  # holds the engine thread so the abort stays queued
        abort = asyncio.create_task(engine.abort("orphan"))
        await asyncio.sleep(0.05)
        abort.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abort
        gate.set()
        toks, last = await asyncio.wait_for(task, 30)
        assert last.finished and last.finish_reason == "abort" and len(toks) < 80
        await _assert_idle(engine)
        toks, last = await _collect(engine, [5, 6], GREEDY)  # still serving
        assert last.finish_reason == "length" and len(toks) == 10

    asyncio.run(main())


def test_bad_input_and_queue_limit(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await _collect(engine, [])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(engine, [10**6])
        long = SamplingParams(max_tokens=60, ignore_eos=True)
        tasks = [asyncio.create_task(_collect(engine, p, long)) for p in _prompts(6, 6)]
        await asyncio.sleep(0)  # each task registers its stream before its first await
        with pytest.raises(QueueFullError, match="at capacity"):
            await _collect(engine, [5, 6, 7])
        for toks, last in await asyncio.gather(*tasks):
            assert last.finish_reason == "length" and len(toks) == 60
        toks, last = await _collect(engine, [5, 6, 7])  # serving again afterwards
        assert len(toks) == 10
        await _assert_idle(engine)

    asyncio.run(main())

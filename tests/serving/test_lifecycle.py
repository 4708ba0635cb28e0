"""Server lifecycle on its own process: NOT_SERVING during warm-up, SERVING after; SIGTERM under load
ends every open stream with a final status and exits 0 in bounded time."""

import asyncio
import signal
import time

import grpc
import pytest

from serving.client import AsyncClient, Client
from tests.serving.conftest import ServerProcess

# Small buckets: warm-up compiles only a handful of step shapes. One sequence per step, so the load
# below lasts long enough for SIGTERM (drain timeout 0) to abort part of it.
LIFECYCLE_KW = dict(max_model_len=32, num_blocks=16, max_num_seqs=1, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def warming_server(tiny_model, tmp_path_factory):
    # No persistent compilation cache: with a warm one the warm-up can finish before the first health
    # answer, and the NOT_SERVING phase this module checks would not be seen.
    extra = ["--mode=colocated", "--warmup", "--drain_timeout_s=0", "--max_queue=8", "--compilation_cache_dir=none"]
    extra += [f"--{k}={v}" for k, v in LIFECYCLE_KW.items()]
    proc = ServerProcess(tiny_model, extra=extra, log_path=tmp_path_factory.mktemp("lifecycle") / "server.log")
    yield proc
    proc.stop()


def test_health_not_serving_until_warm(warming_server):
    statuses = []
    unavailable = None
    deadline = time.monotonic() + 180
    with Client(warming_server.address) as c:
        while time.monotonic() < deadline:
            assert warming_server.proc.poll() is None, warming_server.log()
            try:
                status = c.health(timeout=2.0)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            statuses.append(status)
            if status == "SERVING":
                break
            if unavailable is None:
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("too early", sampling={"max_tokens": 2})
                unavailable = err.value
            time.sleep(0.05)
    assert statuses and statuses[0] == "NOT_SERVING" and statuses[-1] == "SERVING", statuses
    assert set(statuses) == {"NOT_SERVING", "SERVING"}
    assert statuses.index("SERVING") == len(statuses) - 1
    assert unavailable.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in unavailable.details()
    assert "warm-up done" in warming_server.log()


def test_sigterm_under_load_ends_every_stream_and_exits_zero(warming_server):
    warming_server.wait_serving()

    async def drain(call, out: list):
        while (msg := await call.read()) is not grpc.aio.EOF:
            out.append(msg)
        return await call.code()

    async def run():
        async with AsyncClient(warming_server.address) as c:
            calls = [c.stream(f"load {i}", sampling={"max_tokens": 28, "ignore_eos": True}) for i in range(8)]
            msgs = [[] for _ in calls]
            readers = [asyncio.ensure_future(drain(call, out)) for call, out in zip(calls, msgs)]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the server holds every request not yet finished
                done = sum(bool(m) and m[-1].finished for m in msgs)
                if (await c.server_info()).num_in_flight + done >= len(calls) and any(msgs):
                    break
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            warming_server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await c.generate("after sigterm", sampling={"max_tokens": 2})
            codes = await asyncio.wait_for(asyncio.gather(*readers), 30)
            finals = [(m[-1] if m else None, code) for m, code in zip(msgs, codes)]
            return finals, late.value, t0

    finals, late, t0 = asyncio.run(run())
    for last, code in finals:
        assert code == grpc.StatusCode.OK
        assert last is not None and last.finished and last.finish_reason in ("abort", "length", "stop")
    assert any(last.finish_reason == "abort" for last, _ in finals)
    assert late.code() == grpc.StatusCode.UNAVAILABLE
    assert warming_server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    assert "stopped" in warming_server.log()

"""gRPC client of the server (asyncio and blocking) and a CLI for one-shot and streaming generation.

    python -m serving.client --address=127.0.0.1:50051 --prompt="Hello" --max_tokens=32 --stream
    python -m serving.client --address=127.0.0.1:50051 --info

Sampling parameters are sent as given (a `SamplingParams`, a dict of its fields or a protobuf
message); the server validates them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import grpc
from absl import app, flags
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve_jax.sampling_params import SamplingParams
from serving.convert import sampling_to_proto
from serving.proto import distserve_pb2 as pb
from serving.proto import distserve_pb2_grpc as pb_grpc

Sampling = SamplingParams | Mapping[str, Any] | pb.SamplingParams | None


def _sampling_proto(sampling: Sampling) -> pb.SamplingParams:
    if sampling is None:
        return pb.SamplingParams()
    if isinstance(sampling, pb.SamplingParams):
        return sampling
    if isinstance(sampling, SamplingParams):
        return sampling_to_proto(sampling)
    kw = dict(sampling)
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    return pb.SamplingParams(**kw)


def make_request(prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 sampling: Sampling = None, request_id: str | None = None, model: str | None = None
                 ) -> pb.GenerateRequest:
    """A `GenerateRequest` (nothing is validated here)."""
    return pb.GenerateRequest(prompt=prompt or "", prompt_token_ids=list(prompt_token_ids or []),
                              request_id=request_id or "", sampling_params=_sampling_proto(sampling),
                              model=model or "")


@dataclasses.dataclass
class GenerateResult:
    """A finished request as the client saw it; times are `time.perf_counter()` on the client."""

    request_id: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    send_time: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None

    def add(self, msg: pb.GenerateResponse, now: float) -> None:
        self.request_id = msg.request_id
        self.token_ids.extend(msg.token_ids)
        self.token_times.extend([now] * len(msg.token_ids))
        self.text += msg.text
        if msg.finished:
            self.finish_reason = msg.finish_reason
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.timing = {f.name: getattr(msg.timing, f.name) for f in pb.Timing.DESCRIPTOR.fields}
            self.finish_time = now


class AsyncClient:
    """grpc.aio client. Use as `async with AsyncClient(address) as c: ...`."""

    def __init__(self, address: str, *, max_message_bytes: int = 64 << 20):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = pb_grpc.DistServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
               sampling: Sampling = None, request_id: str | None = None, model: str | None = None,
               timeout: float | None = None):
        """The server stream of one request (a grpc.aio call: iterate it, `cancel()` it to abort)."""
        req = make_request(prompt, prompt_token_ids=prompt_token_ids, sampling=sampling, request_id=request_id,
                           model=model)
        return self.stub.Generate(req, timeout=timeout)

    async def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                       sampling: Sampling = None, request_id: str | None = None, model: str | None = None,
                       timeout: float | None = None) -> GenerateResult:
        """Runs one request to the end (streamed, so token times are recorded)."""
        res = GenerateResult(send_time=time.perf_counter())
        async for msg in self.stream(prompt, prompt_token_ids=prompt_token_ids, sampling=sampling,
                                     request_id=request_id, model=model, timeout=timeout):
            res.add(msg, time.perf_counter())
        return res

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id))).found

    async def server_info(self, timeout: float | None = 10.0) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.ServerInfoRequest(), timeout=timeout)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... of `service` ("" = the whole server)."""
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 300.0) -> None:
        """Waits until health reports SERVING; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(timeout=2.0) == "SERVING":
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {self.address} not SERVING after {timeout} s")
            await asyncio.sleep(0.1)


class Client:
    """Blocking gRPC client with the same calls as `AsyncClient`."""

    def __init__(self, address: str, *, max_message_bytes: int = 64 << 20):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = pb_grpc.DistServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
               sampling: Sampling = None, request_id: str | None = None, model: str | None = None,
               timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        req = make_request(prompt, prompt_token_ids=prompt_token_ids, sampling=sampling, request_id=request_id,
                           model=model)
        return self.stub.Generate(req, timeout=timeout)

    def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 sampling: Sampling = None, request_id: str | None = None, model: str | None = None,
                 timeout: float | None = None) -> GenerateResult:
        res = GenerateResult(send_time=time.perf_counter())
        for msg in self.stream(prompt, prompt_token_ids=prompt_token_ids, sampling=sampling,
                               request_id=request_id, model=model, timeout=timeout):
            res.add(msg, time.perf_counter())
        return res

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id)).found

    def server_info(self, timeout: float | None = 10.0) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.ServerInfoRequest(), timeout=timeout)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing the client defines none)."""
    flags.DEFINE_string("address", "127.0.0.1:50051", "Server address host:port.")
    flags.DEFINE_string("prompt", None, "Prompt text.")
    flags.DEFINE_list("prompt_token_ids", None, "Prompt token ids (instead of --prompt).")
    flags.DEFINE_integer("max_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling.")
    flags.DEFINE_integer("top_k", -1, "Top-k sampling (-1: off).")
    flags.DEFINE_integer("seed", None, "Request seed.")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
    flags.DEFINE_bool("stream", False, "Print tokens as they arrive.")
    flags.DEFINE_bool("info", False, "Print the server info and exit.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with Client(FLAGS.address) as c:
        if FLAGS.info:
            sys.stdout.write(f"health: {c.health()}\n{c.server_info()}")
            return
        if (FLAGS.prompt is None) == (FLAGS.prompt_token_ids is None):
            raise app.UsageError("pass exactly one of --prompt and --prompt_token_ids")
        sampling = {"max_tokens": FLAGS.max_tokens, "temperature": FLAGS.temperature, "top_p": FLAGS.top_p,
                    "top_k": FLAGS.top_k, "stop": FLAGS.stop}
        if FLAGS.seed is not None:
            sampling["seed"] = FLAGS.seed
        ids = [int(t) for t in FLAGS.prompt_token_ids] if FLAGS.prompt_token_ids else None
        try:
            if FLAGS.stream:
                last = None
                for msg in c.stream(FLAGS.prompt, prompt_token_ids=ids, sampling=sampling):
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                    last = msg
                sys.stdout.write(f"\n[finish_reason={last.finish_reason} tokens={last.usage.completion_tokens} "
                                 f"ttft={last.timing.ttft_s:.3f}s tpot={last.timing.tpot_s:.4f}s]\n")
            else:
                res = c.generate(FLAGS.prompt, prompt_token_ids=ids, sampling=sampling)
                sys.stdout.write(f"{res.text}\n[finish_reason={res.finish_reason} tokens={res.completion_tokens} "
                                 f"ttft={res.timing['ttft_s']:.3f}s tpot={res.timing['tpot_s']:.4f}s]\n")
        except grpc.RpcError as e:
            sys.stderr.write(f"error: {e.code().name}: {e.details()}\n")
            raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)

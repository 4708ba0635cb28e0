"""The gRPC service (`distserve.v1.DistServe`, grpc.aio): Generate, Abort and GetServerInfo.

Maps protobuf requests onto `Frontend` and `ServingError`s onto status codes:
INVALID_ARGUMENT (bad input, message names the field), RESOURCE_EXHAUSTED (queue full),
UNAVAILABLE (warming up, shutting down). When the client cancels its stream, grpc.aio cancels
the handler; closing the engine stream then aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import grpc
from absl import logging

from serving.convert import InvalidRequest, ServingError, logprobs_to_proto, sampling_from_proto, timing_from_metrics
from serving.frontend import Frontend
from serving.proto import distserve_pb2 as pb
from serving.proto import distserve_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DistServe"].full_name

_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "unavailable": grpc.StatusCode.UNAVAILABLE}


class DistServeServicer(pb_grpc.DistServeServicer):
    """gRPC handlers on top of a `Frontend`."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        fe = self.frontend
        try:
            fe.check_request(model=request.model, size_bytes=request.ByteSize())
            params = sampling_from_proto(request.sampling_params)
            has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
            if has_text and has_ids:
                raise InvalidRequest("pass only one of prompt and prompt_token_ids", param="prompt")
            stream = fe.generate(prompt=request.prompt if has_text else None,
                                 prompt_token_ids=list(request.prompt_token_ids) if has_ids else None,
                                 params=params, request_id=request.request_id or None)
            async for out in stream:
                msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids,
                                          text=out.text_delta,
                                          logprobs=logprobs_to_proto(out.new_token_ids, out.logprobs),
                                          finished=out.finished, finish_reason=out.finish_reason or "")
                if out.finished:
                    msg.usage.prompt_tokens = len(out.prompt_token_ids)
                    msg.usage.completion_tokens = len(out.token_ids)
                    msg.timing.CopyFrom(pb.Timing(**timing_from_metrics(out.metrics)))
                yield msg
        except ServingError as e:
            await context.abort(_STATUS[e.kind], str(e))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        found = await self.frontend.abort(request.request_id)
        logging.info("abort %s (found=%s)", request.request_id, found)
        return pb.AbortResponse(found=found)

    async def GetServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ServerInfo:
        fe = self.frontend
        s = fe.served
        info = await fe.info()
        return pb.ServerInfo(
            model=s.name, model_path=s.path, mode=str(info.get("mode") or s.mode), placement=s.placement,
            max_model_len=int(info.get("max_model_len") or s.max_model_len), max_queue=s.max_queue or 0,
            vocab_size=s.vocab_size, num_in_flight=fe.num_in_flight(), ready=fe.ready,
            max_request_bytes=s.max_request_bytes,
            instances=[pb.InstanceInfo(name=str(i["name"]), role=str(i.get("role", "")), tp=int(i.get("tp", 1)),
                                       pp=int(i.get("pp", 1)), num_waiting=int(i.get("num_waiting", 0)),
                                       num_running=int(i.get("num_running", 0)),
                                       free_blocks=int(i.get("free_blocks", 0)),
                                       total_blocks=int(i.get("total_blocks", 0)),
                                       devices=[int(d) for d in i.get("devices", [])],
                                       num_steps=int(i.get("num_steps", 0)),
                                       busy_fraction=float(i.get("busy_fraction", 0.0)),
                                       alive=bool(i.get("alive", True)), node=str(i.get("node") or ""),
                                       pid=int(i.get("pid") or 0), cores=[int(c) for c in i.get("cores") or []],
                                       restarts=int(i.get("restarts") or 0))
                       for i in info.get("instances", [])])


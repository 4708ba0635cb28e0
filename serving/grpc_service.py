"""The gRPC service (`distserve.v1.DistServe`, grpc.aio): Generate, Abort and GetServerInfo.

Maps protobuf requests onto `Frontend` and `ServingError`s onto status codes:
INVALID_ARGUMENT (bad input, message names the field: also a message that does not parse, or one
over --max_request_bytes), RESOURCE_EXHAUSTED (queue full, only), UNAVAILABLE (warming up,
shutting down), INTERNAL (a server fault, logged). `add_to_server` registers the handlers with
deserializers that never raise (`serving.proto_wire`), so a malformed message reaches the handler
as an `Unparsable` and gets INVALID_ARGUMENT. When the client cancels its stream, grpc.aio cancels
the handler; closing the engine stream then aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import json

import grpc
from absl import logging

from serving.convert import (InvalidRequest, ServingError, logprobs_to_proto, prompt_logprobs_to_proto,
                             sampling_from_proto, timing_from_metrics)
from serving.frontend import Frontend
from serving.proto import distserve_pb2 as pb
from serving.proto import distserve_pb2_grpc as pb_grpc
from serving.proto_wire import Unparsable, safe_deserializer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DistServe"].full_name
# gRPC's own limit on a received message (its core answers RESOURCE_EXHAUSTED past it, before any
# handler runs): far above --max_request_bytes, so every request of a plausible size gets this
# service's INVALID_ARGUMENT, yet one call cannot make the server buffer gigabytes.
MIN_RECEIVE_LIMIT_BYTES = 64 << 20

_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "unavailable": grpc.StatusCode.UNAVAILABLE, "internal": grpc.StatusCode.INTERNAL}


def receive_limit_bytes(max_request_bytes: int) -> int:
    """The `grpc.max_receive_message_length` for a server that accepts `max_request_bytes`."""
    return max(MIN_RECEIVE_LIMIT_BYTES, 4 * max_request_bytes + (1 << 20))


async def _refuse(context: grpc.aio.ServicerContext, bad: Unparsable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


class DistServeServicer(pb_grpc.DistServeServicer):
    """gRPC handlers on top of a `Frontend`."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if isinstance(request, Unparsable):
            await _refuse(context, request)
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
            first = True
            async for out in stream:
                msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids,
                                          text=out.text_delta,
                                          logprobs=logprobs_to_proto(out.new_token_ids, out.logprobs),
                                          finished=out.finished, finish_reason=out.finish_reason or "")
                if first and out.prompt_logprobs:
                    msg.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_token_ids, out.prompt_logprobs))
                first = False
                if out.finished:
                    msg.usage.prompt_tokens = len(out.prompt_token_ids)
                    msg.usage.completion_tokens = len(out.token_ids)
                    msg.timing.CopyFrom(pb.Timing(**timing_from_metrics(out.metrics)))
                yield msg
        except ServingError as e:
            await context.abort(_STATUS[e.kind], str(e))
        except Exception as e:  # noqa: BLE001 - a server fault: logged, the client gets INTERNAL
            logging.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}; see the server log")

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if isinstance(request, Unparsable):
            await _refuse(context, request)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        found = await self.frontend.abort(request.request_id)
        logging.info("abort %s (found=%s)", request.request_id, found)
        return pb.AbortResponse(found=found)

    async def GetServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ServerInfo:
        if isinstance(request, Unparsable):
            await _refuse(context, request)
        fe = self.frontend
        s = fe.served
        info = await fe.info()
        change = info.get("placement_change")
        placement = s.placement
        if change and info.get("current_placement"):  # changed since start-up: what is served now
            placement = json.dumps(info["current_placement"], default=str, sort_keys=True)
        return pb.ServerInfo(
            model=s.name, model_path=s.path, mode=str(info.get("mode") or s.mode), placement=placement,
            placement_change=_change_info(change) if change else None,
            num_placement_changes=sum(int(n) for n in (info.get("placement_changes") or {}).values()),
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
                                       restarts=int(i.get("restarts") or 0),
                                       leaving=bool(i.get("leaving", False)),
                                       shares_cores_with=[str(n) for n in i.get("shares_cores_with") or []],
                                       warming=bool(i.get("warming", False)))
                       for i in info.get("instances", [])])


def _change_info(change: dict) -> pb.PlacementChangeInfo:
    return pb.PlacementChangeInfo(target=str(change.get("target") or ""), state=str(change.get("state") or ""),
                                  added=[str(n) for n in change.get("added") or []],
                                  removed=[str(n) for n in change.get("removed") or []],
                                  started_at=float(change.get("started_at") or 0.0),
                                  finished_at=float(change.get("finished_at") or 0.0),
                                  error=str(change.get("error") or ""))


def add_to_server(servicer: DistServeServicer, server: grpc.aio.Server) -> None:
    """Registers the service like the generated `add_DistServeServicer_to_server`, with deserializers
    that turn an oversized or unparsable message into an `Unparsable` instead of raising."""
    limit = lambda: servicer.frontend.served.max_request_bytes  # noqa: E731
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=safe_deserializer(pb.GenerateRequest, limit),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort, request_deserializer=safe_deserializer(pb.AbortRequest, limit),
            response_serializer=pb.AbortResponse.SerializeToString),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo, request_deserializer=safe_deserializer(pb.ServerInfoRequest, limit),
            response_serializer=pb.ServerInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

"""OpenAI-compatible HTTP front (aiohttp): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics.

Completions take `prompt` as a string, a list of token ids, or a list of either (one set of `n`
choices per prompt); chat takes `messages` (rendered by `serving.chat`). Both stream as
server-sent events (`data: {...}` chunks, then `data: [DONE]`) when `stream` is true. Which
parameters are supported, refused or ignored is `serving.openai_request`'s (and the README's).
Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}` with 400 (bad input of
any shape: wrong JSON types, invalid Unicode, nesting, size), 429 (queue full), 503 (warming up /
shutting down) or 500 (a server fault, logged). The response headers of a stream are sent only
after every choice's first output, so a request refused by the engine still gets a plain error
status; a failure after that ends the stream with an error event and `data: [DONE]`. A client
that disconnects cancels its handler, which aborts every choice of its request.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from absl import logging
from aiohttp import web

from serving.convert import InvalidRequest, ServingError
from serving.frontend import Frontend
from serving.openai_request import OpenAIRequest, check_json_tree, parse_chat, parse_completion
from serving.openai_response import Choices, ChoiceState, usage

_HTTP_STATUS = {"invalid": 400, "overloaded": 429, "unavailable": 503, "internal": 500}
_ERROR_TYPE = {"invalid": "invalid_request_error", "overloaded": "rate_limit_error",
               "unavailable": "service_unavailable", "internal": "internal_error"}
_FRONTEND_KEY = web.AppKey("frontend", Frontend)
DEFAULT_MAX_CHOICES = 256  # choices of one request when the server has no --max_queue


def error_body(kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    status = _HTTP_STATUS.get(kind, 500)
    return {"error": {"message": message, "type": _ERROR_TYPE.get(kind, "internal_error"), "param": param,
                      "code": status}}


def error_response(kind: str, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(kind, message, param), status=_HTTP_STATUS.get(kind, 500))


def make_app(frontend: Frontend) -> web.Application:
    """The aiohttp application serving `frontend`."""
    hard_cap = 2 * frontend.served.max_request_bytes + (1 << 20)
    app = web.Application(client_max_size=hard_cap)
    app[_FRONTEND_KEY] = frontend
    app.add_routes([web.post("/v1/completions", _completions), web.post("/v1/chat/completions", _chat),
                    web.get("/v1/models", _models), web.get("/health", _health), web.get("/metrics", _metrics)])
    return app


async def _read_json(request: web.Request, fe: Frontend) -> dict[str, Any]:
    limit = fe.served.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise InvalidRequest(f"request body is {request.content_length} bytes, over the limit of {limit} bytes "
                             f"(max_request_bytes); the prompt is too large", param="prompt")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise InvalidRequest(f"request body is over the limit of {limit} bytes (max_request_bytes)",
                             param="prompt") from None
    fe.check_request(model=None, size_bytes=len(raw))
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers of too many digits
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_json_tree(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required (see /v1/models)", param="model")
    fe.check_request(model=model, size_bytes=len(raw))
    return body


def _max_choices(fe: Frontend) -> int:
    return fe.served.max_queue or DEFAULT_MAX_CHOICES


async def _completions(request: web.Request) -> web.StreamResponse:
    fe = request.app[_FRONTEND_KEY]
    try:
        body = await _read_json(request, fe)
        req = parse_completion(body, max_choices=_max_choices(fe))
    except ServingError as e:
        return error_response(e.kind, str(e), e.param)
    return await _serve(request, fe, req)


async def _chat(request: web.Request) -> web.StreamResponse:
    fe = request.app[_FRONTEND_KEY]
    try:
        body = await _read_json(request, fe)
        req = parse_chat(body, fe.served.tokenizer, max_choices=_max_choices(fe))
    except ServingError as e:
        return error_response(e.kind, str(e), e.param)
    return await _serve(request, fe, req)


async def _serve(request: web.Request, fe: Frontend, req: OpenAIRequest) -> web.StreamResponse:
    rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
    choices = Choices(req.num_choices)

    def stream(i: int):
        text, ids = req.prompts[i // req.n]
        sub = rid if req.num_choices == 1 else f"{rid}-{i}"
        return fe.generate(prompt=text, prompt_token_ids=ids, params=req.choice_params(i % req.n), request_id=sub)

    choices.start(stream)
    try:
        try:
            await choices.admit()
            states = [ChoiceState(req, i // req.n, fe.served.tokenizer) for i in range(req.num_choices)]
            if not req.stream:
                async for i, out in choices.events():
                    states[i].add(out)
                return web.json_response(_final_body(fe, req, rid, states))
        except ServingError as e:
            return error_response(e.kind, str(e), e.param)
        except Exception:  # noqa: BLE001 - a server fault: logged, and the client gets a JSON 500
            logging.exception("request %s failed", rid)
            return error_response("internal", f"internal error serving {rid}; see the server log")
        return await _stream(request, fe, req, rid, choices, states)
    finally:
        await choices.close()


def _final_body(fe: Frontend, req: OpenAIRequest, rid: str, states: list[ChoiceState]) -> dict[str, Any]:
    out = []
    for i, s in enumerate(states):
        reason = "length" if req.prompt_only else s.finish_reason
        if req.chat:
            out.append({"index": i, "message": {"role": "assistant", "content": s.text},
                        "logprobs": s.full_logprobs(), "finish_reason": reason})
        else:
            out.append({"index": i, "text": s.text, "logprobs": s.full_logprobs(), "finish_reason": reason})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": fe.served.name, "choices": out, "usage": usage(states, req.n)}


async def _stream(request: web.Request, fe: Frontend, req: OpenAIRequest, rid: str, choices: Choices,
                  states: list[ChoiceState]) -> web.StreamResponse:
    created = int(time.time())
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(payload: dict) -> None:
        await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    async def chunk(choice: dict | None, extra: dict | None = None) -> None:
        body = {"id": rid, "object": obj, "created": created, "model": fe.served.name,
                "choices": [choice] if choice else []}
        body.update(extra or {})
        await send(body)

    if req.chat:
        for i in range(req.num_choices):
            await chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
    try:
        async for i, out in choices.events():
            text, lp = states[i].add(out)
            if not (text or out.finished or lp):
                continue
            reason = ("length" if req.prompt_only else out.finish_reason) if out.finished else None
            if req.chat:
                delta = {"content": text} if text else {}
                await chunk({"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason})
            else:
                await chunk({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        if req.include_usage:
            await chunk(None, {"usage": usage(states, req.n)})
    except ServingError as e:  # after the headers: the stream ends with an error event
        await send(error_body(e.kind, str(e), e.param))
    except ConnectionResetError:  # the client went away: nothing to end
        raise
    except Exception:  # noqa: BLE001 - a server fault mid-stream: logged, the stream still ends cleanly
        logging.exception("stream %s failed", rid)
        await send(error_body("internal", f"internal error serving {rid}; see the server log"))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _models(request: web.Request) -> web.Response:
    fe = request.app[_FRONTEND_KEY]
    return web.json_response({"object": "list", "data": [{
        "id": fe.served.name, "object": "model", "created": 0, "owned_by": "distserve-jax",
        "max_model_len": fe.served.max_model_len}]})


async def _health(request: web.Request) -> web.Response:
    fe = request.app[_FRONTEND_KEY]
    if fe.ready:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "shutting_down" if fe.draining else "warming_up"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    fe = request.app[_FRONTEND_KEY]
    await fe.info()  # refreshes the per-instance gauges
    fe.metrics.refresh_attainment()
    data, content_type = fe.metrics.exposition()
    return web.Response(body=data, headers={"Content-Type": content_type})

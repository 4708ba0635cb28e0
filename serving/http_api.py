"""OpenAI-compatible HTTP front (aiohttp): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics.

Completions take `prompt` as a string or a list of token ids; chat takes `messages` (rendered by
`serving.chat`). Both stream as server-sent events (`data: {...}` chunks, then `data: [DONE]`)
when `stream` is true. Sampling fields: max_tokens (chat: also max_completion_tokens),
temperature, top_p, seed, stop, logprobs (chat: logprobs + top_logprobs), and the vLLM extras
top_k, min_p, ignore_eos, stop_token_ids, presence/frequency/repetition penalties. Errors are
OpenAI-style `{"error": {"message", "type", "param", "code"}}` with 400 (bad input), 429 (queue
full) or 503 (warming up / shutting down). The response headers of a stream are sent only after
the first output, so a request refused by the engine still gets a plain error status. A client
that disconnects cancels its handler, which aborts the request.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from distserve_jax.engine.output_processor import RequestOutput
from serving.chat import render_chat
from serving.convert import InvalidRequest, ServingError, make_sampling_params
from serving.frontend import Frontend

_HTTP_STATUS = {"invalid": 400, "overloaded": 429, "unavailable": 503}
_ERROR_TYPE = {"invalid": "invalid_request_error", "overloaded": "rate_limit_error",
               "unavailable": "service_unavailable"}
_FRONTEND_KEY = web.AppKey("frontend", Frontend)
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                  "presence_penalty", "frequency_penalty", "repetition_penalty")


def error_response(kind: str, message: str, param: str | None = None) -> web.Response:
    status = _HTTP_STATUS[kind]
    body = {"error": {"message": message, "type": _ERROR_TYPE[kind], "param": param, "code": status}}
    return web.json_response(body, status=status)


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
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    fe.check_request(model=None, size_bytes=len(raw))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required (see /v1/models)", param="model")
    fe.check_request(model=model, size_bytes=len(raw))
    if body.get("n", 1) != 1:
        raise InvalidRequest(f"n must be 1, got {body.get('n')!r}", param="n")
    return body


def _sampling(body: dict[str, Any], *, chat: bool):
    kw = {k: body[k] for k in _SAMPLING_KEYS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    if chat:
        if body.get("logprobs"):
            kw["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
    return make_sampling_params(**kw)


def _prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return None, p
    raise InvalidRequest("prompt must be a string or a list of token ids (one prompt per request)",
                         param="prompt")


async def _completions(request: web.Request) -> web.StreamResponse:
    fe = request.app[_FRONTEND_KEY]
    try:
        body = await _read_json(request, fe)
        if body.get("echo"):
            raise InvalidRequest("echo is not supported", param="echo")
        prompt, ids = _prompt(body)
        params = _sampling(body, chat=False)
    except ServingError as e:
        return error_response(e.kind, str(e), e.param)
    return await _run(request, fe, body, prompt, ids, params, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    fe = request.app[_FRONTEND_KEY]
    try:
        body = await _read_json(request, fe)
        prompt = render_chat(body.get("messages"), fe.served.tokenizer)
        params = _sampling(body, chat=True)
    except ServingError as e:
        return error_response(e.kind, str(e), e.param)
    return await _run(request, fe, body, prompt, None, params, chat=True)


async def _run(request: web.Request, fe: Frontend, body: dict, prompt, ids, params, *, chat: bool
               ) -> web.StreamResponse:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    outputs = fe.generate(prompt=prompt, prompt_token_ids=ids, params=params, request_id=rid)
    async with contextlib.aclosing(outputs):
        return await _respond(request, fe, body, outputs, rid, params, chat=chat)


async def _respond(request: web.Request, fe: Frontend, body: dict, outputs: AsyncIterator[RequestOutput], rid: str,
                   params, *, chat: bool) -> web.StreamResponse:
    stream = bool(body.get("stream"))
    created = int(time.time())
    try:
        first = await outputs.__anext__()
    except ServingError as e:
        return error_response(e.kind, str(e), e.param)
    tok = fe.served.tokenizer
    want_logprobs = params.logprobs is not None
    if not stream:
        text, last = first.text_delta, first
        async for out in outputs:
            text += out.text_delta
            last = out
        usage = _usage(last)
        lp = _logprobs(last.token_ids, last.logprobs, tok, chat) if want_logprobs else None
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": last.finish_reason}
        return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": fe.served.name, "choices": [choice],
                                  "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def send(choice: dict, usage: dict | None = None) -> None:
        chunk = {"id": rid, "object": obj, "created": created, "model": fe.served.name,
                 "choices": [choice] if choice else []}
        if usage is not None:
            chunk["usage"] = usage
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    if chat:
        await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None})
    async for out in _chain(first, outputs):
        lp = _logprobs(out.new_token_ids, out.logprobs, tok, chat) if want_logprobs and out.new_token_ids else None
        if out.text_delta or out.finished or lp:
            reason = out.finish_reason if out.finished else None
            if chat:
                delta = {"content": out.text_delta} if out.text_delta else {}
                await send({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason})
            else:
                await send({"index": 0, "text": out.text_delta, "logprobs": lp, "finish_reason": reason})
        if out.finished and include_usage:
            await send({}, usage=_usage(out))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _chain(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    if not first.finished:
        async for out in rest:
            yield out


def _usage(out: RequestOutput) -> dict[str, int]:
    p, c = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprobs(token_ids: list[int], logprobs: list[dict[int, float]] | None, tok: Any, chat: bool) -> dict | None:
    """OpenAI logprobs of the last len(token_ids) entries (completions or chat layout)."""
    if not logprobs or not token_ids:
        return None
    entries = logprobs[len(logprobs) - len(token_ids):]

    def text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False) if tok is not None else str(t)

    if chat:
        return {"content": [{"token": text(t), "logprob": e.get(t, 0.0), "bytes": list(text(t).encode()),
                             "top_logprobs": [{"token": text(k), "logprob": v, "bytes": list(text(k).encode())}
                                              for k, v in sorted(e.items(), key=lambda kv: -kv[1])]}
                            for t, e in zip(token_ids, entries)]}
    return {"tokens": [text(t) for t in token_ids], "token_logprobs": [e.get(t, 0.0) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{text(k): v for k, v in e.items()} for e in entries], "text_offset": []}


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

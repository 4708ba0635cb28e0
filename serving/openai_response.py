"""Running the choices of one OpenAI request and shaping what comes back.

Owns:
  - `Choices`: the engine streams of a request's choices (n per prompt), run concurrently into one
    event queue; admission is all or nothing (if any choice is refused, every other is aborted and
    the request gets that one error), and closing it aborts whatever still runs.
  - `ChoiceState`: one choice's accumulated text, tokens, logprobs and text offsets, with echo
    (the prompt, and with logprobs its per-token logprobs, before the completion) and
    prompt-only (echo with max_tokens=0: the generated token is dropped).
  - The OpenAI logprobs layouts: completions (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`; the first prompt token has None, as in vLLM) and chat (`content` entries), and
    the usage block (prompt tokens counted once per prompt, completion tokens over every choice).

`text_offset[i]` is the character offset of token i in the choice's text, counted as the
cumulative length of the tokens' decoded strings (vLLM's rule; it starts at 0 with the prompt when
echoing, else at the completion's start).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

from absl import logging

from distserve_jax.engine.output_processor import RequestOutput
from serving.convert import ServingError
from serving.openai_request import OpenAIRequest

# Which refusal a request with several choices reports when they differ (bad input first: retrying
# it cannot help).
_KIND_ORDER = {"invalid": 0, "unavailable": 1, "overloaded": 2}


class Choices:
    """The concurrently running engine streams of one request's choices.

    `start(make_stream)` opens choice i's stream with `make_stream(i)`; `admit()` waits for every
    choice's first output and raises the most relevant `ServingError` if any was refused (all
    are then aborted). `events()` yields `(choice, RequestOutput)` until every choice finished.
    """

    def __init__(self, num: int):
        self.num = num
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffered: list[tuple[int, Any]] = []
        self._open = num

    def start(self, make_stream: Callable[[int], AsyncIterator[RequestOutput]]) -> None:
        self._tasks = [asyncio.ensure_future(self._run(i, make_stream(i))) for i in range(self.num)]

    async def _run(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        async with contextlib.aclosing(stream):
            try:
                async for out in stream:
                    self._queue.put_nowait((index, out))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - delivered to the handler
                self._queue.put_nowait((index, e))
                return
        self._queue.put_nowait((index, None))

    async def admit(self) -> None:
        """Waits for every choice's first event; raises (after aborting all) if any was refused."""
        seen: set[int] = set()
        errors: list[BaseException] = []
        while len(seen) < self.num:
            index, item = await self._queue.get()
            if index not in seen:
                seen.add(index)
                if isinstance(item, BaseException):
                    errors.append(item)
                    continue
            self._buffered.append((index, item))
        if errors:
            await self.close()
            serving = [e for e in errors if isinstance(e, ServingError)]
            if serving:
                raise min(serving, key=lambda e: _KIND_ORDER.get(e.kind, 9))
            raise errors[0]

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`(choice, output)` in arrival order until every choice has finished; a choice's failure raises."""
        pending = list(self._buffered)
        self._buffered.clear()
        while self._open:
            index, item = pending.pop(0) if pending else await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield index, item

    async def close(self) -> None:
        """Cancels every choice still running (which aborts its request in the engine)."""
        for t in self._tasks:
            t.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                logging.warning("a choice ended with %r while closing", r)


class ChoiceState:
    """One choice's output so far, in the layout of its endpoint."""

    def __init__(self, req: OpenAIRequest, prompt_index: int, tokenizer: Any):
        self.req = req
        self.prompt_text = req.prompts[prompt_index][0]
        self.tok = tokenizer
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.offset = 0  # text_offset of the next token
        self.started = False
        self.lp_tokens: list[str] = []
        self.lp_values: list[float | None] = []
        self.lp_top: list[dict | None] = []
        self.lp_chat: list[dict] = []

    def token_text(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False) if self.tok is not None else str(t)

    def add(self, out: RequestOutput) -> tuple[str, dict | None]:
        """Adds one engine output; returns (text delta, logprobs delta) as the client sees them."""
        text = ""
        lp_tokens, lp_entries = [], []
        if not self.started:
            self.started = True
            self.prompt_tokens = len(out.prompt_token_ids)
            if self.req.echo:
                text = self.prompt_text
                if text is None:
                    text = self.tok.decode(out.prompt_token_ids, skip_special_tokens=False) if self.tok else ""
                if self.req.logprobs is not None:
                    plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                    lp_tokens, lp_entries = list(out.prompt_token_ids), list(plp)
        new_ids = [] if self.req.prompt_only else list(out.new_token_ids)
        if not self.req.prompt_only:
            text += out.text_delta
            self.token_ids.extend(new_ids)
            if self.req.logprobs is not None and new_ids:
                entries = (out.logprobs or [])[-len(new_ids):]
                lp_tokens += new_ids
                lp_entries += entries + [{}] * (len(new_ids) - len(entries))
        if out.finished:
            self.finish_reason = out.finish_reason
        self.text += text
        lp = self._logprobs(lp_tokens, lp_entries) if self.req.logprobs is not None and lp_tokens else None
        return text, lp

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float] | None]) -> dict:
        if self.req.chat:
            content = []
            for t, e in zip(token_ids, entries):
                e = e or {}
                s = self.token_text(t)
                top = sorted(e.items(), key=lambda kv: -kv[1])
                content.append({"token": s, "logprob": e.get(t, 0.0), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": self.token_text(k), "logprob": v,
                                                  "bytes": list(self.token_text(k).encode())} for k, v in top]})
            self.lp_chat += content
            return {"content": content}
        tokens, values, tops, offsets = [], [], [], []
        for t, e in zip(token_ids, entries):
            s = self.token_text(t)
            tokens.append(s)
            values.append(None if e is None else e.get(t, 0.0))
            tops.append(None if e is None else {self.token_text(k): v for k, v in e.items()})
            offsets.append(self.offset)
            self.offset += len(s)
        self.lp_tokens += tokens
        self.lp_values += values
        self.lp_top += tops
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def full_logprobs(self) -> dict | None:
        """The whole choice's logprobs (non-streaming responses)."""
        if self.req.logprobs is None:
            return None
        if self.req.chat:
            return {"content": self.lp_chat}
        offsets, pos = [], 0
        for s in self.lp_tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": self.lp_tokens, "token_logprobs": self.lp_values, "top_logprobs": self.lp_top,
                "text_offset": offsets}


def usage(states: list[ChoiceState], n: int) -> dict[str, int]:
    """Prompt tokens once per prompt (choices come n per prompt), completion tokens of every choice."""
    p = sum(s.prompt_tokens for i, s in enumerate(states) if i % n == 0)
    c = sum(len(s.token_ids) for s in states)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

"""Turns sampled tokens into what a caller sees: incremental text, stop handling, finish reasons.

Owns each request's detokenizer state and applies the stop rules: stop token ids, EOS (unless
`ignore_eos`), stop strings (text is never returned past a stop string, so while streaming the
tail that could still become one is held back), `max_tokens` and the model's context length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from distserve_jax.sampling_params import SamplingParams


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step.

    `new_token_ids` / `text_delta` hold what this step added; `token_ids` / `text` the whole
    output so far. `logprobs` (when asked) has one dict token id -> logprob per generated token.
    `metrics` (timestamps, a dict) is set on the final output. `finish_reason` is "stop", "length",
    "abort", or "error" (with `error` saying why). `prompt_logprobs` (when
    `SamplingParams.prompt_logprobs` is set) is on the first output and on the final one: one entry
    per prompt token, None for the first, else a dict token id -> logprob holding the prompt token
    and the top ones.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    metrics: dict[str, Any] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None  # why, when finish_reason is "error" (the instance serving it failed)


class OutputProcessor:
    """Per-request detokenizing and stop checking for one engine."""

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.max_model_len = max_model_len
        self._state: dict[str, _State] = {}

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._state[request_id] = _State(params, prompt_ids, self.tokenizer)

    def drop(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def process(self, request_id: str, token_id: int, logprob: float, top: dict[int, float],
                prompt_logprobs: list[dict[int, float] | None] | None = None) -> tuple[RequestOutput, str | None]:
        """Adds one sampled token; returns the output delta and the finish reason (None if running).

        `prompt_logprobs` (the runner's, with a request's first token) goes out with the first
        output and the final one, when the request asked for them.
        """
        st = self._state[request_id]
        p = st.params
        send_prompt = None
        if p.prompt_logprobs is not None and st.prompt_logprobs is None:
            st.prompt_logprobs = prompt_logprobs if prompt_logprobs is not None else [None] * len(st.prompt_ids)
            send_prompt = st.prompt_logprobs
        st.token_ids.append(token_id)
        if p.logprobs is not None:
            entry = dict(top)
            entry[token_id] = logprob
            st.logprobs.append(entry)
        reason = None
        is_eos = token_id in self.eos and not p.ignore_eos
        if token_id in p.stop_token_ids or is_eos:
            reason = "stop"
            piece = ""  # the stop token's own text is not returned
        else:
            piece = st.detok(token_id)
        st.pending += piece
        if reason is None and p.stop:
            hit = _find_stop(st.emitted + st.pending, p.stop, len(st.emitted) - _longest(p.stop))
            if hit is not None:
                cut, stop_str = hit
                keep = cut + (len(stop_str) if p.include_stop_str_in_output else 0)
                full = (st.emitted + st.pending)[:keep]
                st.pending = full[len(st.emitted):]
                reason = "stop"
        if reason is None and len(st.token_ids) >= p.max_tokens:
            reason = "length"
        if reason is None and len(st.prompt_ids) + len(st.token_ids) >= self.max_model_len:
            reason = "length"
        # Hold back a tail that may still grow into a stop string.
        hold = 0 if reason is not None or not p.stop else min(len(st.pending), _longest(p.stop) - 1)
        delta = st.pending[:len(st.pending) - hold]
        st.pending = st.pending[len(delta):]
        st.emitted += delta
        new_ids = st.token_ids[st.reported:]
        st.reported = len(st.token_ids)
        out = RequestOutput(request_id=request_id, prompt_token_ids=st.prompt_ids, token_ids=list(st.token_ids),
                            new_token_ids=new_ids, text=st.emitted, text_delta=delta, finished=reason is not None,
                            finish_reason=reason, logprobs=list(st.logprobs) if p.logprobs is not None else None,
                            prompt_logprobs=send_prompt)
        if reason is not None:
            out.prompt_logprobs = st.prompt_logprobs
            self.drop(request_id)
        return out, reason

    def is_plain(self, request_id: str) -> bool:
        """Whether a request's tokens need no per-token work here: no text (no tokenizer), no stop
        token ids, stop strings or EOS, no logprobs; only its length ends it (`process_plain`)."""
        st = self._state.get(request_id)
        if st is None or self.tokenizer is not None:
            return False
        p = st.params
        return (not p.stop and not p.stop_token_ids and (p.ignore_eos or not self.eos) and p.logprobs is None
                and p.prompt_logprobs is None)

    def process_plain(self, request_id: str, token_ids: Sequence[int]) -> tuple[RequestOutput, str | None, int]:
        """`process` over several tokens of a plain request (`is_plain`) at once: the output after
        them, the finish reason ("length" or None), and how many tokens were taken (a run stops at
        the token that ends the request, as one `process` call per token would)."""
        st = self._state[request_id]
        p = st.params
        room = min(p.max_tokens - len(st.token_ids), self.max_model_len - len(st.prompt_ids) - len(st.token_ids))
        n = len(token_ids) if room > len(token_ids) else max(room, 1)
        st.token_ids.extend(token_ids[:n])
        reason = "length" if n >= room else None
        new_ids = st.token_ids[st.reported:]
        st.reported = len(st.token_ids)
        out = RequestOutput(request_id=request_id, prompt_token_ids=st.prompt_ids, token_ids=list(st.token_ids),
                            new_token_ids=new_ids, text=st.emitted, text_delta="", finished=reason is not None,
                            finish_reason=reason)
        if reason is not None:
            self.drop(request_id)
        return out, reason, n

    def final_abort(self, request_id: str, prompt_ids: list[int]) -> RequestOutput:
        st = self._state.pop(request_id, None)
        ids = list(st.token_ids) if st else []
        text = st.emitted if st else ""
        return RequestOutput(request_id=request_id, prompt_token_ids=prompt_ids, token_ids=ids, new_token_ids=[],
                             text=text, text_delta="", finished=True, finish_reason="abort",
                             logprobs=list(st.logprobs) if st and st.params.logprobs is not None else None)


def _longest(stops: tuple[str, ...]) -> int:
    return max(len(s) for s in stops)


def _find_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string starting at or after `search_from`."""
    best = None
    start = max(0, search_from)
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


class _State:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], tokenizer: Any):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.emitted = ""
        self.pending = ""
        self.reported = 0
        self.prompt_logprobs: list | None = None  # set with the first token, when asked for
        self._tok = tokenizer
        self._read_offset = 0  # tokens of token_ids whose text is already in `emitted + pending`
        self._prefix_offset = 0

    def detok(self, token_id: int) -> str:
        """Stable new text after appending `token_id` (vLLM-style prefix/read offsets)."""
        if self._tok is None:
            return ""
        ids = self.token_ids
        prefix = self._tok.decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(ids[self._prefix_offset:], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        new = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return new

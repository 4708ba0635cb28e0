"""OpenAI request bodies -> validated requests: every field's JSON type, range and meaning is checked
here, before anything reaches the engine, so a bad body of any shape gets one `InvalidRequest`
(HTTP 400) that names the field and nothing is allocated.

Owns:
  - `check_json_tree`: the whole body, walked without recursion: nesting depth (`MAX_JSON_DEPTH`)
    and every string and key valid Unicode (JSON escapes such as `"\\ud800"` decode to lone
    surrogates, which no tokenizer accepts).
  - `parse_completion` / `parse_chat`: the supported parameters of /v1/completions and
    /v1/chat/completions (listed in the README), the refused ones (`REFUSED` below: a clear 400
    rather than a silently ignored option), and the unknown ones (ignored, as OpenAI-compatible
    servers do).
  - `OpenAIRequest`: prompts, sampling parameters, the number of choices and their seeds, and the
    response options (stream, usage, echo, logprobs).

`n > 1` is served as n independent requests (no shared prefill): choice i of a prompt samples with
seed `(seed + i) mod 2**32` when the request has a seed (so the choices differ but the response is
reproducible), and with an engine-assigned seed otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distserve_jax.models.tokenizer import unicode_problem
from distserve_jax.sampling_params import MAX_SEED, SamplingParams
from serving.chat import render_chat
from serving.convert import InvalidRequest, make_sampling_params

MAX_JSON_DEPTH = 32
# Sampling fields passed straight to `SamplingParams` (which checks their types and ranges).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "include_stop_str_in_output")
# Known parameters the server does not implement, with the values that mean "off" (accepted).
REFUSED = {
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "function_call": (None, "none"),
    "tool_choice": (None, "none", "auto"),
    "prompt_logprobs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} ({text})"


def check_json_tree(body: Any) -> None:
    """Refuses a body nested over `MAX_JSON_DEPTH` levels, or with a string or key that is not valid Unicode."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"request body is nested more than {MAX_JSON_DEPTH} levels deep (at {path})",
                                 param=_top(path))
        if isinstance(value, str):
            problem = unicode_problem(value)
            if problem is not None:
                raise InvalidRequest(f"{path or 'request body'} is not valid Unicode: {problem}", param=_top(path))
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and unicode_problem(key) is not None:
                    raise InvalidRequest(f"a key of {path or 'the request body'} is not valid Unicode: "
                                         f"{unicode_problem(key)}", param=_top(path) or None)
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _top(path: str) -> str | None:
    """The top-level field a path such as `messages[0].content` is in."""
    return path.split(".")[0].split("[")[0] or None


def _optional(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    """`body[key]` if it is of one of `kinds` (bool is never an int here), None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise InvalidRequest(f"{key} must be {what}, got {_describe(value)}", param=key)
    if not isinstance(value, kinds):
        raise InvalidRequest(f"{key} must be {what}, got {_describe(value)}", param=key)
    return value


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """A validated completions or chat request.

    Attributes:
      chat: /v1/chat/completions (else /v1/completions).
      prompts: one `(text, token_ids)` per prompt (exactly one of the two set); chat has one.
      params: the sampling parameters of choice 0 (see `choice_params` for the others).
      n: choices per prompt.
      stream, include_usage: server-sent events; a final usage chunk.
      echo: the prompt is returned before the completion (completions only).
      prompt_only: echo with max_tokens=0: the prompt (and its logprobs) only, nothing generated.
      logprobs: completions: top logprobs per token (None: no logprobs); chat: top_logprobs when
        logprobs is true.
    """

    chat: bool
    prompts: list[tuple[str | None, list[int] | None]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_only: bool = False
    logprobs: int | None = None

    @property
    def num_choices(self) -> int:
        return self.n * len(self.prompts)

    def choice_params(self, index: int) -> SamplingParams:
        """Sampling parameters of choice `index` of a prompt: seed + index (mod 2**32) when seeded."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + index) % (MAX_SEED + 1))


def _common(body: dict, *, chat: bool) -> dict[str, Any]:
    """The fields completions and chat share (refused ones, n, best_of, streaming, sampling)."""
    for key, allowed in REFUSED.items():
        value = body.get(key)
        if value not in allowed:
            raise InvalidRequest(f"{key} is not supported by this server (got {_describe(value)})", param=key)
    response_format = _optional(body, "response_format", (dict,), "an object")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise InvalidRequest(f"response_format {response_format.get('type')!r} is not supported (only 'text')",
                             param="response_format")
    _optional(body, "user", (str,), "a string")
    n = _optional(body, "n", (int,), "an integer")
    n = 1 if n is None else n
    if n < 1:
        raise InvalidRequest(f"n must be >= 1, got {n}", param="n")
    best_of = _optional(body, "best_of", (int,), "an integer")
    if best_of is not None and best_of != n:
        raise InvalidRequest(f"best_of={best_of} is not supported: only best_of = n (every sample is returned)",
                             param="best_of")
    stream = bool(_optional(body, "stream", (bool,), "a boolean"))
    options = _optional(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise InvalidRequest("stream_options can only be set when stream is true", param="stream_options")
    include_usage = False
    if options is not None:
        value = options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"stream_options.include_usage must be a boolean, got {_describe(value)}",
                                 param="stream_options")
        include_usage = bool(value)
    kw = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    max_tokens = _optional(body, "max_completion_tokens", (int,), "an integer") if chat else None
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", (int,), "an integer")
    return {"n": n, "stream": stream, "include_usage": include_usage, "kw": kw, "max_tokens": max_tokens}


def _check_choices(num: int, max_choices: int) -> None:
    if num > max_choices:
        raise InvalidRequest(f"n x prompts = {num} choices, more than this server runs at once ({max_choices}); "
                             f"send fewer prompts or a smaller n", param="n")


def parse_completion(body: dict, *, max_choices: int) -> OpenAIRequest:
    """A /v1/completions body (already `check_json_tree`d) -> `OpenAIRequest`."""
    c = _common(body, chat=False)
    prompts = _prompts(body.get("prompt"))
    _check_choices(c["n"] * len(prompts), max_choices)
    echo = bool(_optional(body, "echo", (bool,), "a boolean"))
    logprobs = _optional(body, "logprobs", (int,), "an integer (the number of top logprobs)")
    kw, max_tokens = c["kw"], c["max_tokens"]
    prompt_only = False
    if max_tokens == 0 and echo:
        prompt_only, max_tokens = True, 1  # one token is generated and dropped: the prompt is scored
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    if logprobs is not None:
        kw["logprobs"] = logprobs
        if echo:
            kw["prompt_logprobs"] = logprobs
    return OpenAIRequest(chat=False, prompts=prompts, params=make_sampling_params(**kw), n=c["n"],
                         stream=c["stream"], include_usage=c["include_usage"], echo=echo, prompt_only=prompt_only,
                         logprobs=logprobs)


def parse_chat(body: dict, tokenizer: Any, *, max_choices: int) -> OpenAIRequest:
    """A /v1/chat/completions body (already `check_json_tree`d) -> `OpenAIRequest` (the rendered prompt)."""
    c = _common(body, chat=True)
    if body.get("echo"):
        raise InvalidRequest("echo is supported by /v1/completions only", param="echo")
    _check_choices(c["n"], max_choices)
    prompt = render_chat(body.get("messages"), tokenizer)
    want = _optional(body, "logprobs", (bool,), "a boolean")
    top = _optional(body, "top_logprobs", (int,), "an integer")
    if top is not None and not want:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    kw, max_tokens = c["kw"], c["max_tokens"]
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    logprobs = (top or 0) if want else None
    if logprobs is not None:
        kw["logprobs"] = logprobs
    try:
        params = make_sampling_params(**kw)
    except InvalidRequest as e:
        if e.param == "logprobs":
            raise InvalidRequest(str(e).replace("logprobs", "top_logprobs", 1), param="top_logprobs") from None
        raise
    return OpenAIRequest(chat=True, prompts=[(prompt, None)], params=params, n=c["n"], stream=c["stream"],
                         include_usage=c["include_usage"], logprobs=logprobs)


def _prompts(p: Any) -> list[tuple[str | None, list[int] | None]]:
    """`prompt`: a string, a list of token ids, or a non-empty list of either (one choice set each)."""
    if isinstance(p, str) or _is_ids(p):
        return [_one_prompt(p)]
    if isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
        return [_one_prompt(x) for x in p]
    raise InvalidRequest(f"prompt must be a string, a non-empty list of token ids, or a list of those, "
                         f"got {_describe(p)}", param="prompt")


def _is_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _one_prompt(p: str | list[int]) -> tuple[str | None, list[int] | None]:
    return (p, None) if isinstance(p, str) else (None, list(p))

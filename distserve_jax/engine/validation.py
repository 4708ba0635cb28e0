"""Request validation: a prompt and its sampling parameters become a `Request`, or a ValueError
that names the problem (nothing is queued)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from distserve_jax.sampling_params import SamplingParams
from distserve_jax.scheduler.request import Request

if TYPE_CHECKING:  # the model source loads weights (JAX); a spec is only read here (the simulator passes its own)
    from distserve_jax.engine.model_source import ModelSpec


def validate_prompt(spec: ModelSpec, max_model_len: int, prompt: str | None,
                    prompt_token_ids: Sequence[int] | None) -> list[int]:
    """Tokenises and checks a prompt; raises ValueError naming the problem."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("pass exactly one of prompt or prompt_token_ids")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty")
        if spec.tokenizer is None:
            raise ValueError(f"model {spec.name!r} has no tokenizer; pass prompt_token_ids instead of text")
        ids = spec.tokenizer.encode(prompt)
    else:
        ids = list(prompt_token_ids)
        if not all(type(t) is int for t in ids):  # plain ints (the common case) need no conversion
            if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
                raise ValueError("prompt_token_ids must be integers")
            ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("prompt is empty (no tokens)")
    vocab = spec.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        bad = [t for t in ids if not 0 <= t < vocab]
        raise ValueError(f"prompt_token_ids has token id {bad[0]} outside the vocabulary [0, {vocab})")
    if len(ids) > max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context "
                         f"(max_model_len={max_model_len})")
    return ids


def build_request(spec: ModelSpec, max_model_len: int, max_kv_tokens: int, rng: np.random.Generator,
                  request_id: str, prompt: str | None, prompt_token_ids: Sequence[int] | None,
                  params: SamplingParams | None, arrival_time: float | None) -> Request:
    """A validated `Request` (ValueError naming the problem on bad input); assigns a seed if none."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    ids = validate_prompt(spec, max_model_len, prompt, prompt_token_ids)
    longest = min(len(ids) + params.max_tokens, max_model_len)
    if longest > max_kv_tokens:
        raise ValueError(f"request needs up to {longest} tokens of KV cache but an instance holds only "
                         f"{max_kv_tokens}; lower max_tokens or the prompt length")
    seed = params.seed if params.seed is not None else int(rng.integers(0, 2**31 - 1))
    # The output processor ends a request at max_tokens or at the context length, after at least one token.
    max_tokens = max(1, min(params.max_tokens, max_model_len - len(ids)))
    return Request(request_id=request_id, prompt_token_ids=ids, sampling=params, seed=seed,
                   arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
                   max_tokens=max_tokens)

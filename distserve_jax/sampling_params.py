"""Per-request sampling parameters (pure Python, no JAX).

Owns `SamplingParams`: what a client asks for (temperature, top-k/top-p/min-p, seed,
length and stop conditions, logprobs, penalties), validated once when the request enters the
system, so that the scheduler, the engine and the on-device sampler
(`distserve_jax.runtime.sampling`) can trust every field. Field meanings follow vLLM's
`SamplingParams` and the OpenAI API.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

# Largest number of top logprobs a request may ask for (the OpenAI API limit).
MAX_LOGPROBS = 20
# Seeds are fed to `jax.random.key` as uint32 on device.
MAX_SEED = 2**32 - 1
# Bounds of presence/frequency penalties (the OpenAI API range).
MAX_ABS_PENALTY = 2.0


def _check_float(name: str, value: Any) -> float:
    """Returns `value` as a finite Python float, or raises naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def _check_int(name: str, value: Any) -> int:
    """Returns `value` as a Python int (bools and floats are rejected), or raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _normalise_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise ValueError(
            f"stop must be a string, a sequence of strings or None, got {type(value).__name__}")
    result = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"stop must contain only strings, got {type(item).__name__} {item!r}")
        if not item:
            raise ValueError("stop must not contain empty strings")
        result.append(item)
    return tuple(result)


def _normalise_stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"stop_token_ids must be a sequence of ints, got {type(value).__name__} {value!r}")
    result = []
    for item in value:
        token = _check_int("stop_token_ids", item)
        if token < 0:
            raise ValueError(f"stop_token_ids must be >= 0, got {token}")
        result.append(token)
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output tokens. Immutable and hashable.

    Attributes:
      temperature: Softmax temperature, >= 0. 0 means greedy (argmax); then top_p, top_k,
        min_p and seed have no effect.
      top_p: Nucleus sampling: keep the smallest set of most likely tokens whose probability
        (after top-k) adds up to at least top_p. In (0, 1]; 1 = off.
      top_k: Keep only the top_k most likely tokens. -1 = off, otherwise >= 1 (values above
        the vocabulary size act as off).
      min_p: Keep only tokens whose probability is at least min_p times that of the most
        likely token. In [0, 1]; 0 = off.
      seed: Seed of this request's random stream, in [0, 2**32 - 1]. With a seed the output
        depends only on (seed, model, prompt, params), not on the batch it runs in. None:
        the engine assigns a seed per request.
      max_tokens: Largest number of tokens to generate, >= 1.
      stop: Strings that end generation when they appear in the output. Normalised to a
        tuple of non-empty strings (a single string becomes a 1-tuple, None becomes ()).
      stop_token_ids: Token ids that end generation (besides EOS). Normalised to a tuple.
      ignore_eos: Keep generating after the EOS token (until max_tokens or a stop).
      logprobs: Number of most likely tokens whose logprobs are returned for each generated
        token, besides the sampled token's own logprob (which is returned whenever logprobs
        is not None). In [0, 20]; None = no logprobs.
      presence_penalty: Subtracted from the logit of every token generated so far.
        In [-2, 2]; 0 = off.
      frequency_penalty: Subtracted from a token's logit once per time it was generated so
        far. In [-2, 2]; 0 = off.
      repetition_penalty: Multiplicative penalty (HF/vLLM style) on tokens seen in the prompt
        or the output: positive logits are divided by it, negative ones multiplied. > 0;
        1 = off.
      include_stop_str_in_output: Whether a matched stop string is kept in the output text.
      prompt_logprobs: Number of most likely tokens whose logprobs are returned for each prompt
        position, besides the prompt token's own logprob (vLLM's `prompt_logprobs`): entry i is
        the distribution of prompt token i given the tokens before it; entry 0 is None. In
        [0, 20]; None = off. Computing them takes the logits of every prompt position, so only
        requests that ask for them pay for it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # The dataclass is frozen.
            object.__setattr__(self, name, value)

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        set_("temperature", temperature)

        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        set_("top_p", top_p)

        top_k = _check_int("top_k", self.top_k)
        if top_k == 0 or top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {top_k}")
        set_("top_k", top_k)

        min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        set_("min_p", min_p)

        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
            set_("seed", seed)

        max_tokens = _check_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        set_("max_tokens", max_tokens)

        set_("stop", _normalise_stop(self.stop))
        set_("stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        set_("ignore_eos", _check_bool("ignore_eos", self.ignore_eos))

        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
            set_("logprobs", logprobs)

        if self.prompt_logprobs is not None:
            prompt_logprobs = _check_int("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {prompt_logprobs}")
            set_("prompt_logprobs", prompt_logprobs)

        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _check_float(name, getattr(self, name))
            if not -MAX_ABS_PENALTY <= penalty <= MAX_ABS_PENALTY:
                raise ValueError(
                    f"{name} must be in [{-MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {penalty}")
            set_(name, penalty)

        repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        set_("repetition_penalty", repetition_penalty)

        set_("include_stop_str_in_output",
             _check_bool("include_stop_str_in_output", self.include_stop_str_in_output))

    @property
    def is_greedy(self) -> bool:
        """True when the output is the argmax at every step (temperature == 0)."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when any of the presence/frequency/repetition penalties is on.

        The runtime needs per-token counts (`PenaltyInputs`) only for such requests.
        """
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

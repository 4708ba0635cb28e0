"""The workload request type, the tokenizer contract and argument checks shared by loaders.

A workload is a list of `WorkloadRequest`s: what to send (prompt text and/or token ids),
how many tokens to ask for, and when (arrival_time, stamped by `arrivals.with_arrivals`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Anything with `encode(text) -> list[int]`.

    A Hugging Face `transformers` tokenizer qualifies (its `encode` adds special tokens such
    as BOS by default, which is what vLLM's and DistServe's benchmarks count). A
    `tokenizers.Tokenizer`, whose `encode` returns an `Encoding`, is accepted too: its
    `.ids` are used.
    """

    def encode(self, text: str) -> Any: ...


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` under `tokenizer` (see `Tokenizer`)."""
    out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)
    return [int(t) for t in ids]


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    Attributes:
      prompt: prompt text, or None for synthetic workloads made of token ids.
      prompt_token_ids: prompt token ids ([prompt_len] ints), or None when not generated.
      prompt_len: prompt length in tokens.
      max_tokens: output length to generate (the request's max_tokens), >= 1.
      arrival_time: seconds from the start of the run at which the request is issued.
    """

    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_len: int
    max_tokens: int
    arrival_time: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"prompt_token_ids has {len(self.prompt_token_ids)} ids, "
                             f"prompt_len is {self.prompt_len}")
        if not math.isfinite(self.arrival_time) or self.arrival_time < 0:
            raise ValueError(f"arrival_time must be finite and >= 0, got {self.arrival_time}")

    @property
    def total_len(self) -> int:
        """prompt_len + max_tokens: the sequence length the request can reach."""
        return self.prompt_len + self.max_tokens


def check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_rate(rate: float) -> None:
    if not rate > 0 or math.isnan(rate):
        raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")


def check_lengths_fit(prompt_lens: Sequence[int], output_lens: Sequence[int],
                      max_model_len: int) -> None:
    """Raises ValueError if some prompt + output exceeds `max_model_len`."""
    for p, o in zip(prompt_lens, output_lens):
        if p + o > max_model_len:
            raise ValueError(f"prompt_len {p} + output_len {o} exceeds max_model_len "
                             f"{max_model_len}")

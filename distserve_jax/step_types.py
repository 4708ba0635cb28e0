"""The plain data of a runner step, with no JAX: what an engine hands a runner (`SeqWork`) and what
it gets back (`SampleResult`).

Like `sampling_params`, it sits below every layer: the real `ModelRunner` (runtime) and the
planner's simulated runner both speak it, so the workers and the step launcher (engine) import no
runtime and the simulator runs them without JAX."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from distserve_jax.sampling_params import SamplingParams


@dataclasses.dataclass
class SeqWork:
    """One sequence's share of a step.

    Attributes:
      token_ids: tokens fed this step (a prompt, a prompt chunk, or the last sampled token).
      context_len: tokens of this sequence already in the KV cache.
      block_table: KV block ids holding the sequence (enough for context + new tokens).
      sampling: how to sample the next token.
      seed: the request's seed (used when `sampling.seed` is None).
      num_generated: tokens generated so far (the sampler's per-request RNG counter).
      sample: False for a prompt chunk that does not reach the end of the prompt.
      prompt_ids, output_ids: the request's tokens, read only when penalties are on.
      prev_row: feed the token sampled for row `prev_row` of the step passed to `launch` as
        `prev` (still on the device) instead of `token_ids`, which must then be one placeholder.
    """

    token_ids: Sequence[int]
    context_len: int
    block_table: Sequence[int]
    sampling: SamplingParams
    seed: int = 0
    num_generated: int = 0
    sample: bool = True
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    prev_row: int | None = None


@dataclasses.dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float]  # empty unless asked for

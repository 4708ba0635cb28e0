"""On-device token sampling, run inside the jitted step functions.

Owns the device-side view of `SamplingParams`:
- `SamplingTensors`: per-row sampling parameters of a padded batch as arrays (a pytree).
- `PenaltyInputs`: per-row token counts for presence/frequency/repetition penalties.
- `apply_penalties`, `apply_top_k_top_p_min_p`: the logit transforms, usable on their own.
- `sample`: logits -> token ids, the sampled token's logprob and the top-n logprobs, with no
  per-request Python (one compiled program per shape; the runtime compiles a separate variant
  with penalties, used only when some row of the batch has a penalty on).
- `sample_with_feed`: `sample`, plus the token ids padded to a fixed length, which the next
  step reads on the device when it is launched before this one is fetched.

Randomness: row i draws with the key `fold_in(key(seeds[i]), step[i])`, where `step[i]` is the
number of tokens the request has generated so far. So a seeded request produces the same
tokens whatever else is in the batch and whichever row it occupies, on any instance (prefill
draws step 0, decode continues with 1, 2, ...). Requests without a seed get one from the
engine when they arrive, so every row always has a seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distserve_jax.sampling_params import SamplingParams

Array = jax.Array | np.ndarray

_ROW_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seeds", "step",
               "presence_penalty", "frequency_penalty", "repetition_penalty")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_ROW_FIELDS),
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Sampling parameters of a batch of B rows, one array entry per row.

    Attributes:
      temperature: [B] float32; 0 = greedy.
      top_p: [B] float32 in (0, 1]; 1 = off.
      top_k: [B] int32 in [1, V]; V (the vocabulary size) = off.
      min_p: [B] float32 in [0, 1]; 0 = off.
      seeds: [B] uint32, the request's seed.
      step: [B] int32, tokens the request has generated so far (the RNG counter).
      presence_penalty: [B] float32; 0 = off.
      frequency_penalty: [B] float32; 0 = off.
      repetition_penalty: [B] float32 > 0; 1 = off.
    """

    temperature: Array
    top_p: Array
    top_k: Array
    min_p: Array
    seeds: Array
    step: Array
    presence_penalty: Array
    frequency_penalty: Array
    repetition_penalty: Array

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])

    @classmethod
    def from_params(cls, params_list: Sequence[SamplingParams], steps: Sequence[int],
                    vocab_size: int, pad_to: int, *,
                    seeds: Sequence[int | None] | None = None) -> SamplingTensors:
        """Builds host (numpy) arrays for a batch, padded to `pad_to` rows.

        Args:
          params_list: One `SamplingParams` per real row.
          steps: Tokens generated so far by each row's request.
          vocab_size: V; top_k = -1 or top_k > V becomes V.
          pad_to: Number of rows B >= len(params_list); padding rows are greedy with every
            filter and penalty off.
          seeds: Seeds the engine assigned, used for rows whose params have seed None
            (a params' own seed wins). Every non-greedy row must end up with a seed
            (greedy rows without one get 0: they draw nothing).

        Raises:
          ValueError: on mismatched lengths, negative steps, a non-greedy row without a
            seed, or bad vocab_size/pad_to.
        """
        n = len(params_list)
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(pad_to, int) or pad_to < max(n, 1):
            raise ValueError(f"pad_to must be an int >= max(1, len(params_list)={n}), "
                             f"got {pad_to!r}")
        if len(steps) != n:
            raise ValueError(f"steps has {len(steps)} entries for {n} params")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"seeds has {len(seeds)} entries for {n} params")

        arrays = {
            "temperature": np.zeros(pad_to, np.float32),
            "top_p": np.ones(pad_to, np.float32),
            "top_k": np.full(pad_to, vocab_size, np.int32),
            "min_p": np.zeros(pad_to, np.float32),
            "seeds": np.zeros(pad_to, np.uint32),
            "step": np.zeros(pad_to, np.int32),
            "presence_penalty": np.zeros(pad_to, np.float32),
            "frequency_penalty": np.zeros(pad_to, np.float32),
            "repetition_penalty": np.ones(pad_to, np.float32),
        }
        for i, (params, step) in enumerate(zip(params_list, steps)):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"params_list[{i}] is a {type(params).__name__}, "
                                 "not SamplingParams")
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                raise ValueError(f"steps[{i}] must be an int >= 0, got {step!r}")
            seed = params.seed if params.seed is not None else (
                seeds[i] if seeds is not None else None)
            if seed is None and params.is_greedy:
                seed = 0  # Greedy rows draw nothing.
            if seed is None:
                raise ValueError(f"row {i} has no seed: params.seed is None and no engine "
                                 "seed was passed in `seeds`")
            # Re-validates an engine-assigned seed with the same rules as params.seed.
            seed = SamplingParams(seed=seed).seed
            arrays["temperature"][i] = params.temperature
            arrays["top_p"][i] = params.top_p
            arrays["top_k"][i] = vocab_size if params.top_k == -1 else min(params.top_k,
                                                                          vocab_size)
            arrays["min_p"][i] = params.min_p
            arrays["seeds"][i] = seed
            arrays["step"][i] = step
            arrays["presence_penalty"][i] = params.presence_penalty
            arrays["frequency_penalty"][i] = params.frequency_penalty
            arrays["repetition_penalty"][i] = params.repetition_penalty
        return cls(**arrays)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["output_counts", "prompt_mask"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PenaltyInputs:
    """Per-row token statistics the penalties need.

    Attributes:
      output_counts: [B, V] int32, how often each token was generated so far by the request.
      prompt_mask: [B, V] bool, whether the token appears in the request's prompt.
    """

    output_counts: Array
    prompt_mask: Array

    @classmethod
    def from_token_lists(cls, prompt_ids_list: Sequence[Sequence[int]],
                         output_ids_list: Sequence[Sequence[int]], vocab_size: int,
                         pad_to: int) -> PenaltyInputs:
        """Builds host (numpy) arrays from token id lists; padding rows are all zero/False.

        Raises:
          ValueError: on mismatched lengths, bad vocab_size/pad_to, or a token id outside
            [0, vocab_size).
        """
        n = len(prompt_ids_list)
        if len(output_ids_list) != n:
            raise ValueError(f"output_ids_list has {len(output_ids_list)} rows, "
                             f"prompt_ids_list has {n}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(pad_to, int) or pad_to < max(n, 1):
            raise ValueError(f"pad_to must be an int >= max(1, number of rows={n}), "
                             f"got {pad_to!r}")
        counts = np.zeros((pad_to, vocab_size), np.int32)
        prompt_mask = np.zeros((pad_to, vocab_size), bool)
        for i, (prompt_ids, output_ids) in enumerate(zip(prompt_ids_list, output_ids_list)):
            prompt = _token_array(prompt_ids, vocab_size, f"prompt_ids_list[{i}]")
            output = _token_array(output_ids, vocab_size, f"output_ids_list[{i}]")
            counts[i] = np.bincount(output, minlength=vocab_size)
            prompt_mask[i] = np.bincount(prompt, minlength=vocab_size) > 0
        return cls(output_counts=counts, prompt_mask=prompt_mask)


def _token_array(ids: Sequence[int], vocab_size: int, name: str) -> np.ndarray:
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got dtype {array.dtype} "
                         f"shape {array.shape}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"{name} has token ids outside [0, {vocab_size}): "
                         f"min {array.min()}, max {array.max()}")
    return array.astype(np.int64)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["token_ids", "logprobs", "top_ids", "top_logprobs"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What `sample` returns for a batch of B rows and n = num_top_logprobs.

    Attributes:
      token_ids: [B] int32, the sampled tokens.
      logprobs: [B] float32, log-prob of the sampled token under the raw model distribution
        (log_softmax of the unprocessed logits: no penalties, temperature or filters).
      top_ids: [B, n] int32, the n most likely tokens under that raw distribution, most likely
        first.
      top_logprobs: [B, n] float32, their log-probs (descending).
    """

    token_ids: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def apply_penalties(logits: jax.Array, t: SamplingTensors,
                    penalties: PenaltyInputs) -> jax.Array:
    """Applies repetition, frequency and presence penalties, in vLLM's order.

    For tokens seen in the prompt or the output, logit / r if logit > 0 else logit * r (r the
    repetition penalty); then logit -= frequency * count and logit -= presence * (count > 0),
    count being the token's output count.

    Args:
      logits: [B, V] float32.
      t: the batch's sampling tensors (uses the three penalty fields).
      penalties: counts and prompt mask, [B, V] each.

    Returns:
      [B, V] float32 penalised logits.
    """
    counts = penalties.output_counts
    in_output = counts > 0
    seen = jnp.logical_or(penalties.prompt_mask, in_output)
    # A [B, V] divisor, as in vLLM: dividing by a broadcast [B, 1] lets XLA rewrite x / r as
    # x * (1 / r), which is up to one ulp away from the division the references do.
    rep = jnp.where(seen, t.repetition_penalty[:, None].astype(logits.dtype), 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - t.frequency_penalty[:, None] * counts.astype(logits.dtype)
    logits = logits - t.presence_penalty[:, None] * in_output.astype(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                            min_p: jax.Array) -> jax.Array:
    """Sets logits outside the top-k / top-p / min-p sets to -inf, from one descending sort.

    The kept set of a row is the intersection of: the top_k most likely tokens; the smallest
    prefix of the (top-k renormalised) distribution, most likely first, whose probability
    reaches top_p (a token is kept when the mass strictly before it is < top_p); the tokens
    with probability >= min_p * (largest probability). The most likely token is always kept.
    Ties are broken towards the lower token id.

    Args:
      logits: [B, V] float32, already divided by the temperature.
      top_k: [B] int32 (V = off). top_p: [B] float32 (1 = off). min_p: [B] float32 (0 = off).

    Returns:
      [B, V] float32 logits with removed tokens at -inf.
    """
    batch, vocab = logits.shape
    order = jnp.argsort(logits, axis=-1, descending=True, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    keep = rank < top_k[:, None]
    # Top-p over the distribution renormalised after top-k.
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros((batch, 1), probs.dtype), cumulative[:, :-1]],
                                  axis=-1)
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # Min-p: p_i / p_max does not change under renormalisation, so use the sorted logits.
    keep &= jnp.exp(sorted_logits - sorted_logits[:, :1]) >= min_p[:, None]
    keep = keep.at[:, 0].set(True)
    rows = jnp.arange(batch)[:, None]
    kept = jnp.zeros_like(keep).at[rows, order].set(keep)
    return jnp.where(kept, logits, -jnp.inf)


def row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of one row's draw: fold_in(key(seed), step). Scalar in, scalar key out."""
    return jax.random.fold_in(jax.random.key(seed), step)


def _random_tokens(logits: jax.Array, t: SamplingTensors,
                   greedy_tokens: jax.Array) -> jax.Array:
    """[B] tokens: Gumbel-max over the filtered, temperature-scaled logits; greedy rows keep
    `greedy_tokens`."""
    vocab = logits.shape[-1]
    is_greedy = t.temperature == 0
    temperature = jnp.where(is_greedy, 1.0, t.temperature).astype(logits.dtype)
    scaled = logits / temperature[:, None]
    needs_filter = jnp.any(~is_greedy & ((t.top_k < vocab) | (t.top_p < 1.0) | (t.min_p > 0)))
    scaled = jax.lax.cond(needs_filter, apply_top_k_top_p_min_p,
                          lambda x, *_: x, scaled, t.top_k, t.top_p, t.min_p)
    keys = jax.vmap(row_key)(t.seeds, t.step)
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), logits.dtype))(keys)
    sampled = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
    return jnp.where(is_greedy, greedy_tokens, sampled)


def _check_shapes(logits: jax.Array, t: SamplingTensors, penalties: PenaltyInputs | None,
                  num_top_logprobs: int) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    batch, vocab = logits.shape
    for name in _ROW_FIELDS:
        shape = getattr(t, name).shape
        if shape != (batch,):
            raise ValueError(f"SamplingTensors.{name} must have shape ({batch},), got {shape}")
    if penalties is not None:
        for name in ("output_counts", "prompt_mask"):
            shape = getattr(penalties, name).shape
            if shape != (batch, vocab):
                raise ValueError(f"PenaltyInputs.{name} must have shape ({batch}, {vocab}), "
                                 f"got {shape}")
    if (isinstance(num_top_logprobs, bool) or not isinstance(num_top_logprobs, int)
            or not 0 <= num_top_logprobs <= vocab):
        raise ValueError(f"num_top_logprobs must be an int in [0, {vocab}], "
                         f"got {num_top_logprobs!r}")


def sample(logits: jax.Array, t: SamplingTensors, *, num_top_logprobs: int = 0,
           penalties: PenaltyInputs | None = None) -> SamplerOutput:
    """Samples one token per row. Jittable; `num_top_logprobs` must be static.

    Per row: penalties (when `penalties` is given), then greedy rows (temperature 0) take the
    argmax; other rows divide by the temperature, apply the top-k, top-p and min-p filters,
    and draw with the key `row_key(seeds[i], step[i])` by Gumbel-max. Batches of only greedy
    rows skip the sort and the draw; batches with no filter on skip the sort.

    Args:
      logits: [B, V] model logits (cast to float32).
      t: the batch's `SamplingTensors`, [B] each.
      num_top_logprobs: n, how many top logprobs to return per row (0..V).
      penalties: `PenaltyInputs` when some row has a penalty on, else None.

    Returns:
      `SamplerOutput` with token_ids [B], logprobs [B], top_ids [B, n], top_logprobs [B, n].
    """
    _check_shapes(logits, t, penalties, num_top_logprobs)
    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if penalties is not None:
        logits = apply_penalties(logits, t, penalties)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token_ids = jax.lax.cond(jnp.all(t.temperature == 0), lambda x, greedy: greedy,
                             lambda x, greedy: _random_tokens(x, t, greedy), logits,
                             greedy_tokens)
    token_logprobs = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]
    if num_top_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_top_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SamplerOutput(token_ids=token_ids, logprobs=token_logprobs,
                         top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)


def sample_with_feed(logits: jax.Array, t: SamplingTensors, *, feed_rows: int, num_top_logprobs: int = 0,
                     penalties: PenaltyInputs | None = None) -> tuple[SamplerOutput, jax.Array]:
    """`sample`, plus its token ids zero-padded to `[feed_rows]` int32: what a following step,
    launched before this one's output is fetched, reads its input tokens from."""
    out = sample(logits, t, num_top_logprobs=num_top_logprobs, penalties=penalties)
    if feed_rows < out.token_ids.shape[0]:
        raise ValueError(f"feed_rows={feed_rows} is smaller than the batch ({out.token_ids.shape[0]} rows)")
    padded = jnp.zeros(feed_rows, jnp.int32).at[:out.token_ids.shape[0]].set(out.token_ids)
    return out, padded

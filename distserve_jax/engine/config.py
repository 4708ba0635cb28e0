"""`EngineConfig`: an engine's limits, runtime sizes, scheduling policy and seed."""

from __future__ import annotations

import dataclasses

from distserve_jax.runtime.model_runner import RunnerConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and runtime sizes: every `RunnerConfig` field under the same name and default
    (`max_model_len` may be None: the model's context, capped at 2048), plus the scheduling policy,
    the engine's seed and whether steps are launched ahead (`async_scheduling`). A test keeps the
    two in step."""

    max_model_len: int | None = None  # None: the model's context, capped at 2048
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    dtype: str = "float32"
    attention_backend: str | None = None
    fuse_projections: bool = True
    policy: str = "prefill_first"  # or "chunked"
    seed: int = 0
    async_scheduling: bool = True  # launch step N+1 before fetching step N (every worker but pp>1 decode)

    def runner_config(self, model_max_len: int) -> RunnerConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunnerConfig)}
        shared["max_model_len"] = self.max_model_len or min(model_max_len, 2048)
        return RunnerConfig(**shared)

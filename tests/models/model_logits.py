"""Test helper: full-prompt logits of a checkpoint through the runtime (sharded weights, shard_map attention)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from distserve_jax.engine.model_source import resolve_model
from distserve_jax.runtime.model_runner import ModelRunner, RunnerConfig, SeqWork
from distserve_jax.runtime.sharding import make_mesh
from distserve_jax.sampling_params import SamplingParams


def runtime_logits(model_dir, ids: list[int], *, tp: int = 1, dtype: str = "float32", weights=None,
                   fuse_projections: bool = True) -> np.ndarray:
    """float32 logits `[len(ids), vocab]` for one prompt, computed on a tp-device mesh."""
    spec = resolve_model(model_dir)
    runner = ModelRunner(spec.config, [make_mesh(jax.devices()[:tp])], weights or spec.weights,
                         RunnerConfig(max_model_len=256, num_blocks=32, max_num_seqs=4, dtype=dtype,
                                      fuse_projections=fuse_projections))
    blocks = list(range(1, 1 + -(-len(ids) // 16)))
    tokens, meta = runner.build_inputs([SeqWork(ids, 0, blocks, SamplingParams())])
    meta = dataclasses.replace(meta, logits_indices=np.arange(len(ids), dtype=np.int32))
    return np.asarray(runner.forward(tokens, meta))

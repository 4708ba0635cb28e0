"""Where an instance's weights come from: a Hugging Face directory, an orbax checkpoint, or a seed.

Each source loads the parameters of a layer range straight into the target shardings of one
(sub-)mesh, so pipeline stages and tensor-parallel groups only ever hold their own part.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from jax.sharding import Mesh

from distserve_jax.models.config import ModelConfig
from distserve_jax.models import loader, orbax_io
from distserve_jax.runtime.sharding import param_shardings


class WeightSource(Protocol):
    def load(self, cfg: ModelConfig, mesh: Mesh, *, layer_start: int, layer_end: int, dtype: str) -> Any:
        """Parameters of layers `[layer_start, layer_end)` of `cfg` (a `for_tp` config) on `mesh`."""


@dataclasses.dataclass(frozen=True)
class HFDirectory:
    path: Path

    def load(self, cfg, mesh, *, layer_start, layer_end, dtype):
        return loader.load_safetensors_params(self.path, cfg, lambda a: param_shardings(a, mesh), dtype=dtype,
                                              layer_start=layer_start, layer_end=layer_end)


@dataclasses.dataclass(frozen=True)
class OrbaxDirectory:
    path: Path

    def load(self, cfg, mesh, *, layer_start, layer_end, dtype):
        return orbax_io.restore_params(self.path, cfg, lambda a: param_shardings(a, mesh), dtype=dtype,
                                       layer_start=layer_start, layer_end=layer_end)


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    seed: int = 0
    scale: float = 0.02

    def load(self, cfg, mesh, *, layer_start, layer_end, dtype):
        return loader.random_params(cfg, lambda a: param_shardings(a, mesh), seed=self.seed, dtype=dtype,
                                    scale=self.scale, layer_start=layer_start, layer_end=layer_end)

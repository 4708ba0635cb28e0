"""Tensor-parallel sharding rules for weights and the KV cache over a mesh axis named ``tp``.

Column-parallel: q/k/v, gate/up, fc1 (output features split). Row-parallel: o_proj/out_proj,
down/fc2 (input features split; XLA inserts the all-reduce). Vocab-parallel: embedding and LM
head (when tp divides the vocabulary; otherwise replicated). Norms, position embeddings and
OPT's project_in/out are replicated. KV pages are split over kv heads (which `ModelConfig.for_tp`
has already replicated up to tp when tp exceeds them).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP = "tp"
_COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1"}
_ROW = {"o_proj", "out_proj", "down_proj", "fc2"}


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], tp: int) -> P:
    """PartitionSpec of one parameter, from its path in the parameter tree and its shape."""
    names = set(path)
    leaf = path[-1]
    if names & _COLUMN:
        return P(None, TP) if leaf == "kernel" else P(TP)
    if names & _ROW:
        return P(TP, None) if leaf == "kernel" else P()
    if path[0] == "embed" and shape[0] % tp == 0:
        return P(TP, None)
    if path[0] == "lm_head" and shape[-1] % tp == 0:
        return P(None, TP)
    return P()


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """A pytree of `NamedSharding`s matching `abstract_params` (arrays or ShapeDtypeStructs)."""
    tp = mesh.shape[TP]
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, param_spec(_path_names(p), tuple(x.shape), tp)), abstract_params)


def kv_pages_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of one `[num_kv_heads, num_pages, page_size, head_dim]` page array."""
    return NamedSharding(mesh, P(TP, None, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def make_mesh(devices: list[jax.Device]) -> Mesh:
    """A 1-D ``tp`` mesh over `devices`."""
    import numpy as np
    return Mesh(np.asarray(devices), (TP,))

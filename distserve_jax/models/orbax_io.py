"""Save and restore model parameters in orbax format (with the model's `config.json` beside them).

A saved checkpoint holds the checkpoint-layout kv heads (no tp replication), so it can be
restored at any tp degree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from distserve_jax.models.config import ModelConfig
from distserve_jax.models.loader import _KV_MODULES, _names, abstract_params, check_dtype

_PARAMS = "params"


def save_params(params: Any, cfg: ModelConfig, directory: str | Path, *, hf_config: dict | None = None) -> Path:
    """Writes `params` (a full model, any sharding) to `directory/params` in orbax format.

    kv heads replicated for tp are collapsed back to the checkpoint's count first.
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)

    def collapse(path, x):
        names = _names(path)
        if cfg.kv_replication > 1 and set(names) & _KV_MODULES:
            arr = np.asarray(x)
            out_axis = arr.ndim - 1
            heads = arr.shape[out_axis] // cfg.head_dim
            arr = arr.reshape(arr.shape[:out_axis] + (heads, cfg.head_dim))
            arr = np.take(arr, np.arange(0, heads, cfg.kv_replication), axis=out_axis)
            return arr.reshape(arr.shape[:out_axis] + (-1,))
        return x

    host = jax.tree_util.tree_map_with_path(collapse, params)
    target = directory / _PARAMS
    if target.exists():
        shutil.rmtree(target)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(target, host)
    if hf_config is not None:
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory


def restore_params(directory: str | Path, cfg: ModelConfig, shardings_fn: Callable[[Any], Any], *,
                   dtype: str = "float32", layer_start: int = 0, layer_end: int | None = None) -> Any:
    """Restores the parameters of a layer range into the shardings given by `shardings_fn`."""
    check_dtype(dtype)
    directory = Path(directory).absolute() / _PARAMS
    if not directory.exists():
        raise FileNotFoundError(f"no orbax checkpoint at {directory}")
    abstract = abstract_params(cfg, layer_start, layer_end, dtype)
    shardings = shardings_fn(abstract)
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(directory)
        tree = getattr(meta, "item_metadata", meta)
        host = ckpt.restore(directory, jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), _subset(tree, abstract)))
    from distserve_jax.models.loader import _transform

    def place(path, x, leaf, sharding):
        names = _names(path)
        rep = cfg.kv_replication if set(names) & _KV_MODULES else 1
        arr = np.asarray(x)
        if rep > 1:
            arr = _transform(arr.T, True, rep, cfg.head_dim) if arr.ndim == 2 else _transform(arr, False, rep, cfg.head_dim)
        if tuple(arr.shape) != tuple(leaf.shape):
            raise ValueError(f"orbax tensor {'/'.join(names)} has shape {list(arr.shape)}, "
                             f"the config needs {list(leaf.shape)}")
        arr = arr.astype(leaf.dtype)
        return jax.make_array_from_callback(tuple(leaf.shape), sharding, lambda idx: np.ascontiguousarray(arr[idx]))

    return jax.tree_util.tree_map_with_path(place, host, abstract, shardings)


def _subset(tree: Any, abstract: Any) -> Any:
    """The entries of the saved tree that this stage needs (same keys as `abstract`)."""
    out = {}
    for k, v in abstract.items():
        if k not in tree:
            raise ValueError(f"orbax checkpoint has no entry {k!r}")
        out[k] = _subset(tree[k], v) if isinstance(v, dict) else tree[k]
    return out

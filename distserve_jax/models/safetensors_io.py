"""Reads Hugging Face safetensors checkpoints (single file or sharded with an index) lazily.

Tensors are memory-mapped, so loading never holds more than the slice a device asks for; the
header of every file is checked (offsets inside the file, known dtypes) before any tensor is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype tag -> numpy dtype; only floating types are model weights we load.
_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or holds something this loader cannot use."""


class SafetensorsCheckpoint:
    """Lazy view over all tensors of a checkpoint directory: `names()`, `shape()`, `get()`."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._entries: dict[str, tuple[Path, dict]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in self._files():
            for name, info in self._read_header(f).items():
                self._entries[name] = (f, info)

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise CheckpointError(f"safetensors shards listed in {index.name} are missing: {missing}")
            return [self.dir / f for f in files]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        return files

    @staticmethod
    def _read_header(path: Path) -> dict[str, dict]:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is truncated: no header")
            (hlen,) = struct.unpack("<Q", raw)
            if 8 + hlen > size:
                raise CheckpointError(f"{path.name} is truncated: header of {hlen} bytes past the end of the file")
            try:
                header = json.loads(fh.read(hlen))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path.name} has a corrupt header: {e}") from e
        header.pop("__metadata__", None)
        data_size = size - 8 - hlen
        out = {}
        for name, info in header.items():
            dtype = info.get("dtype")
            begin, end = info["data_offsets"]
            if end > data_size:
                raise CheckpointError(f"{path.name} is truncated: tensor {name!r} ends at byte {end} "
                                      f"but the file holds {data_size} data bytes")
            if dtype in _DTYPES:
                n = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[dtype].itemsize
                if end - begin != n:
                    raise CheckpointError(f"{path.name}: tensor {name!r} has {end - begin} bytes, "
                                          f"expected {n} for shape {info['shape']}")
            out[name] = {**info, "offset": 8 + hlen + begin}
        return out

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype_tag(self, name: str) -> str:
        return self._entries[name][1]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (no copy)."""
        path, info = self._entries[name]
        tag = info["dtype"]
        if tag not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {tag}; supported: {sorted(_DTYPES)}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        dt = _DTYPES[tag]
        n = int(np.prod(info["shape"], dtype=np.int64))
        buf = self._maps[path][info["offset"]: info["offset"] + n * dt.itemsize]
        return buf.view(dt).reshape(info["shape"])

"""Host (CPU) kernels in C++ called through XLA's FFI: paged decode attention and the KV write.

`cpu_kernels.cc` beside this file is compiled with the system C++ compiler the first time a
kernel is needed (a few seconds), cached under `~/.cache/distserve_jax/native/` (or
`$DISTSERVE_NATIVE_CACHE`) keyed by the source, the compiler, the flags and the host's CPU
features, and its handlers are registered as XLA custom-call targets for the ``cpu`` platform.

Kernels and their references (tests compare the two on fresh random inputs):
  - `paged_decode_attention(...)`: the `native` backend of `dispatch.py`; reference:
    `reference.paged_decode_attention_ref`.
  - `write_kv_pages(...)`: writes in place (outputs alias the page inputs, so a donated cache is
    never copied, whatever the token count); reference: `reference.write_kv_pages_ref`.
  - `gather_pages(...)`, `scatter_pages(...)`: whole pages by id out of one page array and into
    another (in place), the two ends of a KV pull; references: `reference.gather_pages_ref`,
    `reference.scatter_pages_ref`.

Everything here is float32; callers fall back to the XLA paths for other dtypes. `available()`
says whether the library built (the reason is logged once when it did not).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
CACHE_ENV = "DISTSERVE_NATIVE_CACHE"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
TARGETS = {"paged_decode": "DistservePagedDecodeF32", "write_kv": "DistserveWriteKVF32",
           "gather_pages": "DistserveGatherPagesF32", "scatter_pages": "DistserveScatterPagesF32"}

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distserve_jax" / "native"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    return cxx


def build() -> Path:
    """Compiles `cpu_kernels.cc` (or reuses the cached build); returns the shared library's path.

    Raises:
      NativeBuildError: no compiler, or the compiler failed (its output is in the message).
    """
    cxx = _compiler()
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, " ".join(FLAGS), include, jax.__version__,
                                    _cpu_features(), platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libdistserve_cpu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders (test workers) each finish with a whole file
    logging.info("built native CPU kernels: %s", out)
    return out


def load() -> ctypes.CDLL:
    """Builds (if needed), loads and registers the kernels once per process."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        if "error" in _state:
            raise _state["error"]  # type: ignore[misc]
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            for name, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(f"distserve_{name}_f32", jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
        except (NativeBuildError, OSError, AttributeError) as e:
            err = e if isinstance(e, NativeBuildError) else NativeBuildError(f"loading native CPU kernels: {e}")
            _state["error"] = err
            logging.warning("native CPU kernels unavailable, using XLA paths: %s", err)
            raise err from None
        _state["lib"] = lib
        return lib


def available() -> bool:
    """True when the kernels built and loaded (never raises)."""
    try:
        load()
        return True
    except NativeBuildError:
        return False


def _f32(*xs: jax.Array) -> None:
    for x in xs:
        if x.dtype != jnp.float32:
            raise ValueError(f"native CPU kernels take float32, got {x.dtype}")


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                           lengths: jax.Array, *, scale: float, sliding_window: int | None = None) -> jax.Array:
    """One query token per sequence against its paged K/V (semantics of the jnp reference).

    Args:
      q: `[num_seqs, num_q_heads, head_dim]` float32.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]` float32.
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      lengths: `[num_seqs]` int32 tokens in the cache, the newest included; 0 = empty slot.
    Returns:
      `[num_seqs, num_q_heads, head_dim]` float32; empty slots get zeros.
    """
    load()
    _f32(q, k_pages, v_pages)
    return jax.ffi.ffi_call("distserve_paged_decode_f32", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        scale=np.float32(scale), window=np.int32(sliding_window or 0))


def write_kv_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                   slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes `k`, `v` `[num_tokens, num_kv_heads, head_dim]` into their flat slots, in place.

    The outputs alias `k_pages`/`v_pages` `[num_kv_heads, num_pages, page_size, head_dim]`: inside
    a jit that donates the pages, the cache is updated without a copy.
    """
    load()
    _f32(k_pages, v_pages, k, v)
    shape = jax.ShapeDtypeStruct(k_pages.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call("distserve_write_kv_f32", (shape, shape), input_output_aliases={0: 0, 1: 1},
                                  vmap_method="sequential")(k_pages, v_pages, k, v, slot_mapping.astype(jnp.int32)))


@functools.lru_cache(maxsize=None)
def supported_on_default_backend() -> bool:
    """True when JAX runs on the CPU and the kernels are available."""
    return jax.default_backend() == "cpu" and available()


def gather_pages(pages: jax.Array, page_ids: jax.Array) -> jax.Array:
    """`pages[:, page_ids]`: `[num_kv_heads, num_pages, page_size, head_dim]` float32 pages and
    `[n]` int32 ids in, `[num_kv_heads, n, page_size, head_dim]` out (one memcpy per page)."""
    load()
    _f32(pages)
    h, _, ps, d = pages.shape
    return jax.ffi.ffi_call("distserve_gather_pages_f32", jax.ShapeDtypeStruct((h, page_ids.shape[0], ps, d), jnp.float32),
                            vmap_method="sequential")(pages, page_ids.astype(jnp.int32))


def scatter_pages(pages: jax.Array, blocks: jax.Array, page_ids: jax.Array) -> jax.Array:
    """`pages.at[:, page_ids].set(blocks)` in place: the output aliases `pages` (donate it to the
    enclosing jit and nothing but the blocks' bytes move). With repeated ids the last block wins."""
    load()
    _f32(pages, blocks)
    return jax.ffi.ffi_call("distserve_scatter_pages_f32", jax.ShapeDtypeStruct(pages.shape, jnp.float32),
                            input_output_aliases={0: 0}, vmap_method="sequential")(
        pages, blocks, page_ids.astype(jnp.int32))

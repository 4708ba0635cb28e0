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

Builds (`BUILDS`): the kernels run the ``native`` build (``-march=native``), whose instruction-set
path, and so its float32 rounding, depends on the host: `simd_path()` asks the library which one
it compiled ("avx512", "avx2", "avx", "sse2", ...; see `cpu_kernels.cc`). On x86-64 the same
source is also built with the instruction set capped at AVX2, AVX and the x86-64 baseline (SSE2),
each into its own cached library with its own FFI targets, so that one host can test the paths
other hosts' ``-march=native`` selects: every kernel function takes ``build=`` (default
``native``), and `distinct_builds()` lists the builds whose paths differ.
"""

from __future__ import annotations

import concurrent.futures
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
FLAGS = ("-O3", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
NATIVE = "native"
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# Build name -> the target flags added to FLAGS. The capped builds take the host's own target
# minus features, so each runs on any host that runs the native one (x86-64 only).
BUILDS: dict[str, tuple[str, ...]] = {NATIVE: ("-march=native",)}
if _X86_64:
    BUILDS.update({
        "avx2": ("-march=native", "-mno-avx512f"),
        "avx": ("-march=native", "-mno-avx512f", "-mno-avx2", "-mno-fma"),
        "sse2": ("-march=x86-64", "-Wno-psabi"),  # -Wno-psabi: the internal v8 helpers' ABI note
    })
TARGETS = {"paged_decode": "DistservePagedDecodeF32", "write_kv": "DistserveWriteKVF32",
           "gather_pages": "DistserveGatherPagesF32", "scatter_pages": "DistserveScatterPagesF32"}
SIMD_PATH_SYMBOL = "DistserveSimdPath"

_lock = threading.Lock()
_state: dict[str, dict[str, object]] = {}  # build -> {"lib": CDLL} or {"error": NativeBuildError}


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


def _check_build(build: str) -> tuple[str, ...]:
    if build not in BUILDS:
        raise ValueError(f"unknown native build {build!r}; this machine has {sorted(BUILDS)}")
    return FLAGS + BUILDS[build]


def _target(name: str, build: str) -> str:
    """The FFI target name of kernel `name` in `build` (the native build keeps the plain name)."""
    return f"distserve_{name}_f32" if build == NATIVE else f"distserve_{name}_f32_{build}"


def build(build: str = NATIVE) -> Path:
    """Compiles `cpu_kernels.cc` as `build` (or reuses the cached build); returns the library's path.

    Raises:
      NativeBuildError: no compiler, or the compiler failed (its output is in the message).
      ValueError: `build` is not a key of `BUILDS`.
    """
    flags = _check_build(build)
    cxx = _compiler()
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, " ".join(flags), include, jax.__version__,
                                    _cpu_features(), platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libdistserve_cpu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{include}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders (test workers) each finish with a whole file
    logging.info("built native CPU kernels (%s build): %s", build, out)
    return out


_build = build  # for the functions below, whose `build` argument hides the function


def load(build: str = NATIVE) -> ctypes.CDLL:
    """Builds (if needed), loads and registers `build`'s kernels once per process."""
    _check_build(build)
    with _lock:
        state = _state.setdefault(build, {})
        if "lib" in state:
            return state["lib"]  # type: ignore[return-value]
        if "error" in state:
            raise state["error"]  # type: ignore[misc]
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build(build)))
            getattr(lib, SIMD_PATH_SYMBOL).restype = ctypes.c_char_p
            for name, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(_target(name, build), jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
        except (NativeBuildError, OSError, AttributeError) as e:
            err = e if isinstance(e, NativeBuildError) else NativeBuildError(f"loading native CPU kernels: {e}")
            state["error"] = err
            logging.warning("native CPU kernels (%s build) unavailable%s: %s", build,
                            ", using XLA paths" if build == NATIVE else "", err)
            raise err from None
        state["lib"] = lib
        logging.info("native CPU kernels: %s build, %s path", build, lib.DistserveSimdPath().decode())
        return lib


def available(build: str = NATIVE) -> bool:
    """True when `build`'s kernels built and loaded (never raises for a known build)."""
    try:
        load(build)
        return True
    except NativeBuildError:
        return False


def simd_path(build: str = NATIVE) -> str:
    """The instruction-set path `build` compiled, as the library reports it: "avx512", "avx2",
    "avx", "sse2" or "generic" (see `cpu_kernels.cc`).

    Raises:
      NativeBuildError: the build failed.
    """
    return load(build).DistserveSimdPath().decode()


def distinct_builds() -> dict[str, str]:
    """Build name -> SIMD path for the builds of `BUILDS` that build here and whose paths differ:
    the native build first, then the capped ones whose path no earlier build has. Builds missing
    from the cache are compiled in parallel (a few seconds each)."""
    def compile_quietly(name: str) -> None:
        try:
            _build(name)
        except NativeBuildError:
            pass  # available() below records and logs it

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(BUILDS)) as pool:
        list(pool.map(compile_quietly, BUILDS))
    paths: dict[str, str] = {}
    for name in BUILDS:
        if available(name) and simd_path(name) not in paths.values():
            paths[name] = simd_path(name)
    return paths


def _f32(*xs: jax.Array) -> None:
    for x in xs:
        if x.dtype != jnp.float32:
            raise ValueError(f"native CPU kernels take float32, got {x.dtype}")


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                           lengths: jax.Array, *, scale: float, sliding_window: int | None = None,
                           build: str = NATIVE) -> jax.Array:
    """One query token per sequence against its paged K/V (semantics of the jnp reference).

    Args:
      q: `[num_seqs, num_q_heads, head_dim]` float32.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]` float32.
      block_tables: `[num_seqs, max_blocks]` int32 page ids.
      lengths: `[num_seqs]` int32 tokens in the cache, the newest included; 0 = empty slot.
      build: the build of the kernels that runs (a key of `BUILDS`).
    Returns:
      `[num_seqs, num_q_heads, head_dim]` float32; empty slots get zeros.
    """
    load(build)
    _f32(q, k_pages, v_pages)
    return jax.ffi.ffi_call(_target("paged_decode", build), jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        scale=np.float32(scale), window=np.int32(sliding_window or 0))


def write_kv_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                   slot_mapping: jax.Array, *, build: str = NATIVE) -> tuple[jax.Array, jax.Array]:
    """Writes `k`, `v` `[num_tokens, num_kv_heads, head_dim]` into their flat slots, in place.

    The outputs alias `k_pages`/`v_pages` `[num_kv_heads, num_pages, page_size, head_dim]`: inside
    a jit that donates the pages, the cache is updated without a copy.
    """
    load(build)
    _f32(k_pages, v_pages, k, v)
    shape = jax.ShapeDtypeStruct(k_pages.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(_target("write_kv", build), (shape, shape), input_output_aliases={0: 0, 1: 1},
                                  vmap_method="sequential")(k_pages, v_pages, k, v, slot_mapping.astype(jnp.int32)))


@functools.lru_cache(maxsize=None)
def supported_on_default_backend() -> bool:
    """True when JAX runs on the CPU and the native build is available."""
    return jax.default_backend() == "cpu" and available()


def gather_pages(pages: jax.Array, page_ids: jax.Array, *, build: str = NATIVE) -> jax.Array:
    """`pages[:, page_ids]`: `[num_kv_heads, num_pages, page_size, head_dim]` float32 pages and
    `[n]` int32 ids in, `[num_kv_heads, n, page_size, head_dim]` out (one memcpy per page)."""
    load(build)
    _f32(pages)
    h, _, ps, d = pages.shape
    return jax.ffi.ffi_call(_target("gather_pages", build),
                            jax.ShapeDtypeStruct((h, page_ids.shape[0], ps, d), jnp.float32),
                            vmap_method="sequential")(pages, page_ids.astype(jnp.int32))


def scatter_pages(pages: jax.Array, blocks: jax.Array, page_ids: jax.Array, *, build: str = NATIVE) -> jax.Array:
    """`pages.at[:, page_ids].set(blocks)` in place: the output aliases `pages` (donate it to the
    enclosing jit and nothing but the blocks' bytes move). With repeated ids the last block wins."""
    load(build)
    _f32(pages, blocks)
    return jax.ffi.ffi_call(_target("scatter_pages", build), jax.ShapeDtypeStruct(pages.shape, jnp.float32),
                            input_output_aliases={0: 0}, vmap_method="sequential")(
        pages, blocks, page_ids.astype(jnp.int32))

"""Counts the executables this process had to build (to prove steady-state serving never recompiles).

Every jit cache miss ends in either an XLA backend compilation or a load from the persistent
compilation cache; both are counted.
"""

from __future__ import annotations

import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_count = 0
_installed = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _COMPILE_EVENT:
        with _lock:
            _count += 1


def _on_event(event: str, **kwargs) -> None:
    global _count
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _count += 1


def install() -> None:
    """Registers the listeners once; later calls do nothing."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _installed = True


def count() -> int:
    """Executables built (compiled or loaded from the persistent cache) since `install()`."""
    install()
    with _lock:
        return _count

"""Test set-up: 8 virtual CPU devices (before JAX is imported), the repo on sys.path."""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


def pytest_configure(config):
    """Share compiled executables between the many engines the tests build (same shapes, same HLO)."""
    import jax

    cache = os.environ.get("DISTSERVE_TEST_JAX_CACHE", str(ROOT / ".cache" / "jax-tests"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from distserve_jax.runtime import compile_counter

    compile_counter.install()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: `hf_checkpoint(variant, dtype="float32", sharded=False)` -> a cached checkpoint dir."""
    cache = {}

    def make(variant: str, dtype: str = "float32", sharded: bool = False, **kw):
        key = (variant, dtype, sharded, tuple(sorted(kw.items())))
        if key not in cache:
            from tests.hf_checkpoints import make_checkpoint
            d = tmp_path_factory.mktemp(f"{variant}-{dtype}-{'sh' if sharded else 'one'}")
            cache[key] = make_checkpoint(variant, d, dtype=dtype, sharded=sharded, **kw)
        return cache[key]

    return make


# Inherited by every process a test starts (servers, Ray's raylet, its workers and actors).
os.environ.setdefault("DISTSERVE_TEST_SESSION", f"{os.getpid()}-{os.urandom(4).hex()}")
_MARK = "DISTSERVE_TEST_SESSION=" + os.environ["DISTSERVE_TEST_SESSION"]


def _ray_processes(ours_only: bool = True) -> set[int]:
    """Pids of Ray's processes (raylet, GCS, workers and actors) on this machine; with `ours_only`,
    only those this test session started (they inherit its `DISTSERVE_TEST_SESSION` mark)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            if not (b"raylet" in cmd or b"gcs_server" in cmd or cmd.startswith(b"ray::")
                    or b"ray/_private/workers" in cmd):
                continue
            if ours_only and _MARK.encode() not in (d / "environ").read_bytes():
                continue
        except OSError:
            continue
        pids.add(int(d.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_ray_processes_left_behind():
    """The suite stops every Ray process it started (a test that leaves one fails the session)."""
    yield
    import time

    deadline = time.monotonic() + 15
    while (left := _ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind by the tests: {sorted(left)}"

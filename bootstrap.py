#!/usr/bin/env python3
"""Sets up the repo's git-ignored virtualenv (.venv) and runs the demo or the test suite.

    python3 bootstrap.py demo   # serve the demo model, disaggregated vs colocated, over gRPC
    python3 bootstrap.py test   # run the whole test suite

Only python3 is needed; the venv is created on first use and reused while pyproject.toml is
unchanged.
"""

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed"


def ensure_venv() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.check_call(pip + ["--upgrade", "pip"])
    subprocess.check_call(pip + ["-e", f"{ROOT}[test]"])
    # Packages whose files are used but whose dependencies are not (see [tool.distserve] no_deps).
    no_deps = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("distserve", {}).get("no_deps", [])
    if no_deps:
        subprocess.check_call(pip + ["--no-deps", *no_deps])
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    if argv[1] == "demo":
        cmd = [str(PY), "-m", "serving.demo", *argv[2:]]
    else:
        cmd = [str(PY), "-m", "pytest", "-q", *argv[2:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

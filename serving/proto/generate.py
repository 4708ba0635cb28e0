"""Regenerates the committed Python stubs of `distserve.proto` with grpcio-tools.

Run `python -m serving.proto.generate` after editing the .proto file. The stubs are generated
with the repository root as the import root, so they import each other as `serving.proto.*`.
`tests/serving/test_proto_stubs.py` fails when the committed stubs differ from a fresh run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
PROTO_FILE = "serving/proto/distserve.proto"
STUB_FILES = ("distserve_pb2.py", "distserve_pb2.pyi", "distserve_pb2_grpc.py")


def generate(out_root: str | Path) -> list[Path]:
    """Runs protoc on `distserve.proto`; the stubs land in `out_root/serving/proto/`. Returns their paths."""
    from grpc_tools import protoc  # Imported lazily: only needed to regenerate.

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    proto_include = Path(protoc.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{proto_include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", str(REPO_ROOT / PROTO_FILE)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO_FILE}")
    return [out_root / "serving" / "proto" / name for name in STUB_FILES]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(tmp):
            shutil.copyfile(path, PROTO_DIR / path.name)
            sys.stdout.write(f"wrote {PROTO_DIR / path.name}\n")


if __name__ == "__main__":
    main()

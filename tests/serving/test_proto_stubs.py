"""The committed gRPC stubs match a fresh grpcio-tools run on `serving/proto/distserve.proto`."""

import re

from serving.proto import generate

# Lines that only record the generator's versions (they change with the installed grpcio-tools).
_VERSION_LINE = re.compile(r"(Protobuf Python Version|GRPC_GENERATED_VERSION|_runtime_version\.Domain|^\s+\d+,$)")


def _normalise(text: str) -> list[str]:
    return [line for line in text.splitlines() if not _VERSION_LINE.search(line)]


def test_committed_stubs_are_fresh(tmp_path):
    for path in generate.generate(tmp_path):
        committed = generate.PROTO_DIR / path.name
        assert committed.is_file(), f"{committed} is missing: run python -m serving.proto.generate"
        assert _normalise(committed.read_text()) == _normalise(path.read_text()), (
            f"{committed.name} is stale: run python -m serving.proto.generate")

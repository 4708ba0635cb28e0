"""Property-based fuzzing of the gRPC front (hypothesis, derandomized and bounded): random bytes,
mutations of valid serialized requests, invalid UTF-8 in every string field, random field values
and oversized messages. Every call ends with OK or INVALID_ARGUMENT (a message naming the
problem), never UNKNOWN/INTERNAL or a queue-full RESOURCE_EXHAUSTED, and afterwards every KV
block is free."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.client import Client
from serving.proto import distserve_pb2 as pb
from tests.serving.conftest import MAX_REQUEST_BYTES, wait_all_free

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
METHOD = "/distserve.v1.DistServe/Generate"
SEEDS = [
    pb.GenerateRequest(prompt="hello fuzz", sampling_params=pb.SamplingParams(max_tokens=2, temperature=0.0)),
    pb.GenerateRequest(prompt_token_ids=[1, 40, 41, 300], request_id="fz",
                       sampling_params=pb.SamplingParams(max_tokens=2, stop=["ab"], stop_token_ids=[7], seed=3)),
    pb.GenerateRequest(prompt="x", model="tiny-llama", sampling_params=pb.SamplingParams(max_tokens=1, logprobs=2)),
]
SEED_BYTES = [m.SerializeToString() for m in SEEDS]


@pytest.fixture(autouse=True)
def all_blocks_free_after_test(server):
    yield
    wait_all_free(server.address)


@pytest.fixture(scope="module")
def raw_call(server):
    """Sends raw bytes as a Generate request; returns (status code, details, responses)."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_stream(METHOD, request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)

    def send(data: bytes):
        responses = []
        try:
            for msg in call(data, timeout=60):
                responses.append(msg)
        except grpc.RpcError as e:
            return e.code(), e.details(), responses
        return grpc.StatusCode.OK, "", responses

    yield send
    channel.close()


def check(code, details, responses) -> None:
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if code == grpc.StatusCode.OK:
        assert responses and responses[-1].finished and responses[-1].finish_reason in ("stop", "length")
    else:
        assert details and "Traceback" not in details


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(raw_call, data):
    check(*raw_call(data))


EDIT = st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255))


@FUZZ
@given(seed=st.sampled_from(SEED_BYTES), edits=st.lists(EDIT, min_size=1, max_size=4))
def test_mutated_requests(raw_call, seed, edits):
    b = bytearray(seed)
    for kind, pos, value in edits:
        pos = pos % (len(b) + 1)
        if kind == "set" and pos < len(b):
            b[pos] = value
        elif kind == "insert":
            b.insert(pos, value)
        elif kind == "delete" and pos < len(b):
            del b[pos]
        elif kind == "truncate":
            del b[pos:]
    check(*raw_call(bytes(b)))


def _bad_utf8(field: str) -> bytes:
    marker = "\u00e9MARK"
    if field == "stop":
        msg = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(stop=[marker], max_tokens=1))
    else:
        msg = pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(max_tokens=1))
        setattr(msg, field, marker)
    data = msg.SerializeToString()
    return data.replace(marker.encode(), b"\xc3\x28MARK")  # an invalid two-byte sequence, same length


@pytest.mark.parametrize("field,param", [("prompt", "prompt"), ("request_id", "request_id"), ("model", "model"),
                                         ("stop", "sampling_params.stop")])
def test_invalid_utf8_in_a_string_field_is_invalid_argument(raw_call, field, param):
    code, details, _ = raw_call(_bad_utf8(field))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert param in details and "UTF-8" in details, details


@pytest.mark.parametrize("size", [MAX_REQUEST_BYTES + 100, 3 * MAX_REQUEST_BYTES, 4 << 20])
def test_oversized_messages_are_invalid_argument(raw_call, size):
    data = pb.GenerateRequest(prompt="y" * size).SerializeToString()
    code, details, _ = raw_call(data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_request_bytes" in details, (code, details)


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
INTS = st.integers(-2**63, 2**63 - 1) | st.integers(-3, 70)
SAMPLING = st.builds(
    pb.SamplingParams, temperature=FLOATS, top_p=FLOATS, top_k=INTS, min_p=FLOATS, seed=INTS,
    max_tokens=st.integers(-5, 70) | INTS, stop=st.lists(st.text(max_size=4), max_size=2),
    stop_token_ids=st.lists(INTS, max_size=2), ignore_eos=st.booleans(), logprobs=INTS, prompt_logprobs=INTS)


@FUZZ
@given(prompt=st.text(max_size=20), ids=st.lists(INTS, max_size=5), rid=st.text(max_size=8),
       model=st.sampled_from(["", "tiny-llama", "other"]), sampling=SAMPLING)
def test_random_field_values(raw_call, prompt, ids, rid, model, sampling):
    msg = pb.GenerateRequest(prompt=prompt, prompt_token_ids=ids, request_id=rid, model=model,
                             sampling_params=sampling)
    code, details, responses = raw_call(msg.SerializeToString())
    check(code, details, responses)


def test_still_serving_after_fuzzing(server):
    with Client(server.address) as c:
        ok = c.generate("after the fuzz", sampling={"temperature": 0.0, "max_tokens": 3})
        assert ok.finish_reason in ("stop", "length") and ok.token_ids
        assert c.health() == "SERVING"

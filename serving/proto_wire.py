"""Request messages off the wire: size limit, parsing, and an error that names the field when parsing fails.

gRPC hands a method's deserializer the raw bytes of a request. `safe_deserializer` wraps a message
type's `FromString` so that it never raises: a message over the size limit, or one that fails to
parse, becomes an `Unparsable` the handler answers with INVALID_ARGUMENT (instead of the UNKNOWN
and protobuf traceback an exception in the deserializer gets). `explain_parse_error` walks the
protobuf wire format against the message's descriptor to say which field is broken (invalid
UTF-8 in a string, a truncated length, a wire type that does not fit the field, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class Unparsable:
    """A request the deserializer refused; `message` says why, `param` the field if known."""

    message: str
    param: str | None = None


class _WireError(Exception):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def safe_deserializer(message_type: Any, max_bytes: Callable[[], int]) -> Callable[[bytes], Any]:
    """`message_type.FromString`, but an oversized or unparsable message becomes an `Unparsable`."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        limit = max_bytes()
        if len(data) > limit:
            return Unparsable(f"request is {len(data)} bytes, over the limit of {limit} bytes (max_request_bytes); "
                              f"the prompt is too large", param="prompt")
        try:
            return message_type.FromString(data)
        except (pb_message.DecodeError, RuntimeError, ValueError) as e:
            why, param = explain_parse_error(data, message_type.DESCRIPTOR)
            return Unparsable(f"request is not a valid {name}: {why or e}", param=param)

    return deserialize


def explain_parse_error(data: bytes, descriptor: Descriptor) -> tuple[str | None, str | None]:
    """(what is wrong, the top-level field it is in) for bytes that fail to parse as `descriptor`."""
    try:
        _walk(memoryview(data), descriptor, "", 0, 0)
    except _WireError as e:
        return str(e), e.param
    return None, None


def _varint(buf: memoryview, pos: int, where: str, param: str | None) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise _WireError(f"{where}: truncated varint", param)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _WireError(f"{where}: varint longer than 10 bytes", param)


def _walk(buf: memoryview, desc: Descriptor | None, prefix: str, depth: int, base: int,
          group: int | None = None) -> int:
    """Checks the fields in `buf` (of message `desc`; None: an unknown group); returns the end position.

    Like the parser, a known field with a wire type that does not fit it is kept as an unknown field.
    """
    if depth > _MAX_DEPTH:
        raise _WireError(f"{prefix or 'message'}: nested too deeply", prefix.split(".")[0] or None)
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos, f"byte {base + start}", prefix.split(".")[0] or None)
        number, wire = tag >> 3, tag & 7
        field = desc.fields_by_number.get(number) if desc is not None else None
        name = prefix + (field.name if field is not None else f"field #{number}")
        param = name.split(".")[0] if field is not None or prefix else None
        where = f"{name} (byte {base + start})"
        if number == 0:
            raise _WireError(f"byte {base + start}: field number 0 is invalid", param)
        if wire == _VARINT:
            _, pos = _varint(buf, pos, where, param)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > len(buf):
                raise _WireError(f"{where}: truncated fixed-width value", param)
        elif wire == _LEN:
            size, pos = _varint(buf, pos, where, param)
            if pos + size > len(buf):
                raise _WireError(f"{where}: length {size} runs past the end of the message", param)
            payload, pos = buf[pos:pos + size], pos + size
            if field is not None:
                _check_len_field(field, payload, name, where, param, depth, base + pos - size)
        elif wire == _SGROUP:
            pos += _walk(buf[pos:], None, f"{prefix}field #{number}.", depth + 1, base + pos, group=number)
        elif wire == _EGROUP:
            if group != number:
                raise _WireError(f"{where}: end of a group that was not started", param)
            return pos
        else:
            raise _WireError(f"{where}: invalid wire type {wire}", param)
    if group is not None:
        raise _WireError(f"{prefix.rstrip('.')}: group is not closed", prefix.split(".")[0] or None)
    return pos


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (`label` is gone from upb descriptors)
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _check_len_field(field: FieldDescriptor, payload: memoryview, name: str, where: str, param: str | None,
                     depth: int, base: int) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _WireError(f"{where}: string is not valid UTF-8 ({e.reason} at byte {e.start})", param) from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(payload, field.message_type, name + ".", depth + 1, base)
    elif field.type != FieldDescriptor.TYPE_BYTES and _repeated(field):  # packed repeated scalars
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
                          FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
            width = 8 if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64,
                                        FieldDescriptor.TYPE_SFIXED64) else 4
            if len(payload) % width:
                raise _WireError(f"{where}: packed values are not a whole number of {width}-byte values", param)
        else:
            pos = 0
            while pos < len(payload):
                _, pos = _varint(payload, pos, where, param)

"""Image bytes out of a serialized request without copying them.

protobuf's Python API copies a bytes field twice: parsing copies the whole message into the
parser's arena, and every read of `image.data` makes a new `bytes`. For a 50 MB image that was
100 MB more at the peak than the request itself. Here the request stays in the buffer gRPC hands
over: a walk over the wire format finds each image's `data` (field 1 of `Image`), keeps it as a
memoryview into that buffer, and re-encodes the message without it, small enough that protobuf
parses the rest as usual.

The walk understands only what it needs (varints and length-delimited fields); anything else,
such as a deprecated group or a truncated field, falls back to protobuf's own parse, which also
decides what is malformed. The fields it re-encodes are copied byte for byte, so protobuf merges
repeated occurrences of a field exactly as it would have merged them in the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from gateway import allocator
from gateway.core.errors import ErrorCode, GatewayError

M = TypeVar("M", bound=Message)
T = TypeVar("T")

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_IMAGE_DATA = 1  # Image.data


class _FallBackError(Exception):
    """A wire feature the walk leaves to protobuf."""


@dataclass(frozen=True)
class Detached(Generic[M]):
    """A request message without its images' data, and that data, one view per image."""

    message: M
    datas: tuple[memoryview, ...]
    size: int  # the serialized request's size in bytes


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _FallBackError
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its payload, end) for each field."""
    out = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _FallBackError
        if wire_type == _VARINT:
            _, end = _varint(buf, pos)
        elif wire_type == _LEN:
            length, pos = _varint(buf, pos)
            end = pos + length
        elif wire_type == _I64:
            end = pos + 8
        elif wire_type == _I32:
            end = pos + 4
        else:
            raise _FallBackError
        if end > len(buf):
            raise _FallBackError
        out.append((number, wire_type, start, pos, end))
        pos = end
    return out


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _strip_image(buf: memoryview) -> tuple[bytes, memoryview | None]:
    """An Image's fields without `data`, and the last `data` on the wire (the one that wins)."""
    data = None
    kept = []
    for number, wire_type, start, payload, end in _fields(buf):
        if number == _IMAGE_DATA and wire_type == _LEN:
            data = buf[payload:end]
        else:
            kept.append(buf[start:end])
    return b"".join(kept), data


def _moved_out(message: M, field: str, repeated: bool, raw: memoryview) -> Detached[M]:
    """The slow way, for what the walk leaves to protobuf: parse it all, then move the data out
    (one copy each)."""
    if repeated:
        images = list(getattr(message, field))
    elif message.HasField(field):
        images = [getattr(message, field)]
    else:
        images = []  # touching an absent submessage would make it present
    datas = [memoryview(image.data) for image in images]
    for image in images:
        image.ClearField("data")
    if not repeated and not datas:
        datas = [raw[0:0]]
    return Detached(message, tuple(datas), len(raw))


def detach(message_type: type[M], field: str) -> Callable[[bytes], Detached[M]]:
    """A gRPC request deserializer for `message_type`, whose Image field (repeated or not) is
    named `field`."""
    descriptor = message_type.DESCRIPTOR.fields_by_name[field]
    image_field = descriptor.number
    repeated = bool(descriptor.is_repeated)
    parse: Callable[[bytes], M] = message_type.FromString

    def deserialize(raw: bytes) -> Detached[M]:
        if len(raw) >= allocator.TRIM_THRESHOLD:
            allocator.release_free_memory()
        buf = memoryview(raw)
        try:
            pieces: list[bytes | memoryview] = []
            datas: list[memoryview] = []
            last: memoryview | None = None
            for number, wire_type, start, payload, end in _fields(buf):
                if number != image_field or wire_type != _LEN:
                    pieces.append(buf[start:end])
                    continue
                rest, data = _strip_image(buf[payload:end])
                pieces.append(
                    _encode_varint(image_field << 3 | _LEN) + _encode_varint(len(rest)) + rest
                )
                if repeated:
                    datas.append(data if data is not None else buf[0:0])
                elif data is not None:
                    last = data  # a singular message field merges: the last data set wins
            if not repeated:
                datas = [last if last is not None else buf[0:0]]
            message = parse(b"".join(pieces))
        except _FallBackError:
            return _moved_out(parse(raw), field, repeated, buf)
        return Detached(message, tuple(datas), len(raw))

    return deserialize


@dataclass(frozen=True)
class Malformed:
    """A request message protobuf cannot parse. grpcio answers a deserializer that raises with
    INTERNAL "Exception deserializing request!" and a logged traceback, before the servicer
    sees the call: no error code, no request id, no access record, and in a stream the end of
    the stream. Handed to the servicer instead, it fails as invalid_request like any bad input."""

    type_name: str
    reason: str
    size: int

    def error(self) -> GatewayError:
        return GatewayError(
            ErrorCode.INVALID_REQUEST,
            f"the request is not a valid {self.type_name} message: {self.reason}",
        )


def tolerant(
    deserialize: Callable[[bytes], T], message_type: type[Message]
) -> Callable[[bytes], T | Malformed]:
    """A deserializer that returns Malformed where `deserialize` fails on the bytes."""
    name = message_type.DESCRIPTOR.name

    def deserialize_or_malformed(raw: bytes) -> T | Malformed:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return Malformed(name, str(exc) or "unparseable", len(raw))

    return deserialize_or_malformed

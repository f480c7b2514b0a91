"""Image bytes out of a serialized request without copying them.

protobuf's Python API copies a bytes field twice: parsing copies the whole message into the
parser's arena, and every read of `image.data` makes a new `bytes`. For a 50 MB image that was
100 MB more at the peak than the request itself. Here the request stays in the buffer gRPC hands
over: a walk over the wire format finds each image's `data` (field 1 of `Image`), keeps it as a
memoryview into that buffer, and re-encodes the message without it, small enough that protobuf
parses the rest as usual.

The walk reads the wire types (a deprecated group as one field, up to its end); anything it
cannot read, such as a truncated field, falls back to protobuf's own parse, which also decides
what is malformed. The fields it keeps are copied byte for byte, runs of them in one piece, so
protobuf merges repeated occurrences of a field exactly as it would have merged them in the
original.

The walk runs on grpc's own thread, the one that serves every call of the server, health checks
included, and it costs a Python loop turn per field. So it refuses, before protobuf parses
anything, what no real request holds and what would make a small message cost much: more images
than the gateway takes (`too_many_images`), more than MAX_FIELDS fields besides the images in a
request or in one image (`invalid_request`), or parameters of more than MAX_PARAMETERS bytes
(`payload_too_large`). A 4 MB message of two million two-byte unknown fields had held that
thread for 7 s and taken 670 MB; one of two million empty images, 15 s and 900 MB before it was
refused `too_many_images`; 8 MB of empty parameter values raised the peak by 215 MB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from gateway import allocator
from gateway.core.errors import ErrorCode, GatewayError

M = TypeVar("M", bound=Message)
T = TypeVar("T")

_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5
_IMAGE_DATA = 1  # Image.data
# Fields of a request besides its images, and of one image: a real one has at most five.
MAX_FIELDS = 256
# Serialized bytes of a request's parameters, as one HTTP text field: a Struct costs some 25
# times its size once parsed and made JSON (8 MB of empty values raised the peak by 215 MB).
MAX_PARAMETERS = 64 * 1024
# A served model's name in UTF-8 at most: 256 characters (gateway.models.base.MAX_NAME).
_NAME_BYTES = 4 * 256
# Groups nested in groups, as protobuf's own parser takes them.
_MAX_DEPTH = 100


class _FallBackError(Exception):
    """Wire bytes the walk cannot read: protobuf's own parse decides what they are."""


class _RefusedError(Exception):
    """A request refused from its wire form, before protobuf parses it."""

    def __init__(self, error: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.error = error
        # The model the message named before the refusal, if it did (for the access record).
        self.model: str | None = None


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


def _value_end(buf: memoryview, pos: int, wire_type: int) -> tuple[int, int]:
    """(start of the payload, end) of a field whose key ends at `pos`; not for groups."""
    if wire_type == _VARINT:
        return pos, _varint(buf, pos)[1]
    if wire_type == _LEN:
        length, pos = _varint(buf, pos)
        return pos, pos + length
    if wire_type == _I64:
        return pos, pos + 8
    if wire_type == _I32:
        return pos, pos + 4
    raise _FallBackError


def _too_many_fields() -> _RefusedError:
    return _RefusedError(
        ErrorCode.INVALID_REQUEST,
        f"the message holds more than {MAX_FIELDS} fields besides its images; a request has a "
        "handful",
    )


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its payload, end, fields read)
    for each field. A group is one field, from its start to the end of its end group, and
    counts every field inside it too; _RefusedError past MAX_FIELDS of them inside groups."""
    pos = 0
    inside = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _FallBackError
        fields = 1
        if wire_type == _START_GROUP:
            groups = [number]
            while groups:
                if pos >= len(buf):
                    raise _FallBackError
                key, pos = _varint(buf, pos)
                inner, inner_type = key >> 3, key & 7
                fields += 1
                inside += 1
                if inside > MAX_FIELDS:
                    raise _too_many_fields()
                if inner == 0:
                    raise _FallBackError
                if inner_type == _END_GROUP:
                    if groups.pop() != inner:
                        raise _FallBackError
                elif inner_type == _START_GROUP:
                    groups.append(inner)
                    if len(groups) > _MAX_DEPTH:
                        raise _FallBackError
                else:
                    pos = _value_end(buf, pos, inner_type)[1]
                    if pos > len(buf):
                        raise _FallBackError
            payload, end = start, pos
        else:
            payload, end = _value_end(buf, pos, wire_type)
        if end > len(buf):
            raise _FallBackError
        yield number, wire_type, start, payload, end, fields
        pos = end


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
    kept: list[memoryview] = []
    run = 0  # where the run of fields kept since the last `data` starts
    others = 0
    for number, wire_type, start, payload, end, fields in _fields(buf):
        if number == _IMAGE_DATA and wire_type == _LEN:
            data = buf[payload:end]
            kept.append(buf[run:start])
            run = end
            continue
        others += fields
        if others > MAX_FIELDS:
            raise _too_many_fields()
    kept.append(buf[run:])
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


def detach(
    message_type: type[M], field: str, max_images: int | None = None
) -> Callable[[bytes], Detached[M]]:
    """A gRPC request deserializer for `message_type`, whose Image field (repeated or not) is
    named `field`. It raises _RefusedError for a request of more than `max_images` images (when
    given), of too many other fields, or of parameters too large (see the module's docstring)."""
    descriptor = message_type.DESCRIPTOR.fields_by_name[field]
    image_field = descriptor.number
    repeated = bool(descriptor.is_repeated)
    parameters = message_type.DESCRIPTOR.fields_by_name.get("parameters")
    parameters_field = None if parameters is None else parameters.number
    model = message_type.DESCRIPTOR.fields_by_name.get("model")
    model_field = None if model is None else model.number
    parse: Callable[[bytes], M] = message_type.FromString

    def too_many_images() -> _RefusedError:
        return _RefusedError(
            ErrorCode.TOO_MANY_IMAGES,
            f"the request holds more than {max_images} images; this gateway takes at most "
            f"{max_images} per request",
        )

    def deserialize(raw: bytes) -> Detached[M]:
        if len(raw) >= allocator.TRIM_THRESHOLD:
            allocator.release_free_memory()
        buf = memoryview(raw)
        named: memoryview | None = None
        try:
            pieces: list[bytes | memoryview] = []
            datas: list[memoryview] = []
            last: memoryview | None = None
            run = 0  # where the run of fields kept as they are since the last image starts
            others = parameter_bytes = 0
            for number, wire_type, start, payload, end, fields in _fields(buf):
                if number != image_field or wire_type != _LEN:
                    others += fields
                    if others > MAX_FIELDS:
                        raise _too_many_fields()
                    if number == model_field and wire_type == _LEN:
                        named = buf[payload:end]  # a string given again: the last one wins
                    if number == parameters_field and wire_type == _LEN:
                        # Occurrences merge: their sizes add up.
                        parameter_bytes += end - payload
                        if parameter_bytes > MAX_PARAMETERS:
                            raise _RefusedError(
                                ErrorCode.PAYLOAD_TOO_LARGE,
                                f"the parameters take more than {MAX_PARAMETERS} bytes, the most "
                                "this gateway takes (as one HTTP text field)",
                            )
                    continue
                if repeated and max_images is not None and len(datas) >= max_images:
                    raise too_many_images()
                if not repeated:
                    others += fields  # a singular field given again merges into one image
                    if others > MAX_FIELDS:
                        raise _too_many_fields()
                rest, data = _strip_image(buf[payload:end])
                pieces.append(buf[run:start])
                pieces.append(
                    _encode_varint(image_field << 3 | _LEN) + _encode_varint(len(rest)) + rest
                )
                run = end
                if repeated:
                    datas.append(data if data is not None else buf[0:0])
                elif data is not None:
                    last = data  # a singular message field merges: the last data set wins
            pieces.append(buf[run:])
            if not repeated:
                datas = [last if last is not None else buf[0:0]]
            message = parse(b"".join(pieces))
        except _RefusedError as exc:
            if named is not None:
                # No served name is this long; what is cut off still names no model.
                exc.model = bytes(named[:_NAME_BYTES]).decode("utf-8", "replace")
            elif model_field is not None:
                # None given (protobuf leaves out an empty string): the default model. Encoders
                # write fields in number order, the model before the images.
                exc.model = ""
            raise
        except _FallBackError:
            message = parse(raw)
            if repeated and max_images is not None and len(getattr(message, field)) > max_images:
                raise too_many_images() from None
            return _moved_out(message, field, repeated, buf)
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


@dataclass(frozen=True)
class Refused(Malformed):
    """A request refused from its wire form (see _RefusedError), answered as Malformed is."""

    code: ErrorCode = ErrorCode.INVALID_REQUEST
    # The model the message named, if it named one before it was refused.
    model: str | None = None

    def error(self) -> GatewayError:
        return GatewayError(self.code, self.reason)


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
        except _RefusedError as exc:
            return Refused(name, str(exc), len(raw), exc.error, exc.model)

    return deserialize_or_malformed

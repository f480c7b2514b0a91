"""gateway.rpc.wire reads the same requests as protobuf does, without copying image bytes."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from gateway.rpc.wire import detach

TYPES: list[tuple[Any, str]] = [
    (pb.InferRequest, "image"),
    (pb.InferStreamRequest, "image"),
    (pb.InferBatchRequest, "images"),
]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_numbers = st.integers(6, 99)


def _fixed(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


# Fields this server does not know, in every wire type the walk reads.
unknown_fields = st.lists(
    st.one_of(
        st.builds(lambda n, v: _varint(n << 3) + _varint(v), _numbers, st.integers(0, 2**64 - 1)),
        st.builds(_len_field, _numbers, st.binary(max_size=20)),
        st.builds(lambda n, b: _varint(n << 3 | 1) + b, _numbers, _fixed(8)),
        st.builds(lambda n, b: _varint(n << 3 | 5) + b, _numbers, _fixed(4)),
    ),
    max_size=2,
).map(b"".join)

images = st.builds(
    lambda data, name, ctype, extra: (
        pb.Image(data=data, name=name, content_type=ctype).SerializeToString() + extra
    ),
    st.binary(max_size=64),
    st.text(max_size=8),
    st.sampled_from(["", "image/png"]),
    unknown_fields,
)
# An Image field on the wire: one or more Image encodings merged, as protobuf allows.
image_payloads = st.lists(images, min_size=1, max_size=3).map(b"".join)


@st.composite
def requests(draw: st.DrawFn, field_number: int = 2) -> bytes:
    """A serialized request: the non-image fields, image fields and unknown fields in any
    order and number."""
    head = pb.InferRequest(
        model=draw(st.text(max_size=8)),
        color_mode=draw(st.integers(0, 5)),  # type: ignore[arg-type]  # unknown numbers too
        request_id=draw(st.text(max_size=8)),
    )
    for key in draw(st.lists(st.text(max_size=4), max_size=2)):
        head.parameters[key] = draw(st.floats(allow_nan=False))
    pieces = [head.SerializeToString()]
    pieces += [_len_field(field_number, p) for p in draw(st.lists(image_payloads, max_size=4))]
    pieces.append(draw(unknown_fields))
    return b"".join(draw(st.permutations(pieces)))


def _restored(message_type: Any, field: str, raw: bytes) -> Any:
    detached = detach(message_type, field)(raw)
    message = detached.message
    found = getattr(message, field)
    targets = (
        list(found) if detached.message.DESCRIPTOR.fields_by_name[field].is_repeated else [found]
    )
    assert len(targets) == len(detached.datas)
    for image, data in zip(targets, detached.datas, strict=True):
        assert image.data == b""
        if data:
            image.data = bytes(data)
    assert detached.size == len(raw)
    return message


@pytest.mark.parametrize(("message_type", "field"), TYPES)
@settings(max_examples=300, deadline=None)
@given(raw=requests())
def test_same_message_as_protobuf(message_type: Any, field: str, raw: bytes) -> None:
    assert _restored(message_type, field, raw) == message_type.FromString(raw)


@pytest.mark.parametrize(("message_type", "field"), TYPES)
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40))
def test_arbitrary_bytes_read_or_fail_as_protobuf_does(
    message_type: Any, field: str, raw: bytes
) -> None:
    try:
        expected = message_type.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            detach(message_type, field)(raw)
        return
    assert _restored(message_type, field, raw) == expected


def test_image_bytes_are_not_copied() -> None:
    data = bytes(range(256)) * 1000
    raw = pb.InferBatchRequest(
        model="shape", images=[pb.Image(data=data, name="a"), pb.Image(data=data[:10])]
    ).SerializeToString()
    detached = detach(pb.InferBatchRequest, "images")(raw)
    assert [d.obj for d in detached.datas] == [raw, raw]
    assert bytes(detached.datas[0]) == data and bytes(detached.datas[1]) == data[:10]
    assert detached.message.images[0].name == "a"


def test_a_group_is_kept_as_protobuf_keeps_it() -> None:
    # Wire type 3 (a deprecated group): walked to its end group and kept whole, for protobuf to
    # keep as an unknown field.
    raw = pb.InferRequest(image=pb.Image(data=b"abc")).SerializeToString() + b"\x3b\x3c"
    detached = detach(pb.InferRequest, "image")(raw)
    assert bytes(detached.datas[0]) == b"abc"
    assert detached.message.image.data == b""

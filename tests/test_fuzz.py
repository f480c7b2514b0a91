"""Property-based fuzzing: arbitrary bytes and headers never crash the decoder or the server."""

from __future__ import annotations

import grpc
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.decode import decode, probe
from gateway.core.errors import GatewayError
from gateway.core.types import ColorMode
from tests.conftest import IMAGES

SEEDS = [p.read_bytes() for p in IMAGES if p.stat().st_size < 40_000]
MAX_PIXELS = 4_000_000
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        # Mutations near the start hit headers, where parsers are most fragile.
        pos = draw(st.integers(0, min(len(data), 512)))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def decode_or_refuse(data: bytes, mode: ColorMode) -> None:
    try:
        probed = probe(data, MAX_PIXELS)
        decoded = decode(data, probed, mode)
    except GatewayError:
        return
    # What decoded must be no larger than the header said.
    assert decoded.info.width * decoded.info.height <= probed.size.pixels


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(list(ColorMode)))
def test_decoder_on_arbitrary_bytes(data: bytes, mode: ColorMode) -> None:
    decode_or_refuse(data, mode)


@FUZZ
@given(mutated_images(), st.sampled_from(list(ColorMode)))
def test_decoder_on_mutated_images(data: bytes, mode: ColorMode) -> None:
    decode_or_refuse(data, mode)


HEADER_NAMES = st.sampled_from(
    ["Content-Type", "X-Request-ID", "Content-Encoding", "Transfer-Encoding", "Accept", "X-Other"]
)
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
) | st.sampled_from(
    [
        "application/octet-stream",
        "image/png",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "gzip",
        "chunked",
    ]
)
PATHS = st.sampled_from(
    ["/", "/multi", "/v1/infer", "/v1/models/shape/infer", "/v1/models/x/infer"]
)


@FUZZ
@given(
    path=PATHS,
    body=st.binary(max_size=2048) | mutated_images(),
    headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4),
    query=st.dictionaries(st.sampled_from(["color_mode", "x", ""]), st.text(max_size=10)),
)
def test_http_front_never_answers_5xx(
    http_url: str, path: str, body: bytes, headers: dict[str, str], query: dict[str, str]
) -> None:
    headers.pop("Transfer-Encoding", None)  # requests frames the body itself
    try:
        resp = requests.post(
            f"{http_url}{path}", data=body, headers=headers, params=query, timeout=30
        )
    except requests.exceptions.InvalidHeader:
        return  # refused by the client library before sending
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) >= {"code", "message", "request_id"}


@FUZZ
@given(
    images=st.lists(st.binary(max_size=512) | mutated_images(), min_size=1, max_size=4),
    model=st.sampled_from(["", "shape", "qrcode", "nope"]),
    mode=st.integers(0, 5),
)
def test_grpc_front_never_answers_internal(
    stub: pb_grpc.ImageGatewayServiceStub, images: list[bytes], model: str, mode: int
) -> None:
    request = pb.InferBatchRequest(
        model=model, color_mode=mode, images=[pb.Image(data=d) for d in images]
    )
    try:
        stub.InferBatch(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc

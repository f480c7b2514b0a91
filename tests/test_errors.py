"""Bad input gets its stable code over both protocols, from one table; the server goes on."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.core.errors import ErrorCode
from gateway.serve import Gateway, start
from tests.conftest import DATA
from tests.wire import (
    grpc_code,
    grpc_result,
    http_host_port,
    post_multipart,
    post_octet,
    send_and_see_read,
)

JPEG = (DATA / "images" / "rocket.jpg").read_bytes()
PNG = (DATA / "images" / "hopper.png").read_bytes()

BAD_IMAGES = {
    "garbage": (b"this is not an image at all", ErrorCode.UNDECODABLE_IMAGE),
    "random bytes": (bytes(range(256)) * 8, ErrorCode.UNDECODABLE_IMAGE),
    "empty": (b"", ErrorCode.EMPTY_IMAGE),
    "truncated jpeg": (JPEG[: len(JPEG) // 3], ErrorCode.UNDECODABLE_IMAGE),
    "png signature then junk": (PNG[:8] + b"\x00" * 100, ErrorCode.UNDECODABLE_IMAGE),
    "heic": ((DATA / "unsupported" / "hopper.heic").read_bytes(), ErrorCode.UNSUPPORTED_FORMAT),
    "svg": ((DATA / "unsupported" / "sdl_sample.svg").read_bytes(), ErrorCode.UNSUPPORTED_FORMAT),
    "jpeg xl": (
        (DATA / "unsupported" / "sdl_sample.jxl").read_bytes(),
        ErrorCode.UNSUPPORTED_FORMAT,
    ),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", ErrorCode.UNSUPPORTED_FORMAT),
    "zip": (b"PK\x03\x04" + b"\x00" * 60, ErrorCode.UNSUPPORTED_FORMAT),
}


def assert_still_serving(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    assert post_octet(http_url, "shape", JPEG).json()["result"]["output"] == [427, 640, 3]
    reply = stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=10)
    assert grpc_result(reply.result)["output"] == [128, 128, 3]


def test_the_table_has_one_row_per_code() -> None:
    codes = [e.code for e in ErrorCode]
    assert len(codes) == len(set(codes))
    for e in ErrorCode:
        assert 400 <= e.http_status < 600
        assert e.grpc_status in grpc.StatusCode.__members__


def test_garbage_is_undecodable_on_both_protocols(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    resp = post_octet(http_url, "shape", b"garbage body")
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "undecodable_image"
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(image=pb.Image(data=b"garbage body")), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "undecodable_image")
    assert_still_serving(http_url, stub)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_gets_its_code_over_http_and_grpc(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, case: str
) -> None:
    data, error = BAD_IMAGES[case]
    resp = post_octet(http_url, "shape", data)
    assert resp.status_code == error.http_status
    body = resp.json()["error"]
    assert body["code"] == error.code
    assert body["request_id"] == resp.headers["X-Request-ID"]

    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(image=pb.Image(data=data)), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode[error.grpc_status], error.code)
    assert info.value.details() == body["message"]

    assert_still_serving(http_url, stub)


def test_unsupported_format_names_the_detected_type(http_url: str) -> None:
    data, _ = BAD_IMAGES["heic"]
    assert "heic" in post_octet(http_url, "shape", data).json()["error"]["message"]


def test_an_avif_in_a_plain_heif_container_decodes(http_url: str) -> None:
    # Major brand "mif1" (HEIF's own), with "avif" among the compatible brands: libavif takes
    # it, and it was refused as HEIC.
    avif = (DATA / "images" / "hopper.avif").read_bytes()
    assert avif[8:12] == b"avif" and b"avif" in avif[16 : int.from_bytes(avif[:4], "big")]
    heif = avif[:8] + b"mif1" + avif[12:]
    answers = [post_octet(http_url, "shape", data) for data in (avif, heif)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["result"] == answers[1].json()["result"]


def test_one_bad_image_fails_only_its_item(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    images = [JPEG, b"garbage", PNG]
    http = post_multipart(http_url, "shape", images)
    assert http.status_code == 200
    results = http.json()["results"]
    assert [r.get("output") for r in results] == [[427, 640, 3], None, [128, 128, 3]]
    assert results[1]["error"]["code"] == "undecodable_image"

    request = pb.InferBatchRequest(
        model="shape", images=[pb.Image(data=d, name=str(i)) for i, d in enumerate(images)]
    )
    batch = [grpc_result(r) for r in stub.InferBatch(request, timeout=10).results]
    assert batch == results

    stream = stub.InferStream(
        iter(
            [
                pb.InferStreamRequest(model="shape", image=pb.Image(data=d, name=str(i)))
                for i, d in enumerate(images)
            ]
        ),
        timeout=10,
    )
    assert [grpc_result(r.result) for r in stream] == results


def test_stream_goes_on_after_an_unknown_model(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    requests_ = [
        pb.InferStreamRequest(model="nope", image=pb.Image(data=PNG)),
        pb.InferStreamRequest(model="shape", image=pb.Image(data=PNG)),
    ]
    first, second = stub.InferStream(iter(requests_), timeout=10)
    assert first.result.error.code == "model_not_found"
    assert grpc_result(second.result)["output"] == [128, 128, 3]


def test_a_stream_goes_on_after_an_unknown_model_of_a_long_name(gateway: Gateway) -> None:
    # The answer repeated the name whole as its `model`: 5 MiB of it came back, past grpc's
    # default 4 MiB receive limit, and the client's own channel ended the stream.
    requests_ = [
        pb.InferStreamRequest(model="m" * (5 << 20), image=pb.Image(data=PNG)),
        pb.InferStreamRequest(model="shape", image=pb.Image(data=PNG)),
    ]
    options = [("grpc.max_send_message_length", 64 << 20)]  # receiving: grpc's default
    with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        first, second = stub.InferStream(iter(requests_), timeout=30)
    assert first.result.error.code == "model_not_found"
    assert first.model == ""  # no model ran
    assert grpc_result(second.result)["output"] == [128, 128, 3]


def test_unknown_model(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    resp = post_octet(http_url, "nope", JPEG)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(model="nope", image=pb.Image(data=JPEG)), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "model_not_found")


def test_get_model_with_an_empty_name_describes_the_default(
    stub: pb_grpc.ImageGatewayServiceStub,
) -> None:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    described = stub.GetModel(pb.GetModelRequest(), timeout=10).model
    assert described.is_default and described == models[0]


def test_model_that_raises_gives_500_with_request_id_and_next_call_works(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    resp = post_octet(http_url, "failing", JPEG, headers={"X-Request-ID": "trace-123"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["code"] == "model_error"
    assert error["request_id"] == "trace-123"
    assert "trace-123" in error["message"]

    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(
            pb.InferRequest(model="failing", image=pb.Image(data=JPEG)),
            metadata=[("x-request-id", "trace-456")],
            timeout=10,
        )
    assert grpc_code(info.value) == (grpc.StatusCode.INTERNAL, "model_error")
    assert "trace-456" in info.value.details()
    assert dict(info.value.trailing_metadata())["x-request-id"] == "trace-456"
    assert_still_serving(http_url, stub)


def test_a_request_id_in_the_message_names_the_call(
    stub: pb_grpc.ImageGatewayServiceStub,
) -> None:
    # The proto's request_id field, on every method that has one; over the metadata when both
    # are sent. Without either, the gateway makes one.
    reply, call = stub.Infer.with_call(
        pb.InferRequest(model="shape", image=pb.Image(data=PNG), request_id="field-1"),
        metadata=[("x-request-id", "metadata-1")],
        timeout=10,
    )
    assert reply.request_id == "field-1"
    assert dict(call.trailing_metadata())["x-request-id"] == "field-1"
    batch = stub.InferBatch(
        pb.InferBatchRequest(model="shape", images=[pb.Image(data=PNG)], request_id="field-2"),
        timeout=10,
    )
    assert batch.request_id == "field-2"
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(
            pb.InferRequest(model="shape", image=pb.Image(data=b"junk"), request_id="field-3"),
            timeout=10,
        )
    assert dict(info.value.trailing_metadata())["x-request-id"] == "field-3"
    made = stub.Infer(pb.InferRequest(model="shape", image=pb.Image(data=PNG)), timeout=10)
    assert re.fullmatch("[0-9a-f]{32}", made.request_id)


def test_grpc_deadline_is_honoured(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    request = pb.InferRequest(model="slow", image=pb.Image(data=PNG))
    request.parameters.update({"seconds": 2})
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/multi", 405, "method_not_allowed"),
        ("DELETE", "/v1/models/shape/infer", 405, "method_not_allowed"),
        ("GET", "/v1/models/nope", 404, "model_not_found"),
    ],
)
def test_http_routing_errors_are_json(
    http_url: str, method: str, path: str, status: int, code: str
) -> None:
    resp = requests.request(method, f"{http_url}{path}", timeout=10)
    assert resp.status_code == status
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["error"]["code"] == code
    if status == 405:
        assert "POST" in resp.headers["Allow"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b'{"image": "..."}', 415, "unsupported_media_type"),
        ("text/plain", JPEG, 415, "unsupported_media_type"),
        ("multipart/form-data", b"--x\r\n", 400, "malformed_multipart"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="0"; filename="a"\r\n\r\nabc',
            400,
            "malformed_multipart",
        ),
    ],
)
def test_http_bodies_that_are_not_images(
    http_url: str, content_type: str, body: bytes, status: int, code: str
) -> None:
    resp = requests.post(
        f"{http_url}/v1/models/shape/infer",
        data=body,
        headers={"Content-Type": content_type},
        timeout=10,
    )
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


def test_multipart_without_file_parts(http_url: str) -> None:
    # A (None, text) tuple makes requests send a text part: multipart, but no file.
    resp = requests.post(f"{http_url}/multi", files={"note": (None, "just text")}, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "no_images"


def test_invalid_color_mode(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    resp = post_octet(http_url, "shape", JPEG, params={"color_mode": "sepia"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_request"
    # A value the proto has no name for (a newer one, or any int): refused, not decoded in color.
    unknown: Any = 99  # the type checker takes only ColorMode's named values
    for call, request in (
        (stub.Infer, pb.InferRequest(image=pb.Image(data=JPEG), color_mode=unknown)),
        (stub.InferBatch, pb.InferBatchRequest(images=[pb.Image(data=JPEG)], color_mode=unknown)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
        assert "color_mode 99" in (info.value.details() or "")
    # In a stream, the message fails alone and the next one is served.
    replies = list(
        stub.InferStream(
            iter(
                [
                    pb.InferStreamRequest(image=pb.Image(data=JPEG), color_mode=unknown),
                    pb.InferStreamRequest(image=pb.Image(data=JPEG)),
                ]
            ),
            timeout=10,
        )
    )
    assert replies[0].result.error.code == "invalid_request"
    # Both name the model that answers for "", failed or not.
    assert [r.model for r in replies] == ["shape", "shape"]
    expected = post_octet(http_url, "shape", JPEG).json()["result"]["output"]
    assert grpc_result(replies[1].result)["output"] == expected


@pytest.fixture(scope="module")
def small_gateway() -> Iterator[Gateway]:
    gw = start(Settings(http_port=0, grpc_port=0, max_request_bytes=256 * 1024))
    yield gw
    gw.stop()


def test_a_body_over_both_caps_is_payload_too_large(http_url: str) -> None:
    """By default an image may be as large as a body; a raw body over the cap is refused from
    its Content-Length as payload_too_large (the body's cap), not as an image too large."""
    host, port = http_host_port(http_url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(70_000_000))
        conn.endheaders()  # and no body: the answer comes before it would be read
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read())["error"]["code"] == "payload_too_large"
    finally:
        conn.close()


def test_request_size_cap_on_both_protocols(small_gateway: Gateway) -> None:
    big = b"\xff\xd8\xff" + b"\x00" * (300 * 1024)
    resp = post_octet(small_gateway.http_url, "shape", big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"

    chunked = requests.post(
        f"{small_gateway.http_url}/v1/models/shape/infer",
        data=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers={"Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "payload_too_large"

    with grpc.insecure_channel(small_gateway.grpc_target) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(image=pb.Image(data=big)), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=10)
        assert grpc_result(ok.result)["output"] == [128, 128, 3]
    assert post_octet(small_gateway.http_url, "shape", JPEG).status_code == 200


def test_a_message_that_is_not_protobuf_is_invalid_request(
    channel: grpc.Channel, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # grpcio answered a deserializer that raised with INTERNAL "Exception deserializing
    # request!", no error code or request id, and a traceback in the log; in a stream, the
    # stream ended.
    service = "/imagegateway.v1.ImageGatewayService"
    garbage = [
        b"\xff\xff\xff\xff\xff",
        b"\x0a\x05ab",
        b"\x12\x02\xc3\x28",
    ]  # bad tag, short, bad UTF-8
    infer = channel.unary_unary(
        f"{service}/Infer", response_deserializer=pb.InferResponse.FromString
    )
    for raw in garbage:
        with pytest.raises(grpc.RpcError) as info:
            infer(raw, timeout=10, metadata=[("x-request-id", "not-protobuf")])
        assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
        assert "not a valid InferRequest message" in (info.value.details() or "")
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing["x-request-id"] == "not-protobuf"
    stream = channel.stream_stream(
        f"{service}/InferStream", response_deserializer=pb.InferStreamResponse.FromString
    )
    good = pb.InferStreamRequest(image=pb.Image(data=PNG)).SerializeToString()
    replies = list(stream(iter([good, garbage[0], good]), timeout=10))
    assert [r.result.WhichOneof("outcome") for r in replies] == ["output", "error", "output"]
    assert replies[1].result.error.code == "invalid_request"
    assert_still_serving_grpc(stub)


def test_a_health_or_reflection_message_that_is_not_protobuf_is_invalid_request(
    channel: grpc.Channel, stub: pb_grpc.ImageGatewayServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    # grpcio answered them INTERNAL "Exception deserializing request!", without error code or
    # request id, and logged a traceback; a reflection stream ended.
    garbage = b"\xff\xff"
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    with caplog.at_level(logging.ERROR):
        for call in (check, lambda raw, **kw: list(watch(raw, **kw))):
            with pytest.raises(grpc.RpcError) as info:
                call(garbage, timeout=10, metadata=[("x-request-id", "bad-health")])
            assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
            assert dict(info.value.trailing_metadata() or ())["x-request-id"] == "bad-health"
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        replies = list(reflect(iter([good, garbage, good]), timeout=10))
        assert [r.WhichOneof("message_response") for r in replies] == [
            "list_services_response",
            "error_response",
            "list_services_response",
        ]
        assert replies[1].error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
    assert_still_serving_grpc(stub)


def _len_field(number: int, payload: bytes) -> bytes:
    key, length = bytearray([number << 3 | 2]), bytearray()
    size = len(payload)
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return bytes(key + length) + payload


def test_a_message_of_countless_small_fields_is_refused_before_it_is_parsed(
    gateway: Gateway, channel: grpc.Channel, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # The walk that finds the image bytes ran on grpc's own thread, a Python loop turn per
    # field: 4 MB of two-byte unknown fields held every call of the worker, health checks
    # included, for seconds, took 670 MB, and was then answered OK; a million empty images
    # were refused too_many_images only after 7 s.
    service = "/imagegateway.v1.ImageGatewayService"
    infer = channel.unary_unary(
        f"{service}/Infer", response_deserializer=pb.InferResponse.FromString
    )
    batch = channel.unary_unary(
        f"{service}/InferBatch", response_deserializer=pb.InferBatchResponse.FromString
    )
    image = pb.InferRequest(image=pb.Image(data=PNG)).SerializeToString()
    empty_values = _len_field(1, b"") * 40_000  # a Struct list of 40,000 empty values, 80 KB
    parameters = _len_field(
        3, _len_field(1, _len_field(1, b"k") + _len_field(2, _len_field(6, empty_values)))
    )
    cases = [
        (
            infer,
            image + b"\x50\x00" * 2_000_000,
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_request",
        ),
        (batch, b"\x12\x00" * 1_000_000, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_images"),
        # A group first: the walk used to leave the message to protobuf, which parsed it all.
        (
            batch,
            b"\x33\x34" + b"\x12\x00" * 1_000_000,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_many_images",
        ),
        (infer, image + parameters, grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_too_large"),
    ]
    for method, raw, status, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            method(raw, timeout=30, metadata=[("x-request-id", f"flood-{code}")])
        assert grpc_code(info.value) == (status, code)
        assert dict(info.value.trailing_metadata() or ())["x-request-id"] == f"flood-{code}"
    # The same parameters as one HTTP text field: the same code.
    form: dict[str, tuple[str | None, str | bytes]] = {
        "k": (None, "x" * 70_000),
        "0": ("a.png", PNG),
    }
    resp = requests.post(f"{gateway.http_url}/v1/models/shape/infer", files=form, timeout=30)
    assert (resp.status_code, resp.json()["error"]["code"]) == (413, "payload_too_large")
    # At the limits, requests go through: 64 images, and parameters under 64 KiB.
    full = pb.InferBatchRequest(images=[pb.Image(data=PNG)] * 64)
    full.parameters["text"] = "x" * 60_000
    results = stub.InferBatch(full, timeout=30).results
    assert [grpc_result(r)["output"] for r in results] == [[128, 128, 3]] * 64
    assert_still_serving_grpc(stub)


def assert_still_serving_grpc(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    reply = stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=10)
    assert grpc_result(reply.result)["output"] == [128, 128, 3]


def test_a_long_model_name_is_not_repeated_whole(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    name = "m" * 1_000_000  # a gRPC message may carry that much; the answer's trailers may not
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(model=name, image=pb.Image(data=PNG)), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    details = info.value.details() or ""
    assert "m" * 64 + "'..." in details and len(details) < 200
    resp = post_octet(http_url, "m" * 10_000, PNG)
    assert resp.status_code == 404 and len(resp.json()["error"]["message"]) < 200


def test_a_boundary_that_is_not_ascii_is_malformed_multipart(http_url: str) -> None:
    # Werkzeug decodes an RFC 2231 boundary*= to any character: this was a 500.
    resp = requests.post(
        f"{http_url}/v1/infer",
        data=b"--\xe2\x82\xac\r\n",
        headers={"Content-Type": "multipart/form-data; boundary*=UTF-8''%E2%82%AC"},
        timeout=10,
    )
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "malformed_multipart")


def test_infer_without_an_image_field_is_no_images(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(model="shape"), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "no_images")
    # An image sent with no bytes is an empty image, as in a batch.
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(model="shape", image=pb.Image(name="a")), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "empty_image")


def test_a_stream_ends_with_its_request_id(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    call = stub.InferStream(
        iter([pb.InferStreamRequest(image=pb.Image(data=PNG))]),
        metadata=[("x-request-id", "stream-id-1")],
        timeout=10,
    )
    assert [r.request_id for r in call] == ["stream-id-1-0"]
    assert dict(call.trailing_metadata() or ())["x-request-id"] == "stream-id-1"


def test_an_image_name_past_4096_characters_is_refused(
    stub: pb_grpc.ImageGatewayServiceStub,
) -> None:
    # Names come back in the answer: long ones made an answer past what gRPC sends.
    fine = pb.InferBatchRequest(images=[pb.Image(data=PNG, name="n" * 4096)])
    assert stub.InferBatch(fine, timeout=10).results[0].name == "n" * 4096
    long = pb.InferBatchRequest(images=[pb.Image(data=PNG, name="n" * 4097)] * 4)
    with pytest.raises(grpc.RpcError) as info:
        stub.InferBatch(long, timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
    assert "4097 characters" in (info.value.details() or "")


def test_compressed_messages_and_large_metadata_are_refused(gateway: Gateway) -> None:
    # Images do not compress: gzip only let a small message cost megabytes to inflate.
    request = pb.InferRequest(image=pb.Image(data=PNG))
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=10, compression=grpc.Compression.Gzip)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "gzip" in (info.value.details() or "")
    options = [("grpc.absolute_max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=10, metadata=[("note", "v" * 70_000)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Under the limit, and uncompressed, as usual.
        reply = stub.Infer(request, timeout=10, metadata=[("note", "v" * 60_000)])
        assert grpc_result(reply.result)["output"] == [128, 128, 3]


def _with_parameters(message: Any, **values: Any) -> Any:
    for key, value in values.items():
        message.parameters[key] = value
    return message


def test_grpc_parameters_reach_the_model_as_json(stub: pb_grpc.ImageGatewayServiceStub) -> None:
    from tests.models import SPY

    # json_format gave 3 as 3.0.
    request = pb.InferRequest(model="spy", image=pb.Image(data=PNG))
    request.parameters.update({"k": 3, "t": 0.5, "s": "x", "on": True, "l": [1, "a"]})
    stub.Infer(request, timeout=10)
    params = SPY.calls[-1]["params"]
    assert params == {"k": 3, "t": 0.5, "s": "x", "on": True, "l": [1, "a"]}
    assert type(params["k"]) is int and type(params["l"][0]) is int


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "color_mode"])
def test_a_parameter_no_json_holds_is_invalid_request_and_a_stream_goes_on(
    stub: pb_grpc.ImageGatewayServiceStub, value: Any
) -> None:
    # A NaN failed the call as `internal` (json_format raised ValueError), and ended an
    # InferStream with UNKNOWN. A color_mode parameter reached the model over gRPC only.
    bad = {"color_mode": "grayscale"} if value == "color_mode" else {"x": value}
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(_with_parameters(pb.InferRequest(image=pb.Image(data=PNG)), **bad), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
    messages = [
        _with_parameters(pb.InferStreamRequest(image=pb.Image(data=PNG)), **params)
        for params in ({"x": 1}, bad, {"x": 2})
    ]
    replies = list(stub.InferStream(iter(messages), timeout=10))
    assert [r.result.WhichOneof("outcome") for r in replies] == ["output", "error", "output"]
    assert replies[1].result.error.code == "invalid_request"


@pytest.mark.parametrize(
    ("query", "fields"),
    [("?q=1&q=2", []), ("?q=1", [("q", "2")]), ("?color_mode=color", [("color_mode", "color")])],
    ids=["query twice", "query and field", "color_mode"],
)
def test_a_parameter_given_twice_is_invalid_request(
    http_url: str, query: str, fields: list[tuple[str, str]]
) -> None:
    # The model got one of the values, silently. (Two text fields of one name are
    # duplicate_part.)
    from tests.hostile import file_part, multipart, text_part
    from tests.test_hostile import post_multipart_body

    body = multipart([file_part("0", PNG), *(text_part(k, v) for k, v in fields)])
    resp = post_multipart_body(http_url, body, f"/v1/models/spy/infer{query}")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_request"
    assert "is given twice" in resp.json()["error"]["message"]


def test_an_unknown_model_is_found_out_before_a_missing_image(
    stub: pb_grpc.ImageGatewayServiceStub,
) -> None:
    # Infer and InferStream answered no_images, InferBatch and HTTP model_not_found.
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(model="nope"), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    [reply] = stub.InferStream(iter([pb.InferStreamRequest(model="nope")]), timeout=10)
    assert reply.result.error.code == "model_not_found"
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, "no_images")


def test_an_unusable_request_id_field_leaves_the_metadata_id_and_ids_stay_short(
    stub: pb_grpc.ImageGatewayServiceStub,
) -> None:
    # A 129-character field replaced a usable x-request-id with a fresh id; a stream's ids,
    # derived from a 128-character stream id, were 130 characters long.
    request = pb.InferRequest(image=pb.Image(data=PNG), request_id="x" * 129)
    _, call = stub.Infer.with_call(request, metadata=(("x-request-id", "md-id"),), timeout=10)
    assert dict(call.trailing_metadata())["x-request-id"] == "md-id"
    long_id = "s" * 128
    messages = [pb.InferStreamRequest(image=pb.Image(data=PNG)) for _ in range(2)]
    replies = list(
        stub.InferStream(iter(messages), metadata=(("x-request-id", long_id),), timeout=10)
    )
    ids = [r.request_id for r in replies]
    assert [len(i) for i in ids] == [128, 128] and ids[0].endswith("-0") and ids[1].endswith("-1")


@pytest.mark.parametrize("coding", ["gzip", "br", "gzip, identity"])
def test_a_body_with_a_content_coding_is_415(http_url: str, coding: str) -> None:
    # The header was not read: a gzipped JPEG was refused as the format "gzip", and a plain one
    # labelled gzip was decoded as if the label were not there.
    import gzip

    for body in (JPEG, gzip.compress(JPEG)):
        resp = post_octet(http_url, "shape", body, headers={"Content-Encoding": coding})
        assert resp.status_code == 415
        assert resp.json()["error"]["code"] == "unsupported_media_type"
        assert "Content-Encoding" in resp.json()["error"]["message"]
        assert resp.headers["Accept-Encoding"] == "identity"
    resp = post_multipart(http_url, "shape", [JPEG], headers={"Content-Encoding": coding})
    assert resp.status_code == 415
    identity = post_octet(http_url, "shape", JPEG, headers={"Content-Encoding": "identity"})
    assert identity.json()["result"]["output"] == [427, 640, 3]


def test_parameters_are_utf8_text_or_refused(http_url: str) -> None:
    # Werkzeug put an escape that did not decode back as it came: ?x=%FF and ?x=%25FF both
    # reached the model as "%FF"; a text field's bad byte became U+FFFD.
    from tests.hostile import file_part, multipart, text_part
    from tests.models import SPY
    from tests.test_hostile import post_multipart_body

    def post_query(query: str) -> requests.Response:
        # The query as written: requests would escape a "%" of its own `params`.
        return requests.post(
            f"{http_url}/v1/models/spy/infer?{query}",
            data=PNG,
            headers={"Content-Type": "application/octet-stream"},
            timeout=10,
        )

    for query, sent in [("x=%25FF", "%FF"), ("x=%C3%A9&y=a+b&z", "é"), ("x=%E2%82%AC", "€")]:
        SPY.calls.clear()
        resp = post_query(query)
        assert resp.status_code == 200
        assert SPY.calls[-1]["params"]["x"] == sent
        if "y=" in query:
            assert (SPY.calls[-1]["params"]["y"], SPY.calls[-1]["params"]["z"]) == ("a b", "")
    for query in ("x=%FF", "%FF=1", "x=%C3"):
        resp = post_query(query)
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_request"
        assert "UTF-8" in resp.json()["error"]["message"]
    body = multipart([file_part("0", PNG), text_part("x", "\xe9")])
    resp = post_multipart_body(http_url, body.replace(b"\xc3\xa9", b"\xe9"), "/v1/models/spy/infer")
    assert resp.status_code == 400
    assert "text field 'x' is not UTF-8" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    "target",
    ["//v1/infer", "/v1//models/shape//infer", "http://x/v1/infer", "HTTP://x:1/v1/infer?y=1"],
)
def test_request_targets_a_server_must_take(http_url: str, target: str) -> None:
    # cheroot refused an absolute-form target (RFC 9112 3.2.2: a server must accept it) and one
    # starting "//" (a base URL ending in "/" joined to a path) as "Absolute URI not allowed";
    # Werkzeug answered "//" inside a path with an HTML redirect.
    connection = http.client.HTTPConnection(*http_host_port(http_url), timeout=10)
    try:
        connection.request("POST", target, PNG, {"Content-Type": "image/png"})
        answer = connection.getresponse()
        assert answer.status == 200
        assert json.loads(answer.read())["result"]["output"] == [128, 128, 3]
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    ["/v1/models/shape/infer/", "/v1/models/shape%2Finfer", "/v1/models/nope/infer/"],
)
def test_paths_that_cannot_hold_a_model_name_are_not_found(http_url: str, path: str) -> None:
    # They were taken for a model name of the GET route, and a POST answered 405 offering GET,
    # which then said there was no such model.
    connection = http.client.HTTPConnection(*http_host_port(http_url), timeout=10)
    try:
        connection.request("POST", path, PNG, {"Content-Type": "image/png"})
        answer = connection.getresponse()
        body = json.loads(answer.read())
        assert (answer.status, body["error"]["code"]) == (404, "not_found")
        assert answer.getheader("Allow") is None
    finally:
        connection.close()


def test_request_lines_with_slashes_in_awkward_places(http_url: str) -> None:
    # "//" was seen only in the first packet's bytes, and one empty line before the request
    # line (which a server skips) hid it: 400 "Absolute URI not allowed", or an HTML redirect.
    def answer(*pieces: bytes) -> bytes:
        with socket.create_connection(http_host_port(http_url), timeout=10) as s:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.05)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    close = b"Host: x\r\nConnection: close\r\n\r\n"
    assert answer(b"\r\nGET //healthz HTTP/1.1\r\n" + close).startswith(b"HTTP/1.1 200 ")
    assert answer(b"GET healthz//x HTTP/1.1\r\n" + close).startswith(b"HTTP/1.1 400 ")


def _answers(http_url: str, *pieces: bytes) -> list[bytes]:
    """The status lines of the answers to `pieces`, each sent once the server has read the one
    before (the connection closed by the server after the last answer)."""
    with socket.create_connection(http_host_port(http_url), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces[:-1]:
            send_and_see_read(s, piece)
        s.sendall(pieces[-1])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", data)


_CLOSE = b"Host: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "pieces",
    [
        (b"GET /", b"/healthz HTTP/1.1\r\n" + _CLOSE),
        (b"\r\nGET /", b"/healthz HTTP/1.1\r\n" + _CLOSE),
        (b"GET http://gw.example/healthz", b" HTTP/1.1\r\n" + _CLOSE),
        (b"GET h", b"ttp://gw.example/healthz HTTP/1.1\r\n" + _CLOSE),
        (b"GET /v1", b"//models HTTP/1.1\r\n" + _CLOSE),
        (b"GET //v1/mod", b"els//shape HTTP/1.1\r\n" + _CLOSE),
    ],
)
def test_a_request_line_split_across_reads_is_taken_as_a_whole(
    http_url: str, pieces: tuple[bytes, ...]
) -> None:
    # Whether a target was made a plain path was decided from the bytes that had come when the
    # request was first read: the same request line, cut in two, was 400 "Absolute URI not
    # allowed if server is not a proxy", or 404.
    assert _answers(http_url, *pieces) == [b"HTTP/1.1 200 OK"]


def test_a_post_to_a_path_with_two_slashes_split_after_its_first_bytes(http_url: str) -> None:
    head = f"POST /v1//infer HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: {len(PNG)}\r\n"
    request = head.encode() + _CLOSE + PNG
    assert _answers(http_url, request[:8], request[8:]) == [b"HTTP/1.1 200 OK"]


def test_a_pipelined_request_line_across_the_read_buffer_is_taken_as_a_whole(
    http_url: str,
) -> None:
    # The server reads a connection 8 KiB at a time: a second request whose line began at the
    # end of the first 8 KiB was judged on its first bytes ("GET /"), and "//healthz" was 400.
    second = b"GET //healthz HTTP/1.1\r\n" + _CLOSE
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
    pad = 8192 - len(b"GET /") - len(first)
    first = first.replace(b"X-Pad: ", b"X-Pad: " + b"p" * pad)
    assert len(first) + len(b"GET /") == 8192
    assert _answers(http_url, first + second) == [b"HTTP/1.1 200 OK"] * 2
    # The same, the second line's end sent only once the server has read its start.
    assert _answers(http_url, first + b"GET /", second[5:]) == [b"HTTP/1.1 200 OK"] * 2


def _raw_exchange(http_url: str, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send `request` as it is; the answer's status line, headers and body (read to close)."""
    with socket.create_connection(http_host_port(http_url), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *fields = head.split(b"\r\n")
    headers = {
        k.decode().lower(): v.decode().strip() for k, _, v in (f.partition(b":") for f in fields)
    }
    return status, headers, body


def test_connect_is_refused_with_what_is_allowed(http_url: str) -> None:
    # cheroot's 405 for CONNECT carried no Allow (RFC 9110 15.5.6: a 405 must) and said only
    # "Method Not Allowed".
    status, headers, body = _raw_exchange(
        http_url, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert status.startswith(b"HTTP/1.1 405 ")
    assert headers["allow"] == "GET, HEAD, POST, OPTIONS"
    error = json.loads(body)["error"]
    assert error["code"] == "method_not_allowed"
    assert "proxies" in error["message"]
    assert error["request_id"] == headers["x-request-id"]


def test_options_asterisk_describes_the_server(http_url: str) -> None:
    # `OPTIONS *` asks about the server as a whole (RFC 9110 9.3.7); it was answered 404.
    status, headers, body = _raw_exchange(
        http_url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status.startswith(b"HTTP/1.1 200 ")
    assert headers["allow"] == "GET, HEAD, POST, OPTIONS"
    assert headers["x-request-id"]
    assert body == b""
    # A path that only looks like it is a route's business, as before.
    status, _, _ = _raw_exchange(
        http_url, b"OPTIONS /* HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status.startswith(b"HTTP/1.1 404 ")


def test_a_stream_message_refused_before_its_model_ran_names_no_model_it_did_not_name(
    channel: grpc.Channel,
) -> None:
    # Each refused message was answered in the default model's name, as if it had run.
    stream = channel.stream_stream(
        "/imagegateway.v1.ImageGatewayService/InferStream",
        request_serializer=lambda data: data,
        response_deserializer=pb.InferStreamResponse.FromString,
    )
    big = {"x": "y" * 70_000}  # over the 64 KiB parameters take
    messages = [
        b"\xff\xff\xff",  # not protobuf: nothing of it read
        _with_parameters(pb.InferStreamRequest(model="nope", image=pb.Image(data=PNG)), **big),
        _with_parameters(pb.InferStreamRequest(model="qrcode", image=pb.Image(data=PNG)), **big),
        pb.InferStreamRequest(image=pb.Image(data=b"not an image")),
        pb.InferStreamRequest(image=pb.Image(data=PNG)),
    ]
    replies = list(
        stream(
            iter(m if isinstance(m, bytes) else m.SerializeToString() for m in messages),
            timeout=10,
        )
    )
    assert [r.result.error.code for r in replies] == [
        "invalid_request",
        "payload_too_large",
        "payload_too_large",
        "undecodable_image",
        "",
    ]
    # The model the message named and the gateway serves, the default one for "", else none.
    assert [r.model for r in replies] == ["", "", "qrcode", "shape", "shape"]

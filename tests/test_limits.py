"""Limits are published alike by both fronts and the client, and the per-image byte cap fails
only the image over it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import asdict

import grpc
import pytest
import requests

from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings, published_limits
from gateway.serve import Gateway, start
from tests.conftest import DATA
from tests.wire import grpc_code

SMALL = (DATA / "images" / "hopper.jpg").read_bytes()  # 6 KB
BIG = (DATA / "images" / "rocket.jpg").read_bytes()  # 112 KB
SETTINGS = Settings(
    http_port=0,
    grpc_port=0,
    max_request_bytes=1_000_000,
    max_image_bytes=20_000,
    max_images=5,
    max_parts=7,
    max_image_pixels=4_000_000,
    max_request_pixels=9_000_000,
    request_timeout=12.5,
)


@pytest.fixture(scope="module")
def capped() -> Iterator[Gateway]:
    gw = start(SETTINGS)
    yield gw
    gw.stop()


def published(gateway: Gateway) -> list[dict[str, object]]:
    """The limits as HTTP, gRPC and the client over each protocol give them."""
    http = requests.get(f"{gateway.http_url}/v1/limits", timeout=10).json()
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        reply = pb_grpc.ImageGatewayServiceStub(channel).GetLimits(
            pb.GetLimitsRequest(), timeout=10
        )
    grpc_limits = {f.name: getattr(reply.limits, f.name) for f in pb.Limits.DESCRIPTOR.fields}
    clients = []
    for url in (gateway.http_url, f"grpc://{gateway.grpc_target}"):
        with GatewayClient(url) as client:
            clients.append(asdict(client.limits()))
    return [http, grpc_limits, *clients]


def test_defaults_are_published_alike(gateway: Gateway) -> None:
    want = asdict(published_limits(Settings()))
    assert want["max_request_bytes"] == 64 * 1024 * 1024
    for got in published(gateway):
        assert got == want


def test_configured_limits_are_published_alike(capped: Gateway) -> None:
    want = {
        "max_request_bytes": 1_000_000,
        "max_image_bytes": 20_000,
        "max_images": 5,
        "max_parts": 7,
        "max_image_pixels": 4_000_000,
        "max_request_pixels": 9_000_000,
        "request_timeout_seconds": 12.5,
    }
    for got in published(capped):
        assert got == want


def test_an_image_cap_over_the_request_cap_is_published_as_the_request_cap() -> None:
    limits = published_limits(Settings(max_request_bytes=1000, max_image_bytes=5000))
    assert limits.max_image_bytes == 1000


def test_an_image_over_the_byte_cap_fails_alone_over_http(capped: Gateway) -> None:
    single = requests.post(
        f"{capped.http_url}/v1/infer",
        data=BIG,
        headers={"Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert single.status_code == 413, single.text
    error = single.json()["error"]
    assert error["code"] == "image_too_large"
    assert f"{len(BIG)} bytes" in error["message"] and "20000" in error["message"]
    files = {str(i): (f"{i}.jpg", data) for i, data in enumerate([SMALL, BIG, SMALL])}
    batch = requests.post(f"{capped.http_url}/v1/infer", files=files, timeout=10)
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r.get("error", {}).get("code") for r in results] == [None, "image_too_large", None]
    assert results[0]["output"] == results[2]["output"] == [128, 128, 3]


def test_an_image_over_the_byte_cap_fails_alone_over_grpc(capped: Gateway) -> None:
    with grpc.insecure_channel(capped.grpc_target) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(pb.InferRequest(image=pb.Image(data=BIG)), timeout=10)
        assert grpc_code(caught.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "image_too_large")
        images = [pb.Image(data=d, name=str(i)) for i, d in enumerate([SMALL, BIG, SMALL])]
        reply = stub.InferBatch(pb.InferBatchRequest(images=images), timeout=10)
    codes = [r.error.code if r.HasField("error") else None for r in reply.results]
    assert codes == [None, "image_too_large", None]


def test_a_raw_body_over_the_image_cap_is_refused_before_it_is_read(capped: Gateway) -> None:
    # Content-Length says 100 KB and only 10 bytes follow: an answer that waited for the body
    # would never come before the socket timeout.
    host, port = capped.http_url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: 100000\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + b"\xff\xd8\xff" + b"\0" * 7)
        answer = sock.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"image_too_large"' in answer and b"100000 bytes" in answer

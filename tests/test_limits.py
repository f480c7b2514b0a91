"""Limits are published alike by both fronts and the client, and the per-image byte cap fails
only the image over it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import cv2
import grpc
import numpy as np
import pytest
import requests

from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from clients.results import GatewayClientError, ImageResult
from gateway.config import Settings, published_limits
from gateway.core.admission import Admission
from gateway.serve import Gateway, start
from tests.conftest import DATA, wait_for
from tests.models import GATE
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


@pytest.mark.parametrize("case", ["image over its cap", "too many parts", "chunked, unknown model"])
def test_a_client_that_sends_its_whole_body_before_reading_gets_the_answer(
    capped: Gateway, case: str
) -> None:
    # What Python's http.client does: the whole body, then the answer. The gateway answered from
    # what it had read and closed with the rest unread: the reset that sent made the client's
    # sendall fail with a broken pipe, or its kernel drop the answer.
    from tests.hostile import BOUNDARY, file_part, multipart

    host, port = capped.http_url.removeprefix("http://").split(":")
    if case == "image over its cap":
        body = b"\xff\xd8\xff" + b"\0" * 900_000
        head = "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        expected = b'"image_too_large"'
    elif case == "too many parts":
        body = multipart([file_part(str(i), b"\0" * 100_000) for i in range(9)])
        head = "POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
        head += f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        expected = b'"too_many_parts"'
    else:
        data = b"\0" * 900_000
        body = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
        head = "POST /v1/models/nope/infer HTTP/1.1\r\nHost: x\r\n"
        head += "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        expected = b'"model_not_found"'
    for _ in range(3):
        with socket.socket() as sock:
            # A small send buffer, as over a real network: the body cannot all be on its way
            # before the gateway answers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            sock.settimeout(10)
            sock.connect((host, int(port)))
            sock.sendall(head.encode() + body)
            answer = b""
            while chunk := sock.recv(1 << 16):
                answer += chunk
        assert expected in answer, answer[:300]


def test_a_slow_client_sending_a_refused_body_whole_gets_the_answer(capped: Gateway) -> None:
    # As above, over a slow link: the body still arrives 2 s after the answer. The closing
    # thread lingered 1 s at most, then closed with bytes unread: a reset, and a broken pipe.
    host, port = capped.http_url.removeprefix("http://").split(":")
    body = b"\0" * 3_000_000  # over max_request_bytes: refused from its Content-Length
    head = (
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        sock.sendall(head)
        for start in range(0, len(body), 100_000):  # about 1.5 MB/s
            sock.sendall(body[start : start + 100_000])
            time.sleep(0.06)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"payload_too_large"' in answer


TIGHT = Settings(
    http_port=0,
    grpc_port=0,
    max_request_bytes=60_000,
    max_image_bytes=20_000,
    max_images=5,
    max_image_pixels=30_000,
    max_request_pixels=40_000,  # two 128x128 images, not three
)


@pytest.fixture(scope="module")
def tight() -> Iterator[Gateway]:
    gw = start(TIGHT)
    yield gw
    gw.stop()


def _noise_png(seed: int, height: int = 75, width: int = 80) -> bytes:
    # Noise does not compress: 75x80 is about 18 KB, three to the tight gateway's request.
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", noise)
    assert ok
    return png.tobytes()


def _refused(gateway: Gateway) -> float:
    """Requests the gateway has answered 413 / RESOURCE_EXHAUSTED, over both protocols."""
    text = requests.get(f"{gateway.http_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{")
        and ('code="413"' in line or 'code="RESOURCE_EXHAUSTED"' in line)
    )


def _infer_both(gateway: Gateway, images: list[bytes]) -> list[ImageResult]:
    results = {}
    for url in (gateway.http_url, f"grpc://{gateway.grpc_target}"):
        with GatewayClient(url) as client:
            results[url] = client.infer_batch(images)
    http, grpc_results = results.values()
    assert http == grpc_results
    assert [r.name for r in http] == [str(i) for i in range(len(images))]
    return http


def test_the_client_splits_a_batch_by_images_and_bytes(tight: Gateway) -> None:
    noise = [_noise_png(seed) for seed in range(7)]
    over_cap = _noise_png(9, 100, 100)  # about 30 KB: over the image cap, under the request's
    assert 20_000 < len(over_cap) < 60_000 - 4096
    images = [*noise[:4], over_cap, *noise[4:], BIG]
    # Sent whole, the gateway refuses it.
    files = {str(i): (str(i), data) for i, data in enumerate(images)}
    assert requests.post(f"{tight.http_url}/v1/infer", files=files, timeout=10).status_code == 413
    # The gateway's own answer for an image over its cap.
    alone = requests.post(f"{tight.http_url}/v1/infer", files={"4": ("4", over_cap)}, timeout=10)
    (server_says,) = alone.json()["results"]
    assert server_says["error"]["code"] == "image_too_large"

    refused = _refused(tight)
    results = _infer_both(tight, images)
    # Every request the client made fitted: none was refused and sent again.
    assert _refused(tight) == refused
    assert results[4].to_dict() == server_says
    assert results[-1].error is not None and results[-1].error.code == "image_too_large"
    assert f"{len(BIG)} bytes" in results[-1].error.message
    assert [r.output for i, r in enumerate(results) if i not in (4, len(images) - 1)] == [
        [75, 80, 3]
    ] * 7


def test_the_client_halves_a_request_over_the_pixel_budget(tight: Gateway) -> None:
    # Three 128x128 images are under the image and byte limits but over the pixels a request
    # may hold, which only the gateway can tell from their headers.
    three = {str(i): (str(i), SMALL) for i in range(3)}
    refused = requests.post(f"{tight.http_url}/v1/infer", files=three, timeout=10)
    assert refused.json()["error"]["code"] == "too_many_pixels"
    results = _infer_both(tight, [SMALL] * 7)
    assert [r.output for r in results] == [[128, 128, 3]] * 7


def test_a_whole_request_error_still_raises_from_a_split_batch(tight: Gateway) -> None:
    for url in (tight.http_url, f"grpc://{tight.grpc_target}"):
        with GatewayClient(url) as client, pytest.raises(GatewayClientError) as caught:
            client.infer_batch([SMALL] * 7, model="nope")
        assert caught.value.code == "model_not_found"


@pytest.fixture(scope="module")
def even_caps() -> Iterator[Gateway]:
    # The image cap as large as the request's, as by default; fewer parts than images.
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            max_request_bytes=60_000,
            max_image_bytes=60_000,
            max_images=5,
            max_parts=3,
            max_request_pixels=64 * 128 * 128,
        )
    )
    yield gw
    gw.stop()


def test_an_image_no_request_can_carry_fails_alone_without_being_sent(even_caps: Gateway) -> None:
    # Under the image cap, but with the request around it over the request's: sent, it was
    # refused by grpc itself (RESOURCE_EXHAUSTED without the gateway's code), and the client
    # raised for the whole batch, losing the good images.
    ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
    assert ok
    padded = png.tobytes() + b"\0" * (59_990 - len(png))  # PNG readers stop at IEND
    refused = _refused(even_caps)
    results = _infer_both(even_caps, [SMALL, padded, SMALL])
    assert _refused(even_caps) == refused
    assert [r.output for r in results] == [[128, 128, 3], None, [128, 128, 3]]
    assert results[1].error is not None and results[1].error.code == "payload_too_large"


def test_the_client_sends_no_more_parts_than_the_gateway_takes(even_caps: Gateway) -> None:
    # max_parts (3) under max_images (5): a request of five parts was refused too_many_parts.
    refused = _refused(even_caps)
    results = _infer_both(even_caps, [_noise_png(seed, 20, 20) for seed in range(7)])
    assert _refused(even_caps) == refused
    assert [r.output for r in results] == [[20, 20, 3]] * 7


def _post_chunked(gateway: Gateway, body: bytes) -> tuple[int, dict[str, object]]:
    response = requests.post(
        f"{gateway.http_url}/v1/infer",
        data=iter([body[:1000], body[1000:]]),  # an iterable body goes out chunked
        headers={"Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    return response.status_code, response.json()


def test_a_chunked_body_may_be_as_large_as_one_of_known_length(even_caps: Gateway) -> None:
    ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
    assert ok
    at_cap = png.tobytes() + b"\0" * (60_000 - len(png))  # PNG readers stop at IEND
    status, body = _post_chunked(even_caps, at_cap)
    assert status == 200, body
    assert body["result"]["output"] == [32, 32, 3]  # type: ignore[index]
    status, body = _post_chunked(even_caps, at_cap + b"\0")
    assert (status, body["error"]["code"]) == (413, "payload_too_large")  # type: ignore[index]


def test_an_image_that_decodes_deep_takes_more_of_the_pixel_budget() -> None:
    # A 9000-pixel float64 RGB TIFF decodes to 24 bytes a pixel, three times the 16-bit RGBA the
    # budget (2 x 10,000 pixels) is sized for: in `unchanged` it takes the whole budget, and a
    # small image waits for it instead of decoding beside it.
    ok, deep = cv2.imencode(".tiff", np.zeros((90, 100, 3), np.float64))
    assert ok
    _decodes_alone(deep.tobytes(), "unchanged", [90, 100, 3])


def test_a_jpeg2000_takes_the_budget_of_openjpeg_planes_in_every_mode() -> None:
    # OpenJPEG holds a plane of 32-bit samples for each of an RGBA image's components whatever
    # OpenCV makes of them: 16 bytes a pixel, twice the 16-bit RGBA the budget is sized for. In
    # `color`, 9000 such pixels take the budget of 19,675, and a small image waits.
    ok, image = cv2.imencode(".jp2", np.zeros((90, 100, 4), np.uint8))
    assert ok
    _decodes_alone(image.tobytes(), "color", [90, 100, 3])


def _decodes_alone(data: bytes, color_mode: str, shape: list[int]) -> None:
    """`data` takes so much of a budget of 2 x 10,000 pixels that a 50x50 PNG sent while it
    decodes waits for it."""
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("tests.models:gated",),
            max_concurrency=2,
            max_request_pixels=10_000,
        )
    )
    ok, small = cv2.imencode(".png", np.zeros((50, 50, 3), np.uint8))
    assert ok
    url = f"{gw.http_url}/v1/infer?color_mode={color_mode}"
    GATE.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(requests.post, url, data=data, timeout=30)
            wait_for(lambda: gw.dataplane.admission.active == 1, "the first image is admitted")
            second = pool.submit(requests.post, url, data=small.tobytes(), timeout=30)
            wait_for(lambda: gw.dataplane.admission.waiting == 1, "the small image waits")
            assert gw.dataplane.admission.active == 1
            GATE.set()
            outputs = [f.result().json()["result"]["output"] for f in (first, second)]
        assert outputs == [shape, [50, 50, 3]]
    finally:
        GATE.set()
        gw.stop()


def test_waiting_requests_are_let_in_in_the_order_they_came() -> None:
    # Woken together and let in by whoever fit first, small requests overtook a large one
    # waiting for the whole budget; under a steady stream of them it waited until its deadline.
    admission = Admission(max_concurrency=1, max_queue=8, max_request_pixels=100)
    release = {name: threading.Event() for name in ("a1", "a2", "big", "small")}
    admitted: list[str] = []

    def request(name: str, pixels: int) -> None:
        with admission.slot(pixels, deadline=None):
            admitted.append(name)
            release[name].wait(10)

    with ThreadPoolExecutor(4) as pool:
        pool.submit(request, "a1", 10)
        pool.submit(request, "a2", 10)
        wait_for(lambda: admission.active == 2, "two small requests hold 20 of 100 pixels")
        pool.submit(request, "big", 100)
        wait_for(lambda: admission.waiting == 1, "the large one waits for the whole budget")
        pool.submit(request, "small", 10)
        wait_for(lambda: admission.waiting == 2, "a small one waits behind it")
        release["a1"].set()
        wait_for(lambda: admission.active == 1, "one small request has left")
        # 90 pixels are free and the small one would fit, but the large one is first in line.
        time.sleep(0.3)
        assert admitted == ["a1", "a2"] and admission.waiting == 2
        release["a2"].set()
        wait_for(lambda: admitted == ["a1", "a2", "big"], "the large one goes in first")
        assert admission.waiting == 1
        release["big"].set()
        wait_for(lambda: admitted[-1] == "small", "then the small one")
        release["small"].set()

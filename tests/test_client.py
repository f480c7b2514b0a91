"""GatewayClient gives the same result objects over grpc:// and http://."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests

from clients.client import GatewayClient
from clients.results import GatewayClientError, ImageInfo, ImageResult
from gateway.serve import Gateway
from tests.conftest import DATA, IMAGES

JPEG_PATH = DATA / "images" / "rocket.jpg"


@pytest.fixture(scope="module")
def clients(gateway: Gateway) -> Iterator[dict[str, GatewayClient]]:
    both = {
        "http": GatewayClient(gateway.http_url),
        "grpc": GatewayClient(f"grpc://{gateway.grpc_target}"),
    }
    yield both
    for c in both.values():
        c.close()


def test_path_bytes_and_array_inputs(clients: dict[str, GatewayClient]) -> None:
    array = np.zeros((30, 40, 3), np.uint8)
    for client in clients.values():
        assert client.infer(JPEG_PATH) == ImageResult(
            "", ImageInfo(640, 427, 3, "jpeg"), [427, 640, 3]
        )
        assert client.infer(str(JPEG_PATH)).output == [427, 640, 3]
        assert client.infer(JPEG_PATH.read_bytes()).output == [427, 640, 3]
        assert client.infer(array).output == [30, 40, 3]
        gray = client.infer(array[:, :, 0], color_mode="unchanged")
        assert gray.output == [30, 40]
        assert gray.info == ImageInfo(40, 30, 1, "png")


def test_same_results_over_both_protocols(clients: dict[str, GatewayClient]) -> None:
    results = {
        name: client.infer_batch([*IMAGES, b"junk"], model="spy")
        for name, client in clients.items()
    }
    assert results["http"] == results["grpc"]
    assert results["http"][-1].error is not None
    assert results["http"][-1].error.code == "undecodable_image"
    assert all(r.ok for r in results["http"][:-1])


@pytest.mark.parametrize("mode", ["color", "grayscale", "unchanged"])
def test_color_modes(clients: dict[str, GatewayClient], mode: str) -> None:
    rgba = DATA / "images" / "horse_rgba.png"
    expected = {"color": [328, 400, 3], "grayscale": [328, 400], "unchanged": [328, 400, 4]}
    for client in clients.values():
        assert client.infer(rgba, color_mode=mode).output == expected[mode]


def test_errors_raise_with_the_stable_code(clients: dict[str, GatewayClient]) -> None:
    statuses = {}
    for name, client in clients.items():
        with pytest.raises(GatewayClientError) as info:
            client.infer(b"junk")
        assert info.value.code == "undecodable_image"
        assert info.value.request_id
        statuses[name] = info.value.status
        with pytest.raises(GatewayClientError) as info:
            client.infer(JPEG_PATH, model="nope")
        assert info.value.code == "model_not_found"
    assert statuses == {"http": "422", "grpc": "INVALID_ARGUMENT"}


def test_a_20_mb_photo_over_both_protocols(clients: dict[str, GatewayClient]) -> None:
    # Noise does not compress: this PNG is about 20 MB, five times gRPC's default 4 MB limit.
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(2600, 2600, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", noise, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok and png.nbytes > 20_000_000
    for client in clients.values():
        assert client.infer(png.tobytes()).output == [2600, 2600, 3]


def test_models_listed_alike(clients: dict[str, GatewayClient]) -> None:
    http, grpc_ = (c.list_models() for c in clients.values())
    assert http == grpc_
    assert http[0].name == "shape" and http[0].is_default
    sizes = {m.name: m.min_input_size for m in http}
    assert sizes["small-input"] == (50, 40) and sizes["shape"] is None


def test_request_id_round_trip(gateway: Gateway) -> None:
    resp = requests.post(
        f"{gateway.http_url}/v1/infer",
        data=JPEG_PATH.read_bytes(),
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "abc-1"},
        timeout=10,
    )
    assert resp.headers["X-Request-ID"] == "abc-1"
    assert resp.json()["request_id"] == "abc-1"
    assert resp.json()["model"] == "shape"
    fresh = requests.post(
        f"{gateway.http_url}/v1/infer", data=JPEG_PATH.read_bytes(), timeout=10
    ).headers["X-Request-ID"]
    assert len(fresh) == 32


def test_bad_url_scheme() -> None:
    with pytest.raises(ValueError):
        GatewayClient("ftp://127.0.0.1:1")


def _client_ports(port: int) -> set[int]:
    """Local ports of the TCP connections on this machine, in any process, established to
    `port`."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("channels", [1, 4])
def test_grpc_calls_go_round_the_clients_own_connections(gateway: Gateway, channels: int) -> None:
    # Each channel its own connection, so that a multi-worker gateway can give them to different
    # workers; grpc would otherwise share one connection between channels to the same target.
    port = int(gateway.grpc_target.rsplit(":", 1)[1])
    before = _client_ports(port)
    client = GatewayClient(f"grpc://{gateway.grpc_target}", channels=channels)
    try:
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda _: client.infer(JPEG_PATH).output, range(4 * channels)))
        assert outputs == [[427, 640, 3]] * (4 * channels)
        assert len(_client_ports(port) - before) == channels
    finally:
        client.close()


def test_channels_must_be_at_least_one(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="channels"):
        GatewayClient(f"grpc://{gateway.grpc_target}", channels=0)


def test_http_calls_from_sixteen_threads_reuse_their_connections(gateway: Gateway) -> None:
    # Sixteen calls at once (the slow model keeps them overlapping), twice: the second round
    # finds all sixteen connections of the first still open, instead of opening some anew.
    port = int(gateway.http_url.rsplit(":", 1)[1])
    before = _client_ports(port)
    with GatewayClient(gateway.http_url) as client, ThreadPoolExecutor(16) as pool:
        rounds = []
        for _ in range(2):
            outputs = list(
                pool.map(
                    lambda _: client.infer(JPEG_PATH, model="slow", params={"seconds": "0.2"}),
                    range(16),
                )
            )
            assert [o.output for o in outputs] == [[427, 640, 3]] * 16
            rounds.append(_client_ports(port) - before)
    assert len(rounds[0]) == 16
    assert rounds[1] == rounds[0]


def test_no_images_no_results(clients: dict[str, GatewayClient]) -> None:
    for client in clients.values():
        assert client.infer_batch([]) == []


@pytest.mark.parametrize(
    "array",
    [
        np.full((8, 8), 0.7, np.float32),  # would have been sent as 1
        np.full((8, 8, 3), 1000, np.int64),  # as 255
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
    ],
    ids=["float32", "int64", "two channels", "empty"],
)
def test_arrays_png_cannot_hold_as_they_are_are_refused(
    clients: dict[str, GatewayClient], array: np.ndarray
) -> None:
    for client in clients.values():
        with pytest.raises(ValueError):
            client.infer(array)


def test_a_dot_model_name_is_a_name_over_http(clients: dict[str, GatewayClient]) -> None:
    # "/v1/models/../infer" is "/v1/infer" once resolved: the default model answered.
    for client in clients.values():
        for name in ("..", "."):
            with pytest.raises(GatewayClientError) as caught:
                client.infer(JPEG_PATH, model=name)
            assert caught.value.code == "model_not_found"


def test_no_gateway_is_the_same_error_on_both_protocols() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with ends: nothing listens there
    for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with GatewayClient(url, timeout=5) as client, pytest.raises(GatewayClientError) as caught:
            client.limits()
        assert caught.value.code == "unreachable"

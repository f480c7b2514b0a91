"""GatewayClient gives the same result objects over grpc:// and http://."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from clients import cli
from clients.client import MAX_PARAMETER_BYTES, GatewayClient, parameter_bytes
from clients.results import GatewayClientError, ImageInfo, ImageResult, Limits
from gateway.config import Settings
from gateway.serve import Gateway, start
from tests.conftest import DATA, IMAGES, wait_for

JPEG_PATH = DATA / "images" / "rocket.jpg"
# The checkout's own code, run by this interpreter (as in test_tls).
ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("url", ["grpc://", "grpc://:50051", "http://", "http://:5000"])
def test_a_url_without_a_host_is_refused_at_once(url: str) -> None:
    # Over gRPC every call failed as if a gateway had answered UNKNOWN; over HTTP with requests'
    # own error at the first call.
    with pytest.raises(ValueError, match="no host"):
        GatewayClient(url)


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
        # No answer came: no status either (grpc's own UNAVAILABLE was given as one).
        assert (caught.value.code, caught.value.status) == ("unreachable", "")


def test_a_client_timeout_is_the_same_error_on_both_protocols(gateway: Gateway) -> None:
    for url in (f"http://127.0.0.1:{gateway.http_port}", f"grpc://127.0.0.1:{gateway.grpc_port}"):
        with GatewayClient(url, timeout=0.3) as client, pytest.raises(GatewayClientError) as caught:
            client.infer(JPEG_PATH, model="slow", params={"seconds": "2"})
        # The client gave up; no answer came, so no status (grpc's own DEADLINE_EXCEEDED was
        # given as one).
        assert (caught.value.code, caught.value.status) == ("deadline_exceeded", ""), url


def test_numbers_only_floats_carry_come_back_alike(clients: dict[str, GatewayClient]) -> None:
    # gRPC carries every number as a double; the client made 1e16 an int, where HTTP gives a
    # float, and -1e300 a 301-digit int. Up to 2**53 integral numbers are ints on both.
    outputs = [client.infer(JPEG_PATH, model="outputs").output for client in clients.values()]
    expected = [1e16, -1e300, 2.0**53 + 2, 2**53, 2**53, 2**53 - 1, 3, 2.5]
    assert outputs[0] == outputs[1] == expected
    for output in outputs:
        assert [type(v) for v in output] == [float, float, float, int, int, int, int, float]


def test_object_keys_that_are_not_text_are_written_as_json_writes_them(
    http_url: str, clients: dict[str, GatewayClient]
) -> None:
    # str() had made None "None" and True "True", where JSON has null and true.
    expected = {"null": 0, "true": 1, "3": 2, "2.5": 3, "7": 4}
    raw = requests.post(
        f"{http_url}/v1/models/outputs/infer",
        data=JPEG_PATH.read_bytes(),
        params={"give": "keys"},
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert raw.json()["result"]["output"] == expected
    for client in clients.values():
        assert client.infer(JPEG_PATH, model="outputs", params={"give": "keys"}).output == expected


@pytest.fixture(scope="module")
def small_gateway() -> Iterator[Gateway]:
    gw = start(
        Settings(
            http_port=0, grpc_port=0, model=("tests.models:outputs",), max_request_bytes=100_000
        )
    )
    yield gw
    gw.stop()


def test_answers_larger_than_a_request_may_be_come_back_on_both_protocols(
    small_gateway: Gateway,
) -> None:
    # A gRPC answer over --max-request-bytes was refused by the server's grpc after the model
    # had run, and the client, taking RESOURCE_EXHAUSTED for a request too large, sent a batch
    # again in halves: every image computed again.
    params = {"give": "text", "bytes": "300000"}
    small = DATA / "images" / "hopper.jpg"
    for url in (small_gateway.http_url, f"grpc://{small_gateway.grpc_target}"):
        with GatewayClient(url) as client:
            assert client.infer(small, params=params).output == "x" * 300_000
            results = client.infer_batch([small, small], params=params)
            assert [r.output for r in results] == ["x" * 300_000] * 2


def test_an_image_that_fits_its_request_is_sent(small_gateway: Gateway) -> None:
    # infer() held back the 4 KB a multipart batch reserves for its framing: a 97.6 KB PNG the
    # gateway takes under its 100 KB cap was refused by the client as payload_too_large.
    noise = np.random.default_rng(0).integers(0, 256, (180, 180, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    assert 100_000 - 4352 < len(png) < 100_000 - 256
    for url in (small_gateway.http_url, f"grpc://{small_gateway.grpc_target}"):
        with GatewayClient(url) as client:
            assert client.infer(png, model="outputs").output[-1] == 2.5


def test_an_image_over_the_caps_is_refused_without_being_sent(
    small_gateway: Gateway, tmp_path: Path
) -> None:
    # infer() read the whole file, then sent it (over gRPC holding it about four times over):
    # a 1 GB file took 4 GB and 12 s to be refused. It now fails as infer_batch fails it.
    big = tmp_path / "big.jpg"
    with big.open("wb") as f:
        f.truncate(1_000_000)
    for url in (small_gateway.http_url, f"grpc://{small_gateway.grpc_target}"):
        with GatewayClient(url) as client:
            with pytest.raises(GatewayClientError) as caught:
                client.infer(big)
            assert (caught.value.code, caught.value.status) == ("image_too_large", "")
            [result] = client.infer_batch([big])
            assert result.error is not None
            assert result.error.code == caught.value.code


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e10])
def test_a_timeout_neither_protocol_can_keep_is_refused(timeout: float) -> None:
    # HTTP raised ValueError or, for 1e10, OverflowError mid-call; gRPC used no deadline for 0
    # and failed every call at once for the rest.
    for url in ("http://127.0.0.1:1", "grpc://127.0.0.1:1"):
        with pytest.raises(ValueError, match="timeout"):
            GatewayClient(url, timeout=timeout)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("channels", 0), ("channels", -1), ("channels", "4"), ("channels", 2.5),
        ("channels", True), ("max_message_bytes", 0), ("max_message_bytes", -1),
        ("max_message_bytes", 2**40), ("max_message_bytes", 1.5e6),
    ],
)  # fmt: skip
def test_a_count_neither_protocol_can_use_is_refused(name: str, value: object) -> None:
    # gRPC raised a bare TypeError ("4", 2.5) or OverflowError (2**40), failed every image as
    # payload_too_large (0), or took -1 for no limit; HTTP took any of them.
    for url in ("http://127.0.0.1:1", "grpc://127.0.0.1:1"):
        with pytest.raises(ValueError, match=name):
            GatewayClient(url, **{name: value})  # type: ignore[arg-type]


def test_a_port_out_of_range_is_refused() -> None:
    # grpc took "127.0.0.1:71248" for port 5712 (71248 - 65536).
    for url in ("http://127.0.0.1:71248", "grpc://127.0.0.1:71248"):
        with pytest.raises(ValueError, match="out of range"):
            GatewayClient(url)


def test_a_closed_client_refuses_calls_alike(gateway: Gateway) -> None:
    # HTTP went on calling after close(); gRPC raised grpc's own ValueError from its channel.
    for url in (gateway.http_url, f"grpc://{gateway.grpc_target}"):
        client = GatewayClient(url)
        client.close()
        client.close()
        with pytest.raises(ValueError, match="closed"):
            client.infer(JPEG_PATH)
        with pytest.raises(ValueError, match="closed"):
            client.infer_batch([JPEG_PATH])
        with pytest.raises(ValueError, match="closed"):
            client.list_models()
        with pytest.raises(ValueError, match="closed"):
            client.limits()


def test_parameters_are_text_on_both_protocols(clients: dict[str, GatewayClient]) -> None:
    # {"a": 1} reached a model as "1" over HTTP (a query parameter) and 1 over gRPC; a
    # color_mode parameter was dropped over HTTP and given to the model over gRPC.
    for client in clients.values():
        with pytest.raises(TypeError, match="str -> str"):
            client.infer(JPEG_PATH, params={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="str -> str"):
            client.infer_batch([JPEG_PATH], params={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="color_mode"):
            client.infer(JPEG_PATH, params={"color_mode": "grayscale"})


def test_a_directory_in_a_batch_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    # Found only when its request was due: earlier requests of the batch had been sent and
    # their results thrown away. Here nothing listens, so only a check made before any call
    # can answer.
    with GatewayClient("http://127.0.0.1:1") as client, pytest.raises(IsADirectoryError):
        client.infer_batch([JPEG_PATH, tmp_path])


def test_fields_a_newer_gateway_adds_are_skipped() -> None:
    limits = dict.fromkeys(
        (
            "max_request_bytes",
            "max_image_bytes",
            "max_images",
            "max_parts",
            "max_image_pixels",
            "max_request_pixels",
        ),
        5,
    )
    assert Limits.from_dict({**limits, "request_timeout_seconds": 2.5, "max_streams": 8}) == Limits(
        **limits, request_timeout_seconds=2.5
    )
    result = ImageResult.from_dict(
        {"name": "0", "info": {"width": 1, "height": 2, "channels": 3, "format": "png", "dpi": 72}}
    )
    assert result.info == ImageInfo(1, 2, 3, "png")


def test_a_big_endian_array_is_sent_as_its_values(clients: dict[str, GatewayClient]) -> None:
    native = (np.arange(12 * 10, dtype=np.uint16) * 500).reshape(12, 10)
    swapped = native.astype(">u2")
    for client in clients.values():
        got = client.infer_batch([native, swapped], model="spy", color_mode="unchanged")
        assert [r.output for r in got] == [{"checksum": int(native.sum())}] * 2


@contextmanager
def _serving(answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """A loopback HTTP server whose every GET and POST, its body read, `answer` answers."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer(self)

        def do_POST(self) -> None:
            self.do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _http_server(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that answers every request 200 with this JSON body, and the paths it
    was asked for: another service on the port, or a proxy in front of a gateway."""
    paths: list[str] = []

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        paths.append(handler.path)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with _serving(answer) as url:
        yield url, paths


@contextmanager
def _redirecting_server(status: int, to: str) -> Iterator[str]:
    """An HTTP server that answers every request `status` with a Location of `to` and the path
    (and query) asked for: a proxy sending clients to https://, or a gateway moved."""

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", f"{to}{handler.path}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _serving(answer) as url:
        yield url


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_post_redirected_as_a_get_is_a_bad_response_naming_where_to(
    gateway: Gateway, status: int
) -> None:
    # requests follows a 301, 302 or 303 answer to a POST with a GET to the new location: the
    # gateway answered that method_not_allowed, which said nothing of the redirect. GETs still
    # follow it.
    with _redirecting_server(status, gateway.http_url) as url, GatewayClient(url) as client:
        assert client.list_models()[0].name == "shape"
        for call in (
            lambda: client.infer(JPEG_PATH),
            lambda: client.infer(JPEG_PATH, model="spy"),
            lambda: client.infer_batch([JPEG_PATH, JPEG_PATH]),
        ):
            with pytest.raises(GatewayClientError) as caught:
                call()
            assert (caught.value.code, caught.value.status) == ("bad_response", str(status))
            assert f"redirected to {gateway.http_url}/v1/" in caught.value.message
            assert caught.value.message.endswith(f"give the client the URL {gateway.http_url}")


@pytest.mark.parametrize("status", [307, 308])
def test_a_post_redirected_with_its_method_is_followed(gateway: Gateway, status: int) -> None:
    # 307 and 308 keep the method and body: requests sends the same bytes to the new location.
    with _redirecting_server(status, gateway.http_url) as url, GatewayClient(url) as client:
        assert client.infer(JPEG_PATH).output == [427, 640, 3]
        results = client.infer_batch([JPEG_PATH, b"junk"], model="spy")
        assert results[0].ok and results[1].error is not None
        assert results[1].error.code == "undecodable_image"


@pytest.mark.parametrize("body", [b'{"hello": 1}', b"[1, 2]", b"null", b'{"error": "nope"}'])
def test_json_that_is_not_the_gateways_is_a_bad_response(
    body: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another JSON service on the port gave KeyError, TypeError or AttributeError from the
    # client, and the CLI a traceback and exit 1 (which says an image failed).
    with _http_server(body) as (url, _), GatewayClient(url) as client:
        for call in (
            client.limits,
            client.list_models,
            lambda: client._transport.infer(b"x", "", "color", {}),
            lambda: client._transport.infer_batch([("0", b"x")], "", "color", {}),
        ):
            with pytest.raises(GatewayClientError) as caught:
                call()
            assert (caught.value.code, caught.value.status) == ("bad_response", "200")
        assert cli.main(["--url", url, "infer", str(JPEG_PATH)]) == 2
        assert json.loads(capsys.readouterr().err)["error"]["code"] == "bad_response"


def test_an_http_url_with_the_grpc_port_is_a_bad_response_that_says_so(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was `unreachable`, grpc's HTTP/2 SETTINGS frame quoted as bytes in the message.
    url = f"http://{gateway.grpc_target}"
    with GatewayClient(url) as client, pytest.raises(GatewayClientError) as caught:
        client.limits()
    assert caught.value.code == "bad_response"
    assert caught.value.message == f"{url} answered with HTTP/2 (a gRPC port? Its URL is " + (
        "grpc://, or grpcs:// with TLS)"
    )
    assert cli.main(["--url", url, "infer", str(JPEG_PATH)]) == 2
    assert json.loads(capsys.readouterr().err)["error"]["code"] == "bad_response"


def test_no_answer_is_worded_alike_on_both_protocols(gateway: Gateway) -> None:
    # The messages were requests' and grpc's own: "HTTPConnectionPool(host=...): Read timed
    # out. (read timeout=0.3)" against "Deadline Exceeded".
    messages = set()
    for url in (gateway.http_url, f"grpc://{gateway.grpc_target}"):
        with GatewayClient(url, timeout=0.3) as client, pytest.raises(GatewayClientError) as caught:
            client.infer(JPEG_PATH, model="slow", params={"seconds": "2"})
        messages.add(caught.value.message)
    assert messages == {"no answer from the gateway within the client's timeout of 0.3 s"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with GatewayClient(url, timeout=5) as client, pytest.raises(GatewayClientError) as caught:
            client.limits()
        assert caught.value.message.startswith("no answer from the gateway at "), url
        assert f"127.0.0.1:{port}: " in caught.value.message


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_close_lets_the_calls_of_other_threads_finish(gateway: Gateway, scheme: str) -> None:
    # Over gRPC close() cancelled the calls other threads had under way (code "unknown",
    # status CANCELLED), where over HTTP they finished; now they finish on both, and the
    # connections close after the last of them.
    port = gateway.http_port if scheme == "http" else gateway.grpc_port
    before = _client_ports(port)
    client = GatewayClient(f"{scheme}://127.0.0.1:{port}")
    with ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(client.infer, JPEG_PATH, model="slow", params={"seconds": "1"})
            for _ in range(3)
        ]
        wait_for(lambda: len(_client_ports(port) - before) >= 3, "the three calls connect")
        time.sleep(0.3)  # their requests sent; the model takes a second
        client.close()
        with pytest.raises(ValueError, match="closed"):
            client.infer(JPEG_PATH)
        assert [c.result(timeout=30).output for c in calls] == [[427, 640, 3]] * 3
    wait_for(lambda: not _client_ports(port) - before, "the connections close")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # Each was taken, then dropped or misread: a gRPC path or query was ignored, a
        # missing port was 443 (TLS's) in plaintext, user:pw@ went to the name resolver, and
        # over HTTP "?x=1" came before each path (the browser page answered).
        ("grpc://127.0.0.1:50051/prefix", "no path"),
        ("grpc://127.0.0.1:50051/v1/infer", "no path"),
        ("grpc://dns:///127.0.0.1:50051", "no path"),
        ("grpc://127.0.0.1:50051?x=1", "no query"),
        ("http://127.0.0.1:5000?x=1", "no query"),
        ("http://127.0.0.1:5000/#top", "no query or fragment"),
        ("grpc://127.0.0.1", "no port"),
        ("grpc://[::1]", "no port"),
        ("grpc://127.0.0.1:", "no port"),
        ("grpc://user:pw@127.0.0.1:50051", "no user"),
        # urllib's own words, now naming the URL.
        ("grpc://127.0.0.1:abc", "'grpc://127.0.0.1:abc': Port could not be cast"),
        ("http://[::1:5000", "'http://[::1:5000': Invalid IPv6 URL"),
    ],
)
def test_urls_a_transport_would_misread_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        GatewayClient(url)


def test_http_urls_keep_their_path_prefix(gateway: Gateway) -> None:
    with GatewayClient(gateway.http_url) as client:
        limits = json.dumps(dataclasses.asdict(client.limits())).encode()
    with _http_server(limits) as (url, paths):
        for base in (f"{url}/gateway", f"{url}/gateway//", f" {url.upper()}/gateway/ "):
            with GatewayClient(base) as client:
                client.limits()
        assert paths == ["/gateway/v1/limits"] * 3
    for url in ("http://[::1]:5000", "grpc://[::1]:50051", "grpc://127.0.0.1:50051/"):
        GatewayClient(url).close()


@pytest.mark.parametrize(
    "image",
    [str(JPEG_PATH), JPEG_PATH, JPEG_PATH.read_bytes(), np.zeros((4, 5, 3), np.uint8)],
    ids=["str", "path", "bytes", "array"],
)
def test_infer_batch_refuses_one_image_for_a_list(image: object) -> None:
    # A path was a batch of one file per character (FileNotFoundError: 't'), a 3-D array
    # one image per row, each sent as a 5x3 grayscale image.
    with GatewayClient("http://127.0.0.1:1") as client, pytest.raises(TypeError, match="list"):
        client.infer_batch(image)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_client_carries_on_after_its_gateway_restarts_on_the_same_port() -> None:
    # The old gateway closed the connections the clients kept: urllib3 finds its pooled one
    # closed before using it again, and grpc its channel's, and both connect anew.
    settings = Settings(
        http_port=_free_port(), grpc_port=_free_port(), model=("shape",), shutdown_grace=1.0
    )
    gw = start(settings)
    clients = [GatewayClient(gw.http_url), GatewayClient(f"grpc://{gw.grpc_target}", channels=1)]
    try:
        for client in clients:
            assert client.infer(JPEG_PATH).output == [427, 640, 3]
        gw.stop()
        gw = start(settings)
        for client in clients:
            assert client.infer(JPEG_PATH).output == [427, 640, 3]
    finally:
        for client in clients:
            client.close()
        gw.stop()


class _Relay:
    """A TCP relay on loopback in front of a port. After drop(), each connection open then is
    closed the moment its client sends on it again: what a client meets when the gateway
    closes an idle keep-alive connection (its 10 s idle timeout, a worker replaced) just as the
    client's next request goes out on it."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.accepted: list[socket.socket] = []
        self._doomed: set[socket.socket] = set()
        self._reset = False
        self._reset_next = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, reset: bool) -> None:
        """Close (FIN) or reset (RST) the connections open now when their client next sends."""
        with self._lock:
            self._doomed.update(self.accepted)
            self._reset = reset

    def reset_next(self) -> None:
        """Reset the next connection opened as soon as its client sends (its HTTP/2 preface,
        or TLS hello): what a worker retiring in a reload does to a connection it took just as
        its grpc stopped."""
        with self._lock:
            self._reset_next = True

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self.accepted.append(client)
                if self._reset_next:
                    self._reset_next = False
                    self._doomed.add(client)
                    self._reset = True
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    doomed, reset = src in self._doomed, self._reset
                if doomed:
                    if reset:
                        src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    src.close()
                    break
                dst.sendall(data)
        for sock in (dst, src):  # shut down first: that wakes the other direction's recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_http_sends_a_call_again_when_the_gateway_closed_its_pooled_connection(
    gateway: Gateway, reset: bool
) -> None:
    # The request went out on a kept connection the gateway was closing: requests raised
    # ConnectionError (RemoteDisconnected when closed, "Connection reset by peer" when reset),
    # given as unreachable, though a new connection was answered at once.
    relay = _Relay(gateway.http_port)
    try:
        with GatewayClient(relay.url) as client:
            assert client.infer(JPEG_PATH).output == [427, 640, 3]  # limits, then the image
            assert len(relay.accepted) == 1  # both over one kept connection
            relay.drop(reset)
            assert client.list_models()[0].name == "shape"
            relay.drop(reset)  # a POST with 112 KB of image
            assert client.infer(JPEG_PATH).output == [427, 640, 3]
            assert len(relay.accepted) == 3  # each sent again on a connection of its own
    finally:
        relay.close()


def test_grpc_sends_a_call_again_when_its_new_connection_is_reset(gateway: Gateway) -> None:
    # A worker retiring in a reload resets the connections it has just taken as its grpc stops
    # (those its clients opened again at another worker's GOAWAY, say): grpc failed the call,
    # which was never sent, as UNAVAILABLE without the gateway's error code, and every other
    # call on that channel at once until its reconnect backoff was over (about a second):
    # unreachable, though the gateway was there. Over TLS, 21 to 30 calls of three clients
    # failed so in one run of four reloads out of two.
    relay = _Relay(gateway.grpc_port)
    try:
        relay.reset_next()
        url = relay.url.replace("http://", "grpc://")
        with GatewayClient(url, channels=2) as client:
            for _ in range(4):  # the reset channel's calls among them
                assert client.infer(JPEG_PATH).output == [427, 640, 3]
    finally:
        relay.close()


def test_a_call_that_timed_out_is_not_sent_again(gateway: Gateway) -> None:
    # Sending it again would have doubled the caller's timeout.
    relay = _Relay(gateway.http_port)
    try:
        with GatewayClient(relay.url, timeout=0.3) as client:
            client.limits()
            with pytest.raises(GatewayClientError) as caught:
                client.infer(JPEG_PATH, model="slow", params={"seconds": "2"})
            assert caught.value.code == "deadline_exceeded"
        assert len(relay.accepted) == 1
    finally:
        relay.close()


LIMITS = {
    "max_request_bytes": 1 << 20,
    "max_image_bytes": 1 << 20,
    "max_images": 8,
    "max_parts": 8,
    "max_image_pixels": 1 << 20,
    "max_request_pixels": 1 << 20,
    "request_timeout_seconds": 30.0,
}


def _head(body: bytes) -> bytes:
    length = f"Content-Length: {len(body)}\r\n".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + length + b"\r\n"


# Given each request's connection number (0, 1, ...), its path and the socket, answers it (or
# not) and says whether the connection stays open for the next request.
_Answer = Callable[[int, str, socket.socket], bool]


@contextmanager
def _raw_http(answer: _Answer) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """An HTTP/1.1 server over plain sockets, for answers no real server gives: GET
    /v1/limits is answered LIMITS, other requests by `answer`. Yields its URL and the
    requests it read, as (connection number, path)."""
    requests_read: list[tuple[int, str]] = []
    listener = socket.create_server(("127.0.0.1", 0))
    limits = json.dumps(LIMITS).encode()

    def serve(number: int, sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as stream, contextlib.suppress(OSError):
            while line := stream.readline():
                length = 0
                while (header := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                stream.read(length)
                path = line.split()[1].decode().split("?")[0]
                requests_read.append((number, path))
                if path == "/v1/limits":
                    sock.sendall(_head(limits) + limits)
                elif not answer(number, path, sock):
                    return

    def accept() -> None:
        for number in itertools.count():
            try:
                sock, _ = listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=serve, args=(number, sock), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requests_read
    finally:
        listener.close()


RESULT = json.dumps({"result": {"name": "", "info": None, "output": [1, 1, 3]}}).encode()


def test_a_call_is_sent_again_only_once() -> None:
    def close_unanswered(number: int, path: str, sock: socket.socket) -> bool:
        return False

    with _raw_http(close_unanswered) as (url, seen), GatewayClient(url) as client:
        with pytest.raises(GatewayClientError) as caught:
            client.infer(b"x")
        assert (caught.value.code, caught.value.status) == ("unreachable", "")
        assert seen == [(0, "/v1/limits"), (0, "/v1/infer"), (1, "/v1/infer")]


def test_a_call_sent_again_has_what_is_left_of_the_timeout() -> None:
    # The first connection is closed unanswered 0.7 s into a 1 s timeout; the second would
    # answer 0.6 s later, past the caller's timeout: a second try with a timeout of its own
    # would have succeeded at 1.3 s.
    def slow(number: int, path: str, sock: socket.socket) -> bool:
        time.sleep(0.7 if number == 0 else 0.6)
        if number == 0:
            return False
        sock.sendall(_head(RESULT) + RESULT)
        return True

    with _raw_http(slow) as (url, seen), GatewayClient(url, timeout=1) as client:
        with pytest.raises(GatewayClientError) as caught:
            client.infer(b"x")
        assert caught.value.code == "deadline_exceeded"
        assert [number for number, _ in seen] == [0, 0, 1]


def test_an_answer_cut_short_is_unreachable_and_not_sent_again() -> None:
    # The connection was lost within the answer's body: requests' ChunkedEncodingError came
    # out of the client as it was, where any other lost connection is unreachable.
    def cut(number: int, path: str, sock: socket.socket) -> bool:
        sock.sendall(_head(RESULT) + RESULT[:10])
        return False

    with _raw_http(cut) as (url, seen), GatewayClient(url) as client:
        with pytest.raises(GatewayClientError) as caught:
            client.infer(b"x")
        assert (caught.value.code, caught.value.status) == ("unreachable", "")
        assert seen == [(0, "/v1/limits"), (0, "/v1/infer")]


def test_an_answer_stalled_past_the_timeout_is_deadline_exceeded() -> None:
    # requests gives a timeout within the answer's body as ConnectionError: the client said
    # unreachable, as if no gateway were there.
    def stall(number: int, path: str, sock: socket.socket) -> bool:
        sock.sendall(_head(RESULT) + RESULT[:10])
        time.sleep(1)
        return False

    with _raw_http(stall) as (url, seen), GatewayClient(url, timeout=0.3) as client:
        with pytest.raises(GatewayClientError) as caught:
            client.infer(b"x")
        assert (caught.value.code, caught.value.status) == ("deadline_exceeded", "")
        assert seen == [(0, "/v1/limits"), (0, "/v1/infer")]


def test_an_answer_trickling_past_the_timeout_is_deadline_exceeded() -> None:
    # requests applies its timeout to each socket read: an answer whose bytes came one every
    # 0.2 s never waited a second for one, and took as long as it took under timeout=1. The
    # connection is closed, not used again with the rest of that answer still to come.
    def trickle(number: int, path: str, sock: socket.socket) -> bool:
        if number > 0:
            sock.sendall(_head(RESULT) + RESULT)
            return True
        sock.sendall(_head(RESULT) + RESULT[:-20])
        for byte in RESULT[-20:]:
            time.sleep(0.2)
            sock.sendall(bytes([byte]))
        return True

    with _raw_http(trickle) as (url, seen), GatewayClient(url, timeout=1) as client:
        with pytest.raises(GatewayClientError) as caught:
            client.infer(b"x")
        assert (caught.value.code, caught.value.status) == ("deadline_exceeded", "")
        assert client.infer(b"x").output == [1, 1, 3]
        assert seen == [(0, "/v1/limits"), (0, "/v1/infer"), (1, "/v1/infer")]


def test_a_netrc_entry_does_not_replace_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests fills in Authorization from ~/.netrc (or $NETRC) for a call that has no auth of
    # its own, over the session's headers: with a netrc entry for the gateway's host, or a
    # default one, the client sent that login instead of its token, and every call was 401.
    token = "first-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("shape",),
            shutdown_grace=1.0,
            auth_token_file=str(tokens),
        )
    )
    try:
        with GatewayClient(gw.http_url, token=token) as client:
            assert client.infer(JPEG_PATH).output == [427, 640, 3]
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def capped_gateway() -> Iterator[Gateway]:
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("shape", "tests.models:echo_params"),
            shutdown_grace=1.0,
            max_image_bytes=200_000,
            max_request_bytes=1_000_000,
            max_parts=4,
        )
    )
    yield gw
    gw.stop()


def _both(gw: Gateway) -> list[str]:
    return [gw.http_url, f"grpc://{gw.grpc_target}"]


@contextmanager
def _fifo(tmp_path: Path, data: bytes) -> Iterator[tuple[Path, list[int]]]:
    """A named pipe that a thread fills with `data` once it is opened, and the bytes the
    thread got written, as a shell's `<(command)` is."""
    path = tmp_path / f"pipe-{len(list(tmp_path.iterdir()))}"
    os.mkfifo(path)
    written = [0]

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), path.open("wb", buffering=0) as pipe:
            view = memoryview(data)
            while written[0] < len(data):
                written[0] += pipe.write(view[written[0] : written[0] + 65536]) or 0

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield path, written
    finally:
        # A writer still waiting for its reader is let go: it writes into a closed pipe.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(timeout=30)


def test_a_pipe_over_max_image_bytes_is_refused_after_reading_just_past_it(
    capped_gateway: Gateway, tmp_path: Path
) -> None:
    # stat() gives a FIFO no size: the client read all of it and sent it, and the gateway's
    # grpc refused it without the gateway's code (payload_too_large), or over HTTP the
    # gateway's request cap did. /dev/zero, read the same way, grew until MemoryError.
    expected = (
        "image_too_large",
        "the image is more than 200000 bytes; this gateway takes at most 200000 bytes per image",
    )
    for url in _both(capped_gateway):
        with GatewayClient(url) as client:
            with _fifo(tmp_path, bytes(5_000_000)) as (pipe, written):
                with pytest.raises(GatewayClientError) as caught:
                    client.infer(pipe)
                assert (caught.value.code, caught.value.message) == expected
                assert caught.value.status == ""
            # Read no further than a byte past the cap (plus what the pipe itself held).
            assert written[0] < 1_000_000
            with _fifo(tmp_path, bytes(5_000_000)) as (pipe, _):
                [result] = client.infer_batch([pipe])
            assert result.error is not None
            assert (result.error.code, result.error.message) == expected
            with pytest.raises(GatewayClientError) as caught:
                client.infer("/dev/zero")
            assert (caught.value.code, caught.value.message) == expected


def test_a_pipe_or_a_file_object_within_the_caps_is_sent(
    capped_gateway: Gateway, tmp_path: Path
) -> None:
    jpeg = JPEG_PATH.read_bytes()
    for url in _both(capped_gateway):
        with GatewayClient(url) as client:
            with _fifo(tmp_path, jpeg) as (pipe, _):
                assert client.infer(pipe, model="shape").output == [427, 640, 3]
            with _fifo(tmp_path, jpeg) as (pipe, _), JPEG_PATH.open("rb") as file:
                results = client.infer_batch([pipe, file, JPEG_PATH], model="shape")
            assert [r.output for r in results] == [[427, 640, 3]] * 3
            with pytest.raises(TypeError, match="list of images"), JPEG_PATH.open("rb") as file:
                client.infer_batch(file)  # type: ignore[arg-type]


# The CLI in a process of its own, with at most 2 GiB of address space: reading a stream
# without a bound ends in MemoryError there, not in the whole machine's memory.
_BOUNDED_CLI = (
    "import resource, runpy, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    "runpy.run_module('clients', run_name='__main__')\n"
)


@pytest.mark.parametrize("how", ["path", "stdin"])
def test_the_cli_reads_no_further_than_the_gateways_cap(capped_gateway: Gateway, how: str) -> None:
    # `infer /dev/zero` and `... | infer -` read until MemoryError, and printed its traceback.
    for url in _both(capped_gateway):
        with open("/dev/zero", "rb") as zeros:
            done = subprocess.run(
                [sys.executable, "-c", _BOUNDED_CLI, "--url", url, "infer"]
                + (["/dev/zero"] if how == "path" else ["-"]),
                stdin=zeros,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
        assert (done.returncode, done.stderr) == (1, ""), url
        [row] = json.loads(done.stdout)
        assert row["file"] == ("/dev/zero" if how == "path" else "-")
        assert row["error"]["code"] == "image_too_large"


def test_the_cli_says_standard_input_is_closed() -> None:
    # It said "standard input, which is a terminal here".
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" <&-', sys.executable, "-m", "clients", "infer", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "image-gateway-client: - reads an image from standard input, which is closed here"
    )


def test_long_parameters_reach_the_model_alike_on_both_protocols(
    capped_gateway: Gateway,
) -> None:
    # All of them went in the URL's query: 40 KB of UTF-8, tripled by percent-encoding, was
    # headers_too_large (431) over HTTP and worked over gRPC.
    params = {
        "a": "é" * 20_000,
        "b": "ü" * 4_000,
        # Names a text field cannot carry as they are: a file part's, and a "%".
        "": "x" * 1500,
        "0": "y" * 1500,
        'q"%22': "z" * 1000,
        **{f"p{i}": str(i) for i in range(100)},
    }
    assert parameter_bytes(params) <= MAX_PARAMETER_BYTES
    answers = []
    for url in _both(capped_gateway):
        with GatewayClient(url, model="echo-params") as client:
            one = client.infer(JPEG_PATH, params=params)
            assert one.output == params
            # Two long ones are text fields, so with max_parts 4 a request takes two images.
            batch = client.infer_batch([JPEG_PATH] * 5, params=params)
            assert [r.output for r in batch] == [params] * 5
            answers.append((one, batch))
    assert answers[0] == answers[1]


def test_an_image_error_with_long_parameters_is_raised_as_without(
    capped_gateway: Gateway,
) -> None:
    long = {"a": "é" * 20_000}
    for url in _both(capped_gateway):
        with GatewayClient(url, model="echo-params") as client:
            errors = []
            for params in ({}, long):
                with pytest.raises(GatewayClientError) as caught:
                    client.infer(b"junk", params=params)
                assert caught.value.request_id
                errors.append((caught.value.code, caught.value.message, caught.value.status))
            assert errors[0] == errors[1]
            assert errors[0][0] == "undecodable_image"


def test_parameters_over_the_gateways_cap_are_refused_alike(capped_gateway: Gateway) -> None:
    # The cap is a gRPC request's Struct, serialized: one value of exactly that size is taken
    # by both fronts, one byte more by neither. Two values each within an HTTP text field's cap
    # but together over it had worked over HTTP alone.
    def sized(total: int) -> dict[str, str]:
        value = "v" * (total - parameter_bytes({"a": ""}))
        while parameter_bytes({"a": value}) > total:
            value = value[:-1]
        return {"a": value}

    fits = sized(MAX_PARAMETER_BYTES)
    over = {"a": fits["a"] + "v"}
    assert parameter_bytes(fits) == MAX_PARAMETER_BYTES
    assert parameter_bytes(over) == MAX_PARAMETER_BYTES + 1
    for url in _both(capped_gateway):
        with GatewayClient(url, model="echo-params") as client:
            assert client.infer(JPEG_PATH, params=fits).output == fits
            for params in (over, {"a": "x" * 40_000, "b": "y" * 40_000}):
                with pytest.raises(GatewayClientError) as caught:
                    client.infer(JPEG_PATH, params=params)
                assert (caught.value.code, caught.value.status) == ("payload_too_large", "")
                with pytest.raises(GatewayClientError) as caught:
                    client.infer_batch([JPEG_PATH], params=params)
                assert (caught.value.code, caught.value.status) == ("payload_too_large", "")


def test_the_cli_lists_models_as_the_http_api_does(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # min_input_size was a [width, height] list, where the API gives {"width", "height"}.
    listed = requests.get(f"{gateway.http_url}/v1/models", timeout=10).json()["models"]
    assert {"width": 50, "height": 40} in [m["min_input_size"] for m in listed]
    for url in (gateway.http_url, f"grpc://{gateway.grpc_target}"):
        assert cli.main(["--url", url, "models"]) == 0
        assert json.loads(capsys.readouterr().out) == listed

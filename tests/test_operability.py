"""Health (grpc.health.v1 and HTTP probes) and server reflection, as tools see them."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import requests
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.serve import Gateway, start
from tests.conftest import DATA, wait_for
from tests.models import GATE
from tests.test_framing import exchange
from tests.wire import grpc_code, http_host_port, post_octet

SERVICE = "imagegateway.v1.ImageGatewayService"
PNG = (DATA / "images" / "hopper.png").read_bytes()


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_health_serving(gateway: Gateway, channel: grpc.Channel) -> None:
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert requests.get(f"{gateway.http_url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{gateway.http_url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert "shape" in ready.json()["models"]


def test_reflection_lists_and_describes_the_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {
        "Infer",
        "InferBatch",
        "InferStream",
        "ListModels",
        "GetModel",
        "GetLimits",
    }
    assert service.methods_by_name["Infer"].input_type.full_name == "imagegateway.v1.InferRequest"


def test_drain_flips_health_before_in_flight_work_ends() -> None:
    # The gated model holds the busy request until the test opens the gate.
    gw = start(Settings(http_port=0, grpc_port=0, model=("tests.models:gated",), shutdown_grace=10))
    GATE.clear()
    with (
        grpc.insecure_channel(gw.grpc_target) as channel,
        ThreadPoolExecutor(2) as pool,
        contextlib.ExitStack() as opened,
    ):
        opened.callback(GATE.set)  # first thing on the way out: the stop must not wait 10 s
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        busy = pool.submit(post_octet, gw.http_url, "gated", PNG)
        wait_for(lambda: gw.dataplane.admission.active == 1, "the gated request runs")
        stopping = pool.submit(gw.stop)
        wait_for(lambda: gw.dataplane.admission.draining, "the gateway drains")
        # The busy request is still in the model; both protocols already say "not serving".
        assert not busy.done()
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert requests.get(f"{gw.http_url}/readyz", timeout=5).status_code == 503
        assert requests.get(f"{gw.http_url}/healthz", timeout=5).status_code == 200
        refused = pb.InferRequest(image=pb.Image(data=PNG))
        try:
            pb_grpc.ImageGatewayServiceStub(channel).Infer(refused, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("a request during the drain was served")
        assert not busy.done()
        GATE.set()
        assert busy.result().status_code == 200
        stopping.result()


def test_open_streams_do_not_hold_the_drain_for_its_whole_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A health Watch (what grpc's client-side health checking keeps open) and an InferStream
    # waiting for its client's next message: nothing at work, so the stop need not wait 120 s.
    # Both end shutting_down with their ids; the Watch had ended as grpc cancelled it, "Cancelling
    # all calls", with neither.
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = start(Settings(http_port=0, grpc_port=0, shutdown_grace=120))
    with grpc.insecure_channel(gw.grpc_target) as channel, ThreadPoolExecutor(1) as pool:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), metadata=[("x-request-id", "watching")]
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        idle: list[pb.InferStreamRequest] = [pb.InferStreamRequest(image=pb.Image(data=PNG))]
        gate = threading.Event()

        def messages() -> Iterator[pb.InferStreamRequest]:
            yield from idle
            gate.wait(60)  # the client sends nothing more

        stream = pb_grpc.ImageGatewayServiceStub(channel).InferStream(messages())
        assert list(next(stream).result.output.list_value.values)
        stopping = pool.submit(gw.stop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.result(timeout=60)
        gate.set()
        for call in (watch, stream):
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            assert grpc_code(ended.value) == (grpc.StatusCode.UNAVAILABLE, "shutting_down")
        assert dict(watch.trailing_metadata() or ())["x-request-id"] == "watching"
    (record,) = [r for r in access_records(caplog) if r["method"] == "Watch"]
    assert (record["request_id"], record["status"], record["error"]) == (
        "watching",
        "UNAVAILABLE",
        "shutting_down",
    )


def test_a_watch_opened_as_the_server_closes_is_refused_shutting_down() -> None:
    # Between the Watch calls' end and grpc's stop, a new one would have been left for grpc to
    # cancel.
    gw = start(Settings(http_port=0, grpc_port=0))
    try:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            gw.health.end_watches()
            watch = health.Watch(
                health_pb2.HealthCheckRequest(), timeout=10, metadata=[("x-request-id", "late")]
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(watch)
            assert grpc_code(refused.value) == (grpc.StatusCode.UNAVAILABLE, "shutting_down")
            assert dict(refused.value.trailing_metadata() or ())["x-request-id"] == "late"
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        gw.stop()


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


def test_access_records_count_the_body_bytes_sent(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # The page and its script were logged as 0 bytes out, and a HEAD as the body it did not send.
    caplog.set_level(logging.INFO, logger="gateway.access")
    sent = {}
    for method, path in (("GET", "/"), ("GET", "/static/app.js"), ("HEAD", "/v1/models")):
        resp = requests.request(
            method, gateway.http_url + path, headers={"X-Request-ID": f"out-{path}"}, timeout=10
        )
        assert resp.status_code == 200
        sent[f"out-{path}"] = len(resp.content)
    records = {r["request_id"]: r["bytes_out"] for r in access_records(caplog)}
    assert {k: records[k] for k in sent} == sent
    assert sent["out-/"] > 0 and sent["out-/v1/models"] == 0


@pytest.mark.parametrize("path", ["/", "/static/app.js"])
def test_the_page_and_its_script_come_whole_whatever_range_is_asked(
    gateway: Gateway, path: str
) -> None:
    # Werkzeug answered 206 to a Range and 416, with the error code of a 400, to one past the
    # end: statuses the API document does not list for them.
    whole = requests.get(gateway.http_url + path, timeout=10)
    assert whole.status_code == 200 and whole.content
    for asked in ("bytes=0-9", "bytes=99999999-"):
        resp = requests.get(gateway.http_url + path, headers={"Range": asked}, timeout=10)
        assert (resp.status_code, resp.content) == (200, whole.content)


def test_an_infer_without_its_image_is_logged_with_no_image(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    with pytest.raises(grpc.RpcError):
        pb_grpc.ImageGatewayServiceStub(channel).Infer(
            pb.InferRequest(), metadata=[("x-request-id", "no-image-1")], timeout=10
        )
    records = {r["request_id"]: r for r in access_records(caplog)}
    assert (records["no-image-1"]["error"], records["no-image-1"]["images"]) == ("no_images", 0)


def test_a_stream_message_without_its_image_is_logged_with_no_image(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    # It was logged with one image, as if its absent image field had been an empty image.
    caplog.set_level(logging.INFO, logger="gateway.access")
    messages = [
        pb.InferStreamRequest(request_id="no-image-stream"),
        pb.InferStreamRequest(request_id="empty-image-stream", image=pb.Image()),
    ]
    stub = pb_grpc.ImageGatewayServiceStub(channel)
    answers = list(stub.InferStream(iter(messages), timeout=10))
    assert [a.result.error.code for a in answers] == ["no_images", "empty_image"]
    records = {r["request_id"]: r for r in access_records(caplog)}
    assert (records["no-image-stream"]["error"], records["no-image-stream"]["images"]) == (
        "no_images",
        0,
    )
    assert records["empty-image-stream"]["images"] == 1


def test_one_access_record_per_request_on_both_protocols(
    gateway: Gateway, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    post_octet(gateway.http_url, "shape", PNG, headers={"X-Request-ID": "log-http-1"})
    post_octet(gateway.http_url, "shape", b"junk", headers={"X-Request-ID": "log-http-2"})
    stub = pb_grpc.ImageGatewayServiceStub(channel)
    stub.InferBatch(
        pb.InferBatchRequest(model="shape", images=[pb.Image(data=PNG)] * 2),
        metadata=[("x-request-id", "log-grpc-1")],
        timeout=10,
    )
    with contextlib.suppress(grpc.RpcError):  # its access record is what is checked
        stub.Infer(
            pb.InferRequest(image=pb.Image(data=b"junk")),
            metadata=[("x-request-id", "log-grpc-2")],
            timeout=10,
        )
    records = {r["request_id"]: r for r in access_records(caplog)}
    http_ok, http_bad = records["log-http-1"], records["log-http-2"]
    assert (http_ok["protocol"], http_ok["status"], http_ok["model"], http_ok["images"]) == (
        "http",
        "200",
        "shape",
        1,
    )
    assert http_ok["method"] == "POST /v1/models/<model>/infer"
    assert http_ok["bytes_in"] == len(PNG) and http_ok["bytes_out"] > 0
    assert (http_bad["status"], http_bad["error"]) == ("422", "undecodable_image")
    grpc_ok, grpc_bad = records["log-grpc-1"], records["log-grpc-2"]
    assert (grpc_ok["protocol"], grpc_ok["method"], grpc_ok["status"], grpc_ok["images"]) == (
        "grpc",
        "InferBatch",
        "OK",
        2,
    )
    # The table's code tells what the status alone does not.
    assert (grpc_bad["status"], grpc_bad["error"]) == ("INVALID_ARGUMENT", "undecodable_image")
    assert http_ok["error"] == grpc_ok["error"] == ""
    for record in (http_ok, grpc_ok):
        assert set(record) == {
            "error",
            "ts",
            "request_id",
            "protocol",
            "method",
            "model",
            "images",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
        }


def test_cors_allows_only_configured_origins() -> None:
    gw = start(
        Settings(http_port=0, grpc_port=0, cors_origin=("http://app.example:8080",), workers=1)
    )
    try:
        url = f"{gw.http_url}/v1/infer"
        allowed = {"Origin": "http://app.example:8080"}
        preflight = requests.options(
            url,
            headers={
                **allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=5,
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example:8080"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        posted = requests.post(
            url,
            data=PNG,
            headers={**allowed, "Content-Type": "application/octet-stream"},
            timeout=5,
        )
        assert posted.headers["Access-Control-Allow-Origin"] == "http://app.example:8080"
        assert "X-Request-ID" in posted.headers["Access-Control-Expose-Headers"]
        assert "Retry-After" in posted.headers["Access-Control-Expose-Headers"]
        other = requests.post(
            url,
            data=PNG,
            headers={"Origin": "http://evil.example", "Content-Type": "application/octet-stream"},
            timeout=5,
        )
        assert "Access-Control-Allow-Origin" not in other.headers
        # The answers differ by Origin, so shared caches must keep them apart: flask-cors said
        # so only when several origins were allowed.
        for answer in (preflight, posted, other):
            assert "Origin" in answer.headers["Vary"]
    finally:
        gw.stop()


def test_cors_origins_are_compared_as_written() -> None:
    # flask-cors took an origin holding "[" or "*" for a regular expression matched at the
    # start of the Origin: an IPv6 origin allowed http://1:8080 and not itself, and a
    # wildcard-looking one allowed an attacker's host.
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            cors_origin=("http://[::1]:8080", "https://app.example.com"),
            workers=1,
        )
    )
    try:

        def allowed(origin: str) -> str | None:
            answer = requests.get(f"{gw.http_url}/v1/models", headers={"Origin": origin}, timeout=5)
            return answer.headers.get("Access-Control-Allow-Origin")

        assert allowed("http://[::1]:8080") == "http://[::1]:8080"
        assert allowed("HTTPS://APP.example.com") == "HTTPS://APP.example.com"
        for other in ("http://1:8080", "http://:8080", "https://app.example.com.attacker.net"):
            assert allowed(other) is None, other
    finally:
        gw.stop()


def test_answers_say_vary_origin_once() -> None:
    # With several origins allowed, flask-cors adds a Vary header of its own beside the app's:
    # a preflight's answer had two.
    gw = start(
        Settings(http_port=0, grpc_port=0, cors_origin=("http://a.example", "http://b.example"))
    )
    try:
        origin = {"Origin": "http://a.example"}
        url = f"{gw.http_url}/v1/infer"
        answers = [
            requests.options(
                url, headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=5
            ),
            requests.get(f"{gw.http_url}/v1/models", headers=origin, timeout=5),
            requests.post(
                url,
                data=PNG,
                headers={**origin, "Content-Type": "application/octet-stream"},
                timeout=5,
            ),
        ]
        for answer in answers:
            assert answer.ok, answer.text
            assert answer.raw.headers.getlist("Vary") == ["Origin"], answer.request.method
    finally:
        gw.stop()


def test_answers_the_http_server_makes_itself_carry_cors_headers() -> None:
    # 431, 501, 505, 503 overloaded, 408: made by the server, not the app, they had no CORS
    # headers, so a page on an allowed origin got a network error instead of the JSON error.
    gw = start(Settings(http_port=0, grpc_port=0, cors_origin=("http://app.example:8080",)))
    try:
        allowed, other = b"Origin: http://app.example:8080\r\n", b"Origin: http://evil.example\r\n"
        for origin, expected in ((allowed, "http://app.example:8080"), (other, None)):
            gzip = (
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
                b"\r\nTransfer-Encoding: gzip\r\n" + origin + b"\r\n12345"
            )
            version = b"GET /healthz HTTP/1.2\r\nHost: x\r\n" + origin + b"\r\n"
            for request, status in ((gzip, 501), (version, 505)):
                ((code, headers, _),) = exchange(gw, request)
                assert code == status
                assert headers.get("Access-Control-Allow-Origin") == expected, headers
                assert "Origin" in headers["Vary"]
                if expected:
                    exposed = headers["Access-Control-Expose-Headers"]
                    assert "X-Request-ID" in exposed and "Retry-After" in exposed
    finally:
        gw.stop()


def test_no_cors_by_default(gateway: Gateway) -> None:
    resp = requests.post(
        f"{gateway.http_url}/v1/infer",
        data=PNG,
        headers={"Origin": "http://app.example", "Content-Type": "application/octet-stream"},
        timeout=5,
    )
    assert resp.status_code == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_http_answer_goes_out_in_one_send(gateway: Gateway) -> None:
    # Status line, headers and body leave in one send (one packet on loopback), so a client
    # woken by the first byte can read the whole answer at once.
    host, port = gateway.http_url.removeprefix("http://").split(":")
    body = (DATA / "images" / "hopper.png").read_bytes()
    head = (
        f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    whole = 0
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            select.select([sock], [], [], 10)
            first = sock.recv(1 << 20)
        headers, _, payload = first.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", headers).group(1))  # type: ignore[union-attr]
        whole += len(payload) == length
    assert whole == 20


def test_pipelined_requests_are_each_answered_in_order(gateway: Gateway) -> None:
    # Three requests in one send: the second and third wait in the connection's read buffer,
    # not in the socket, while the first is answered; the server must look there before it
    # waits on the socket, or they sit until the keep-alive timeout.
    host, port = gateway.http_url.removeprefix("http://").split(":")
    images = [(DATA / "images" / n).read_bytes() for n in ("hopper.png", "rocket.jpg")]

    def post(rid: str, body: bytes) -> bytes:
        return (
            f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: {rid}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    wire = post("pipe-1", images[0]) + post("pipe-2", images[1])
    wire += f"GET /readyz HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: pipe-3\r\n\r\n".encode()
    answers: list[tuple[bytes, bytes]] = []
    buffer = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(wire)
        while len(answers) < 3:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and match and len(rest) >= int(match.group(1)):
                length = int(match.group(1))
                answers.append((head, rest[:length]))
                buffer = rest[length:]
                continue
            data = sock.recv(1 << 16)  # socket.timeout here: a request was left waiting
            assert data, f"connection closed after {len(answers)} answers"
            buffer += data
    ids = [re.search(rb"(?i)x-request-id: *(\S+)", h).group(1) for h, _ in answers]  # type: ignore[union-attr]
    assert ids == [b"pipe-1", b"pipe-2", b"pipe-3"]
    assert all(h.startswith(b"HTTP/1.1 200") for h, _ in answers)
    shapes = [json.loads(body)["result"]["output"] for _, body in answers[:2]]
    assert shapes == [[128, 128, 3], [427, 640, 3]]


@pytest.fixture(scope="module")
def two_http_threads() -> Iterator[Gateway]:
    gw = start(Settings(http_port=0, grpc_port=0, http_threads=2, shutdown_grace=1.0))
    yield gw
    gw.stop()


def _keep_alive(gateway: Gateway) -> http.client.HTTPConnection:
    host, port = gateway.http_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _shape(conn: http.client.HTTPConnection, body: bytes) -> list[int]:
    conn.request(
        "POST", "/v1/infer", body=body, headers={"Content-Type": "application/octet-stream"}
    )
    response = conn.getresponse()
    payload = json.loads(response.read())
    assert response.status == 200, payload
    assert response.getheader("Connection", "").lower() != "close"
    return list(payload["result"]["output"])


def test_a_keep_alive_connection_answers_requests_back_to_back_and_after_pauses(
    two_http_threads: Gateway,
) -> None:
    # Back to back, the thread that answered takes the next request itself; after a pause
    # longer than it waits, the connection is back with the selector and comes from there.
    conn = _keep_alive(two_http_threads)
    try:
        shapes = []
        for pause in (0, 0, 0.05, 0, 0.05, 0.05, 0, 0):
            time.sleep(pause)
            shapes.append(_shape(conn, PNG))
    finally:
        conn.close()
    assert shapes == [[128, 128, 3]] * 8


def test_quiet_keep_alive_connections_never_keep_a_new_client_waiting(
    two_http_threads: Gateway,
) -> None:
    # Four connections answered once and then quiet, on a worker with two HTTP threads: a
    # thread waits for its connection's next request only while the other is free, and never
    # for long, so a fifth client is served as usual.
    quiet = [_keep_alive(two_http_threads) for _ in range(4)]
    busy = _keep_alive(two_http_threads)
    try:
        for conn in quiet:
            assert _shape(conn, PNG) == [128, 128, 3]
        assert [_shape(busy, PNG) for _ in range(10)] == [[128, 128, 3]] * 10
        # And the quiet ones still work when they speak again.
        assert [_shape(conn, PNG) for conn in quiet] == [[128, 128, 3]] * 4
    finally:
        for conn in (*quiet, busy):
            conn.close()


@pytest.fixture(scope="module")
def one_http_thread() -> Iterator[Gateway]:
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            http_threads=1,
            model=("shape", "tests.models:slow"),
            shutdown_grace=1.0,
        )
    )
    yield gw
    gw.stop()


def test_a_client_pipelining_many_requests_takes_turns_with_other_clients(
    one_http_thread: Gateway,
) -> None:
    # Twenty slow requests (0.1 s each) in one send, on a worker with one HTTP thread. The
    # thread answers them one at a time while nobody else waits; once another client's request
    # waits, the pipelining connection goes back in line after each answer.
    host, port = one_http_thread.http_url.removeprefix("http://").split(":")
    slow = (
        f"POST /v1/models/slow/infer?seconds=0.1 HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(PNG)}\r\n\r\n"
    ).encode() + PNG
    quick = (
        f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(PNG)}\r\n\r\n"
    ).encode() + PNG
    with (
        socket.create_connection((host, int(port)), timeout=10) as piped,
        socket.create_connection((host, int(port)), timeout=10) as other,
    ):
        piped.sendall(slow * 20)
        received = piped.recv(1 << 16)  # the first answer: the thread is on this connection
        other.sendall(quick)
        answer = b""
        while chunk := other.recv(1 << 16):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        # How many of the twenty the pipelining client had by then.
        piped.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while chunk := piped.recv(1 << 20):
                received += chunk
        answered_before = received.count(b"HTTP/1.1 200")
        piped.settimeout(10)
        while received.count(b"HTTP/1.1 200") < 20:
            chunk = piped.recv(1 << 20)
            assert chunk, "the pipelining connection closed early"
            received += chunk
    assert answered_before < 20


def test_each_stream_message_has_its_own_access_record(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    stub = pb_grpc.ImageGatewayServiceStub(channel)
    messages = [
        pb.InferStreamRequest(request_id="log-stream-ok", image=pb.Image(data=PNG)),
        pb.InferStreamRequest(request_id="log-stream-bad", image=pb.Image(data=b"junk")),
    ]
    assert len(list(stub.InferStream(iter(messages), timeout=10))) == 2
    records = {r["request_id"]: r for r in access_records(caplog)}
    ok, bad = records["log-stream-ok"], records["log-stream-bad"]
    assert (ok["method"], ok["status"], ok["images"]) == ("InferStream", "OK", 1)
    assert (bad["method"], bad["status"], bad["images"]) == ("InferStream", "INVALID_ARGUMENT", 1)


def test_bytes_in_counts_what_was_read(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    chunked = requests.post(
        f"{gateway.http_url}/v1/infer",
        data=iter([PNG[:1000], PNG[1000:]]),  # a generator: requests sends it chunked
        headers={"Content-Type": "application/octet-stream", "X-Request-ID": "bytes-chunked"},
        timeout=10,
    )
    assert chunked.ok
    host, port = http_host_port(gateway.http_url)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: bytes-declared\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    records = {r["request_id"]: r for r in access_records(caplog)}
    assert records["bytes-chunked"]["bytes_in"] == len(PNG)  # was 0 for every chunked body
    assert records["bytes-declared"]["bytes_in"] == 0  # was the 10^12 declared


def test_bytes_in_counts_a_body_that_stopped_before_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The body was read a megabyte at a time, and a read that timed out lost the count of the
    # bytes it had taken: 300,000 bytes read, logged as 0.
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = start(Settings(http_port=0, grpc_port=0, request_timeout=1.0, shutdown_grace=1.0))
    try:
        host, port = http_host_port(gw.http_url)
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: bytes-stopped\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
                + PNG[:8]
                + bytes(300_000 - 8)
            )
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
        wait_for(
            lambda: "bytes-stopped" in {r["request_id"] for r in access_records(caplog)},
            "the access record",
        )
        records = {r["request_id"]: r for r in access_records(caplog)}
        assert records["bytes-stopped"]["error"] == "request_timeout"
        assert records["bytes-stopped"]["bytes_in"] == 300_000
    finally:
        gw.stop()

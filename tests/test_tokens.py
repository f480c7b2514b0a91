"""Bearer tokens (--auth-token-file): API calls on both protocols need one, probes and metrics
do not, the file is read again when it changes, and a file that cannot work stops the start."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import cli
from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from clients.results import GatewayClientError
from gateway import config
from gateway.config import Settings
from gateway.serve import Gateway, start
from tests.conftest import IMAGES, wait_for
from tests.hostile import BOUNDARY, file_part, multipart
from tests.test_process import launch
from tests.wire import grpc_code, http_host_port

TOKEN = "first-token-0123456789abcdef"
OTHER = "second-token-0123456789abcdef"
IMAGE = next(p for p in IMAGES if p.name == "hopper.png")
PNG = IMAGE.read_bytes()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# the gateway's callers\n{TOKEN}\n\n{OTHER}\n")
    return path


@pytest.fixture(scope="module")
def guarded(token_file: Path) -> Iterator[Gateway]:
    gw = start(
        Settings(http_port=0, grpc_port=0, shutdown_grace=1.0, auth_token_file=str(token_file))
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def channel(guarded: Gateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(guarded.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


HTTP_CALLS = [
    ("POST", "/v1/infer", PNG),
    ("POST", "/v1/models/shape/infer", PNG),
    ("POST", "/", PNG),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/shape", None),
    ("GET", "/v1/limits", None),
    # An unknown model is not told apart from a known one without a token.
    ("POST", "/v1/models/nope/infer", PNG),
]


@pytest.mark.parametrize(("method", "path", "body"), HTTP_CALLS)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}", TOKEN]
)
def test_http_api_calls_without_a_token_in_force_are_401(
    guarded: Gateway, method: str, path: str, body: bytes | None, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = requests.request(
        method, guarded.http_url + path, headers=headers, data=body, timeout=10
    )
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="image-gateway"'
    error = answer.json()["error"]
    assert error["code"] == "unauthenticated"
    assert error["request_id"] == answer.headers["X-Request-ID"]
    assert TOKEN not in answer.text


@pytest.mark.parametrize(("method", "path", "body"), HTTP_CALLS[:-1])
@pytest.mark.parametrize("token", [TOKEN, OTHER])
def test_http_api_calls_with_a_token_in_force_are_answered(
    guarded: Gateway, method: str, path: str, body: bytes | None, token: str
) -> None:
    answer = requests.request(
        method, guarded.http_url + path, headers=bearer(token), data=body, timeout=10
    )
    assert answer.status_code == 200, answer.text


def test_the_scheme_name_is_any_case_and_the_multipart_route_takes_tokens(
    guarded: Gateway,
) -> None:
    answer = requests.post(
        guarded.http_url + "/multi",
        data=multipart([file_part("0", PNG, "a.png")]),
        headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Authorization": f"bearer {TOKEN}",
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/"])
def test_probes_metrics_and_the_page_need_no_token(guarded: Gateway, path: str) -> None:
    assert requests.get(guarded.http_url + path, timeout=10).status_code == 200


def test_an_unknown_route_is_still_404(guarded: Gateway) -> None:
    answer = requests.get(guarded.http_url + "/v2/nothing", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def grpc_calls(channel: grpc.Channel) -> dict[str, object]:
    stub = pb_grpc.ImageGatewayServiceStub(channel)
    image = pb.Image(data=PNG)
    return {
        "Infer": lambda **kw: stub.Infer(pb.InferRequest(image=image), **kw),
        "InferBatch": lambda **kw: stub.InferBatch(pb.InferBatchRequest(images=[image]), **kw),
        "ListModels": lambda **kw: stub.ListModels(pb.ListModelsRequest(), **kw),
        "GetModel": lambda **kw: stub.GetModel(pb.GetModelRequest(name="nope"), **kw),
        "GetLimits": lambda **kw: stub.GetLimits(pb.GetLimitsRequest(), **kw),
        "InferStream": lambda **kw: list(
            stub.InferStream(iter([pb.InferStreamRequest(image=image)]), **kw)
        ),
        "reflection": lambda **kw: list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), **kw
            )
        ),
    }


@pytest.mark.parametrize(
    "method",
    ["Infer", "InferBatch", "ListModels", "GetModel", "GetLimits", "InferStream", "reflection"],
)
def test_grpc_calls_need_a_token_in_force(channel: grpc.Channel, method: str) -> None:
    call = grpc_calls(channel)[method]
    for metadata in [(), (("authorization", "Bearer wrong-token-0123456789abcdef"),)]:
        with pytest.raises(grpc.RpcError) as info:
            call(timeout=10, metadata=metadata)  # type: ignore[operator]
        assert grpc_code(info.value) == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
    allowed = (("authorization", f"Bearer {OTHER}"),)
    if method == "GetModel":  # past the token, the unknown model is found out
        with pytest.raises(grpc.RpcError) as info:
            call(timeout=10, metadata=allowed)  # type: ignore[operator]
        assert grpc_code(info.value) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    else:
        call(timeout=10, metadata=allowed)  # type: ignore[operator]


def test_grpc_health_needs_no_token(channel: grpc.Channel) -> None:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_the_client_sends_its_token(guarded: Gateway, scheme: str) -> None:
    url = guarded.http_url if scheme == "http" else f"grpc://{guarded.grpc_target}"
    with GatewayClient(url, token=TOKEN, timeout=10) as client:
        decoded = cv2.imread(str(IMAGE))
        assert decoded is not None
        height, width = decoded.shape[:2]
        assert client.infer(IMAGE).output == [height, width, 3]
        assert client.list_models()[0].name == "shape"
    with GatewayClient(url, timeout=10) as client, pytest.raises(GatewayClientError) as info:
        client.infer(IMAGE)
    assert info.value.code == "unauthenticated"
    assert info.value.status == ("401" if scheme == "http" else "UNAUTHENTICATED")


@pytest.mark.parametrize(
    "token", ["", "two\nlines", "caf\u00e9", "with a space-0123456789", "short-token"]
)
def test_a_token_no_gateway_takes_is_refused_by_the_client(token: str) -> None:
    with pytest.raises(ValueError, match="A-Z a-z 0-9"):
        GatewayClient("http://127.0.0.1:5000", token=token)


def test_tokens_are_read_again_when_the_file_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    gw = start(Settings(http_port=0, grpc_port=0, shutdown_grace=1.0, auth_token_file=str(path)))

    def status(token: str) -> int:
        url = gw.http_url + "/v1/limits"
        return requests.get(url, headers=bearer(token), timeout=10).status_code

    try:
        assert (status(TOKEN), status(OTHER)) == (200, 401)
        # Added, then the old one taken out, as a rotation goes; each written whole, by rename.
        staged = tmp_path / "staged"
        staged.write_text(f"{TOKEN}\n{OTHER}\n")
        staged.replace(path)
        with caplog.at_level(logging.INFO, logger="gateway.core.tokens"):
            wait_for(lambda: status(OTHER) == 200, "the added token is taken", 10)
            assert status(TOKEN) == 200
            with GatewayClient(f"grpc://{gw.grpc_target}", token=OTHER, timeout=10) as client:
                client.limits()
        # Both fronts share the worker's tokens: the file is read, and logged, once.
        assert caplog.text.count("tokens read again") == 1
        staged.write_text(f"{OTHER}\n")
        staged.replace(path)
        wait_for(lambda: status(TOKEN) == 401, "the removed token is refused", 10)
        # A file that holds no token keeps the tokens in force.
        staged.write_text("# nothing yet\n")
        staged.replace(path)
        wait_for(lambda: path.read_text() == "# nothing yet\n", "the file is empty", 10)
        assert status(OTHER) == 200
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file"),
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("short\n", "line 1"),
        (f"# fine\n{TOKEN} {OTHER}\n", "line 2"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_token_file_that_cannot_work_stops_the_start(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes | None,
    expected: str,
) -> None:
    path = tmp_path / "tokens"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        config.parse(["--auth-token-file", str(path)], {})
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--auth-token-file" in error and expected in error
    assert TOKEN not in error


def test_the_cli_takes_a_token_file_or_the_environment(guarded: Gateway, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # A gateway's own file, comments and all, as it is while a token is rotated: the first.
    gateways_file = tmp_path / "gateways"
    gateways_file.write_text(f"# callers\n\n{OTHER}\n{TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if k != "IMAGE_GATEWAY_TOKEN"}
    argv = [sys.executable, "-m", "clients", "--url", guarded.http_url]

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *args, "limits"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
            cwd=Path(__file__).resolve().parent.parent,
        )

    refused = run()
    assert refused.returncode == 2
    assert json.loads(refused.stderr)["error"]["code"] == "unauthenticated"
    assert run("--token-file", str(token_file)).returncode == 0
    assert run("--token-file", str(gateways_file)).returncode == 0
    assert run(IMAGE_GATEWAY_TOKEN=OTHER).returncode == 0


def test_the_cli_names_a_token_file_that_is_not_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It printed "'utf-8' codec can't decode byte 0xff in position 0: ...", naming no file.
    binary = tmp_path / "token.bin"
    binary.write_bytes(b"\xff\xfe\x00token")
    assert cli.main(["--url", "http://127.0.0.1:1", "--token-file", str(binary), "limits"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("image-gateway-client: --token-file ")
    assert str(binary) in line and "not UTF-8" in line


def _answer_to_head(http_url: str, head: bytes) -> bytes:
    """All the server sends to a request of which only `head` (line and headers) is sent, up
    to the end of the connection."""
    with socket.create_connection(http_host_port(http_url), timeout=5) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("length", [1000, 50_000_000])
def test_a_401_comes_at_once_without_the_body_being_read(guarded: Gateway, length: int) -> None:
    # The body is never sent: the answer must not wait for it (it had waited for the server
    # to read it out, holding a thread, until the client's read timed out; and a body still
    # to come is awaited in the selector, all of it or its first 8 MiB, when it has a token).
    answer = _answer_to_head(
        guarded.http_url,
        b"POST /v1/infer HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % length,
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["error"]["code"] == "unauthenticated"


def test_grpc_unary_calls_without_a_token_are_refused_before_their_message(
    guarded: Gateway, channel: grpc.Channel
) -> None:
    # More calls than the worker takes at once (--grpc-calls), none of which ever sends its
    # message: each had held a place until --request-timeout, and the call with a token
    # waited behind them.
    never = threading.Event()

    def no_message() -> Iterator[bytes]:
        never.wait()
        yield b""

    get_limits = channel.stream_unary(
        "/imagegateway.v1.ImageGatewayService/GetLimits",
        request_serializer=None,
        response_deserializer=pb.GetLimitsResponse.FromString,
    )
    silent = [
        get_limits.future(no_message(), timeout=60) for _ in range(guarded.settings.grpc_calls + 1)
    ]
    try:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        limits = stub.GetLimits(
            pb.GetLimitsRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert limits.limits.max_images == guarded.settings.max_images
        for call in silent:
            error = call.exception(timeout=10)
            assert isinstance(error, grpc.RpcError)
            assert grpc_code(error) == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
    finally:
        never.set()
        for call in silent:
            call.cancel()


@pytest.fixture
def rotating(tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    """A gateway of its own, taking TOKEN and OTHER from a file the test may rewrite."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n{OTHER}\n")
    gw = start(Settings(http_port=0, grpc_port=0, shutdown_grace=1.0, auth_token_file=str(path)))
    yield gw, path
    gw.stop()


def _rewrite(path: Path, text: str) -> None:
    """Replace the token file whole, by rename, as a rotation should."""
    staged = path.with_name("staged")
    staged.write_text(text)
    staged.replace(path)


@pytest.mark.parametrize("method", ["InferStream", "reflection"])
def test_a_token_taken_out_ends_the_streams_opened_with_it(
    rotating: tuple[Gateway, Path], method: str
) -> None:
    gw, path = rotating
    metadata = (("authorization", f"Bearer {OTHER}"),)
    with grpc.insecure_channel(gw.grpc_target) as channel:
        outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        requests_ = iter(outbox.get, None)
        if method == "InferStream":
            message: object = pb.InferStreamRequest(image=pb.Image(data=PNG))
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            answers = stub.InferStream(requests_, timeout=30, metadata=metadata)
        else:
            message = reflection_pb2.ServerReflectionRequest(list_services="")
            reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection_stub.ServerReflectionInfo(requests_, timeout=30, metadata=metadata)
        try:
            outbox.put(message)
            next(answers)  # answered while the token is in force
            _rewrite(path, f"{TOKEN}\n")

            def refused() -> bool:
                try:
                    pb_grpc.ImageGatewayServiceStub(channel).GetLimits(
                        pb.GetLimitsRequest(), timeout=10, metadata=metadata
                    )
                except grpc.RpcError as exc:
                    return grpc_code(exc) == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
                return False

            wait_for(refused, "the token taken out is refused to new calls", 10)
            outbox.put(message)
            with pytest.raises(grpc.RpcError) as info:
                next(answers)
            assert grpc_code(info.value) == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
        finally:
            outbox.put(None)
            answers.cancel()


@pytest.mark.parametrize("first", ["Bearer wrong-token-0123456789abcdef", f"Bearer {TOKEN}"])
def test_two_authorizations_are_no_token(
    guarded: Gateway, channel: grpc.Channel, first: str
) -> None:
    # The last one had been taken, where something in front may have read the first.
    answer = _answer_to_head(
        guarded.http_url,
        b"GET /v1/limits HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        + f"Authorization: {first}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 401 ")
    metadata = (("authorization", first), ("authorization", f"Bearer {TOKEN}"))
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.ImageGatewayServiceStub(channel).GetLimits(
            pb.GetLimitsRequest(), timeout=10, metadata=metadata
        )
    assert grpc_code(info.value) == (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")


def test_a_token_file_taken_away_keeps_the_tokens_in_force_and_says_so(
    rotating: tuple[Gateway, Path], caplog: pytest.LogCaptureFixture
) -> None:
    gw, path = rotating

    def status(token: str) -> int:
        url = gw.http_url + "/v1/limits"
        return requests.get(url, headers=bearer(token), timeout=10).status_code

    def warned() -> bool:
        return any("cannot be looked at" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="gateway.core.tokens"):
        path.unlink()
        wait_for(lambda: status(TOKEN) == 200 and warned(), "a warning for the missing file", 10)
        assert status(OTHER) == 200
        # Back, it is read again.
        _rewrite(path, f"{OTHER}\n")
        wait_for(lambda: status(TOKEN) == 401, "the file back is read again", 10)
        assert status(OTHER) == 200


def test_the_ready_line_says_tokens_are_required(token_file: Path, tmp_path: Path) -> None:
    s = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "1",
        "--auth-token-file", str(token_file),
    )  # fmt: skip
    try:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.proc.kill()
        s.proc.wait()
    (ready,) = [line for line in s.log.read_text().splitlines() if "ready:" in line]
    assert ready.endswith(" auth=tokens")


def test_a_body_over_the_cap_without_a_token_is_401_not_413(guarded: Gateway) -> None:
    # The 413 came first, and told a caller without a token --max-request-bytes, which
    # GET /v1/limits keeps from it.
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        status_line = conn.recv(4096).split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.1 401 ")

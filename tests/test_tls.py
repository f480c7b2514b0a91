"""gRPC over TLS: server certificates, client certificates (mutual TLS), rotation, and what a
setting that cannot work gives at start-up."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import GatewayClient, ImageLike
from clients.results import GatewayClientError
from gateway import config
from gateway.config import Settings
from gateway.serve import Gateway, start
from tests.conftest import IMAGES
from tests.pki import Authority, Issued
from tests.test_process import launch

# The checkout's own code, run by this interpreter: a console script runs whichever copy
# of the package was installed.
ROOT = Path(__file__).resolve().parent.parent
IMAGE = IMAGES[0]


def serve_tls(server: Issued, client_ca: Path | None = None) -> Gateway:
    return start(
        Settings(
            http_port=0,
            grpc_port=0,
            shutdown_grace=1.0,
            grpc_tls_cert=str(server.cert),
            grpc_tls_key=str(server.key),
            grpc_tls_client_ca="" if client_ca is None else str(client_ca),
        )
    )


def grpcs(gateway: Gateway) -> str:
    return f"grpcs://{gateway.grpc_target}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"), "main")


@pytest.fixture(scope="module")
def tls_gateway(pki: Authority) -> Iterator[Gateway]:
    gw = serve_tls(pki.server())
    yield gw
    gw.stop()


def test_grpcs_answers_as_http_does(tls_gateway: Gateway, pki: Authority) -> None:
    with (
        GatewayClient(grpcs(tls_gateway), ca_cert=pki.ca_cert, timeout=10) as secure,
        GatewayClient(tls_gateway.http_url, timeout=10) as plain,
    ):
        assert secure.infer(IMAGE) == plain.infer(IMAGE)
        batch: list[ImageLike] = [IMAGE, b"not an image"]
        assert secure.infer_batch(batch) == plain.infer_batch(batch)
        assert secure.list_models() == plain.list_models()


def test_health_checks_go_over_tls_too(tls_gateway: Gateway, pki: Authority) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    with grpc.secure_channel(tls_gateway.grpc_target, credentials) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("how", ["plaintext", "untrusted"])
def test_a_client_without_the_servers_trust_gets_no_answer(
    tls_gateway: Gateway, tmp_path: Path, how: str
) -> None:
    if how == "plaintext":
        client = GatewayClient(f"grpc://{tls_gateway.grpc_target}", timeout=5)
    else:
        other = Authority(tmp_path, "other")
        client = GatewayClient(grpcs(tls_gateway), ca_cert=other.ca_cert, timeout=5)
    with client, pytest.raises(GatewayClientError) as info:
        client.infer(IMAGE)
    assert info.value.code == "unreachable"
    # Over TLS, a refused handshake reads as no answer: the message says TLS was in play.
    assert ("over TLS" in info.value.message) == (how == "untrusted")


def test_the_cli_over_grpcs_writes_only_its_error_to_stderr(tls_gateway: Gateway) -> None:
    # grpc wrote its own line for the failed handshake before the CLI's JSON error.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    argv = [sys.executable, "-m", "clients", "--url", grpcs(tls_gateway), "--timeout", "5"]
    done = subprocess.run(
        [*argv, "infer", str(IMAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert json.loads(line)["error"]["code"] == "unreachable"


def test_mutual_tls_takes_only_clients_the_ca_signed(pki: Authority, tmp_path: Path) -> None:
    signed = pki.issue("client", "client@example.com")
    stranger = Authority(tmp_path, "stranger").issue("client", "client@example.com")
    gw = serve_tls(pki.server("mutual"), client_ca=pki.ca_cert)
    try:
        with GatewayClient(
            grpcs(gw), ca_cert=pki.ca_cert, client_cert=signed.cert, client_key=signed.key
        ) as client:
            assert client.infer(IMAGE).ok
        for refused in (
            GatewayClient(grpcs(gw), ca_cert=pki.ca_cert, timeout=5),
            GatewayClient(
                grpcs(gw),
                ca_cert=pki.ca_cert,
                client_cert=stranger.cert,
                client_key=stranger.key,
                timeout=5,
            ),
        ):
            with refused, pytest.raises(GatewayClientError) as info:
                refused.infer(IMAGE)
            assert info.value.code == "unreachable"
    finally:
        gw.stop()


def test_rotated_files_are_served_to_new_connections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A certificate rotated in place (cert-manager, a Secret's volume) was read only at start:
    # the gateway served the old one until restarted.
    first, second = Authority(tmp_path, "first"), Authority(tmp_path, "second")
    live = Issued(tmp_path / "live.pem", tmp_path / "live-key.pem")

    def install(issued: Issued) -> None:
        shutil.copyfile(issued.cert, live.cert)
        shutil.copyfile(issued.key, live.key)

    def answers(ca: Authority) -> bool:
        with GatewayClient(grpcs(gw), ca_cert=ca.ca_cert, timeout=5) as client:
            try:
                return client.infer(IMAGE).ok
            except GatewayClientError as exc:
                assert exc.code == "unreachable"
                return False

    install(first.server())
    gw = serve_tls(live)
    try:
        assert answers(first) and not answers(second)
        install(second.server())
        assert answers(second) and not answers(first)
        # Half-way through a rotation: a key that is not the certificate's. The pair in use
        # stays, and the files are tried again once they change again.
        with caplog.at_level(logging.WARNING, logger="gateway.tls"):
            shutil.copyfile(first.server("next").cert, live.cert)
            assert answers(second)
        assert "cannot be used" in caplog.text
        install(first.server("last"))
        assert answers(first)
    finally:
        gw.stop()


PAIR = ["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "{key}"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--grpc-tls-cert", "{cert}"], "--grpc-tls-cert and --grpc-tls-key go together"),
        (["--grpc-tls-key", "{key}"], "--grpc-tls-cert and --grpc-tls-key go together"),
        (["--grpc-tls-client-ca", "{ca}"], "--grpc-tls-client-ca needs --grpc-tls-cert"),
        (["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "{ca}"], "--grpc-tls-cert / --grpc"),
        (["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "{other_key}"], "KEY_VALUES_MISMATCH"),
        (["--grpc-tls-cert", "{tmp}/none.pem", "--grpc-tls-key", "{key}"], "No such file"),
        # The ssl module's own error named neither the flag nor the file ("Is a directory: None").
        (["--grpc-tls-cert", "{tmp}", "--grpc-tls-key", "{key}"], "--grpc-tls-cert: Is a dir"),
        (["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "{tmp}"], "--grpc-tls-key: Is a dir"),
        ([*PAIR, "--grpc-tls-client-ca", "{tmp}"], "--grpc-tls-client-ca: Is a directory"),
        ([*PAIR, "--grpc-tls-client-ca", "{key}"], "--grpc-tls-client-ca"),
        (["--grpc-tls-cert", "{key}", "--grpc-tls-key", "{key}"], "not a PEM certificate chain"),
        # OpenSSL had asked for the passphrase on the terminal, and the start waited there.
        (["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "{encrypted}"], "is encrypted"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    pki = Authority(tmp_path, "flags")
    server, other = pki.server(), pki.server("other")
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    paths = {
        "cert": server.cert,
        "key": server.key,
        "encrypted": encrypted,
        "ca": pki.ca_cert,
        "other_key": other.key,
        "tmp": tmp_path,
    }
    with pytest.raises(SystemExit) as info:
        config.parse([flag.format(**paths) for flag in flags], {})
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error and "Traceback" not in error and "None" not in error


def test_client_certificate_files_need_a_tls_url(pki: Authority) -> None:
    with pytest.raises(ValueError, match="grpcs:// or https://"):
        GatewayClient("grpc://127.0.0.1:50051", ca_cert=pki.ca_cert)
    with pytest.raises(ValueError, match="go together"):
        GatewayClient("grpcs://127.0.0.1:50051", client_cert=pki.ca_cert)
    with pytest.raises(FileNotFoundError):
        GatewayClient("grpcs://127.0.0.1:50051", ca_cert="/nonexistent/ca.pem")
    with pytest.raises(FileNotFoundError):
        GatewayClient("https://127.0.0.1:5000", ca_cert="/nonexistent/ca.pem")


def _bad_tls_files(pki: Authority, tmp_path: Path, fault: str) -> tuple[dict[str, Path], Path]:
    """Certificate files with one fault, and the file to blame."""
    signed = pki.issue(f"client-{fault}", "client@example.com")
    files = {"ca_cert": pki.ca_cert, "client_cert": signed.cert, "client_key": signed.key}
    not_pem = tmp_path / "hostname"
    not_pem.write_text("builder\n")
    if fault == "ca not PEM":
        files["ca_cert"] = not_pem
    elif fault == "cert not PEM":
        files["client_cert"] = not_pem
    elif fault == "key not PEM":
        files["client_key"] = not_pem
    elif fault == "key of another cert":
        files["client_key"] = pki.issue(f"other-{fault}", "other@example.com").key
    else:
        key = serialization.load_pem_private_key(signed.key.read_bytes(), password=None)
        files["client_key"] = tmp_path / "encrypted-key.pem"
        files["client_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    blamed = "client_key" if "key" in fault else "ca_cert" if "ca" in fault else "client_cert"
    return files, files[blamed]


TLS_FAULTS = ["ca not PEM", "cert not PEM", "key not PEM", "key of another cert", "key encrypted"]


@pytest.mark.parametrize("fault", TLS_FAULTS)
def test_a_certificate_file_that_cannot_serve_is_named_when_the_client_is_made(
    pki: Authority, tmp_path: Path, fault: str
) -> None:
    # grpc found it out at the first call, as no answer (unreachable), with its own lines on
    # stderr ("Invalid private key."); requests as a connection error, also unreachable.
    files, blamed = _bad_tls_files(pki, tmp_path, fault)
    for url in ("grpcs://127.0.0.1:1", "https://127.0.0.1:1"):
        with pytest.raises(ValueError, match=re.escape(str(blamed))):
            GatewayClient(
                url,
                ca_cert=files["ca_cert"],
                client_cert=files["client_cert"],
                client_key=files["client_key"],
            )


@pytest.mark.parametrize("fault", ["ca not PEM", "key of another cert"])
def test_the_cli_names_a_certificate_file_that_cannot_serve(
    tls_gateway: Gateway, pki: Authority, tmp_path: Path, fault: str
) -> None:
    files, blamed = _bad_tls_files(pki, tmp_path, fault)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    flags = [f"--{name.replace('_', '-')}={path}" for name, path in files.items()]
    for url in (grpcs(tls_gateway), "https://127.0.0.1:1"):
        done = subprocess.run(
            [sys.executable, "-m", "clients", "--url", url, *flags, "infer", str(IMAGE)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
        assert done.returncode == 2
        (line,) = done.stderr.splitlines()
        assert line.startswith("image-gateway-client: ") and str(blamed) in line


def test_cli_over_grpcs_prints_what_it_prints_over_http(
    tls_gateway: Gateway, pki: Authority
) -> None:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "clients", *args, "infer", str(IMAGE)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    secure = cli("--url", grpcs(tls_gateway), "--ca-cert", str(pki.ca_cert))
    assert secure == cli("--url", tls_gateway.http_url)


@pytest.mark.parametrize("verbosity", [None, "INFO"])
def test_failed_handshakes_stay_out_of_the_log_unless_asked_for(
    pki: Authority, tmp_path: Path, verbosity: str | None
) -> None:
    # grpc wrote a line at INFO for each: a load balancer's TCP check every few seconds, or a
    # plaintext client, filled the log.
    server = pki.server("logged")
    s = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "1",
        "--grpc-tls-cert", str(server.cert), "--grpc-tls-key", str(server.key),
        env={"GRPC_VERBOSITY": verbosity} if verbosity else None, unset=["GRPC_VERBOSITY"],
    )  # fmt: skip
    try:
        plaintext = GatewayClient(f"grpc://{s.grpc_target}", timeout=5)
        with plaintext, pytest.raises(GatewayClientError):
            plaintext.infer(IMAGE)
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.proc.kill()
        s.proc.wait()
    assert ("Handshake failed" in s.log.read_text()) == (verbosity == "INFO")


def test_grpcs_without_certificate_files_still_speaks_tls(tls_gateway: Gateway) -> None:
    # Without ca_cert, grpcs:// went out in plaintext: a plaintext gateway answered it, and a
    # TLS one (signed by a CA the system does not trust, as here) seemed not to be there.
    plain = start(Settings(http_port=0, grpc_port=0, shutdown_grace=1.0))
    try:
        for gw in (plain, tls_gateway):
            with (
                GatewayClient(grpcs(gw), timeout=5) as client,
                pytest.raises(GatewayClientError) as info,
            ):
                client.limits()
            assert info.value.code == "unreachable"
            if gw is tls_gateway:
                assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    finally:
        plain.stop()


@pytest.fixture
def https_stand_in(tls_gateway: Gateway, pki: Authority) -> Iterator[str]:
    """An https:// server on loopback, asking for a client certificate the CA signed, that
    answers every GET with the gateway's own GET /v1/limits (the HTTP front is plaintext)."""
    with urllib.request.urlopen(f"{tls_gateway.http_url}/v1/limits", timeout=10) as answer:
        body = answer.read()

    class Limits(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    issued = pki.server("https")
    context.load_cert_chain(issued.cert, issued.key)
    context.load_verify_locations(pki.ca_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Limits)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_uses_the_given_ca_even_with_a_ca_bundle_in_the_environment(
    https_stand_in: str, pki: Authority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests let REQUESTS_CA_BUNDLE (set in many containers) override ca_cert, and the
    # gateway's certificate was checked against the environment's CAs and refused.
    other = Authority(tmp_path, "environment")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other.ca_cert))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(other.ca_cert))
    client = pki.issue("https-client", "client@example.com")
    with GatewayClient(
        https_stand_in, ca_cert=pki.ca_cert, client_cert=client.cert, client_key=client.key
    ) as gw:
        assert gw.limits().max_images > 0
    # Without a client certificate the stand-in refuses: the one above was sent.
    with GatewayClient(https_stand_in, ca_cert=pki.ca_cert, timeout=5) as gw:
        with pytest.raises(GatewayClientError) as info:
            gw.limits()
        assert info.value.code == "unreachable"


def test_an_expired_certificate_is_served_with_a_warning(
    pki: Authority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It started without a word, and every client refused the certificate.
    expired = pki.issue("expired", "127.0.0.1", not_after=datetime.now(timezone.utc) - timedelta(1))
    live = Issued(tmp_path / "live.pem", tmp_path / "live-key.pem")
    shutil.copyfile(expired.cert, live.cert)
    shutil.copyfile(expired.key, live.key)
    with caplog.at_level(logging.WARNING, logger="gateway.tls"):
        gw = serve_tls(live)
    try:
        assert f"{live.cert}: certificate has expired" in caplog.text
        caplog.clear()
        fresh = pki.server("fresh")
        shutil.copyfile(fresh.cert, live.cert)
        shutil.copyfile(fresh.key, live.key)
        with GatewayClient(grpcs(gw), ca_cert=pki.ca_cert, timeout=5) as client:
            assert client.infer(IMAGE).ok
        assert "expired" not in caplog.text
    finally:
        gw.stop()

"""Settings come from flags, then IMAGE_GATEWAY_* variables, then defaults."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from gateway import config, workers
from gateway.config import Settings
from tests.pki import Authority


def test_defaults_bind_loopback() -> None:
    s = config.parse([], {})
    assert s == Settings()
    assert (s.host, s.http_port, s.grpc_port, s.model) == ("127.0.0.1", 5000, 50051, ("shape",))
    assert s.max_request_bytes > 20 * 1024 * 1024


def test_every_flag_has_an_environment_variable(tmp_path: Path) -> None:
    pki = Authority(tmp_path, "env")
    server = pki.server()
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-enough-length\n")
    env = {
        "IMAGE_GATEWAY_HOST": "0.0.0.0",
        "IMAGE_GATEWAY_HTTP_PORT": "8080",
        "IMAGE_GATEWAY_GRPC_PORT": "9090",
        "IMAGE_GATEWAY_MODEL": "qrcode, shape",
        "IMAGE_GATEWAY_BATCHING": "qrcode=4:1.5",
        "IMAGE_GATEWAY_CORS_ORIGIN": "https://a.example, https://b.example",
        "IMAGE_GATEWAY_WORKERS": "3",
        "IMAGE_GATEWAY_START_TIMEOUT": "300",
        "IMAGE_GATEWAY_MAX_REQUEST_BYTES": "1000",
        "IMAGE_GATEWAY_MAX_IMAGE_BYTES": "800",
        "IMAGE_GATEWAY_MAX_IMAGES": "7",
        "IMAGE_GATEWAY_MAX_PARTS": "9",
        "IMAGE_GATEWAY_MAX_IMAGE_PIXELS": "1000000",
        "IMAGE_GATEWAY_MAX_REQUEST_PIXELS": "2000000",
        "IMAGE_GATEWAY_REQUEST_TIMEOUT": "2.5",
        "IMAGE_GATEWAY_MAX_CONCURRENCY": "2",
        "IMAGE_GATEWAY_MAX_QUEUE": "0",
        "IMAGE_GATEWAY_HTTP_THREADS": "3",
        "IMAGE_GATEWAY_GRPC_THREADS": "5",
        "IMAGE_GATEWAY_GRPC_CALLS": "7",
        "IMAGE_GATEWAY_MAX_STREAMS": "6",
        "IMAGE_GATEWAY_GRPC_KEEPALIVE": "30",
        "IMAGE_GATEWAY_MODEL_THREADS": "4",
        "IMAGE_GATEWAY_SHUTDOWN_GRACE": "1.5",
        "IMAGE_GATEWAY_LOG_LEVEL": "DEBUG",
        "IMAGE_GATEWAY_ACCESS_LOG": "off",
        "IMAGE_GATEWAY_GRPC_TLS_CERT": str(server.cert),
        "IMAGE_GATEWAY_GRPC_TLS_KEY": str(server.key),
        "IMAGE_GATEWAY_GRPC_TLS_CLIENT_CA": str(pki.ca_cert),
        "IMAGE_GATEWAY_AUTH_TOKEN_FILE": str(tokens),
    }
    assert config.parse([], env) == Settings(
        host="0.0.0.0",
        http_port=8080,
        grpc_port=9090,
        model=("qrcode", "shape"),
        batching=("qrcode=4:1.5",),
        cors_origin=("https://a.example", "https://b.example"),
        workers=3,
        start_timeout=300.0,
        max_request_bytes=1000,
        max_image_bytes=800,
        max_images=7,
        max_parts=9,
        max_image_pixels=1_000_000,
        max_request_pixels=2_000_000,
        request_timeout=2.5,
        max_concurrency=2,
        max_queue=0,
        http_threads=3,
        grpc_threads=5,
        grpc_calls=7,
        max_streams=6,
        grpc_keepalive=30.0,
        model_threads=4,
        shutdown_grace=1.5,
        log_level="DEBUG",
        access_log="off",
        grpc_tls_cert=str(server.cert),
        grpc_tls_key=str(server.key),
        grpc_tls_client_ca=str(pki.ca_cert),
        auth_token_file=str(tokens),
    )
    assert len(env) == len(fields(Settings))


def test_flags_win_and_model_repeats() -> None:
    s = config.parse(
        ["--http-port", "0", "--model", "shape", "--model", "qrcode"],
        {"IMAGE_GATEWAY_HTTP_PORT": "8080", "IMAGE_GATEWAY_MODEL": "x"},
    )
    assert s.http_port == 0
    assert s.model == ("shape", "qrcode")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMAGE_GATEWAY_HTTP_PORT", "70000"),
        ("IMAGE_GATEWAY_MAX_REQUEST_BYTES", "1e6"),
        ("IMAGE_GATEWAY_MAX_IMAGE_PIXELS", "1M"),
        ("IMAGE_GATEWAY_MAX_IMAGE_PIXELS", "-1"),
        ("IMAGE_GATEWAY_MAX_CONCURRENCY", "0"),
        ("IMAGE_GATEWAY_REQUEST_TIMEOUT", "nan"),
        ("IMAGE_GATEWAY_HTTP_PORT", "٣"),
        ("IMAGE_GATEWAY_LOG_LEVEL", "verbose"),
        ("IMAGE_GATEWAY_MAX_STREAMS", "0"),
        # Past what grpc and protobuf hold: tracebacks naming no setting, at start or at stop.
        ("IMAGE_GATEWAY_MAX_REQUEST_BYTES", "2147483648"),
        ("IMAGE_GATEWAY_MAX_IMAGES", "2147483648"),
        ("IMAGE_GATEWAY_WORKERS", "99999999999"),
        # Made one by one at start-up: minutes spent before failing.
        ("IMAGE_GATEWAY_WORKERS", "1025"),
        ("IMAGE_GATEWAY_HTTP_THREADS", "2147483647"),
        ("IMAGE_GATEWAY_GRPC_THREADS", "1025"),
        ("IMAGE_GATEWAY_GRPC_CALLS", "1025"),
        ("IMAGE_GATEWAY_MAX_STREAMS", "1025"),
        ("IMAGE_GATEWAY_MODEL_THREADS", "1025"),
        ("IMAGE_GATEWAY_SHUTDOWN_GRACE", "1e300"),
        ("IMAGE_GATEWAY_REQUEST_TIMEOUT", "٣"),
        ("IMAGE_GATEWAY_REQUEST_TIMEOUT", "inf"),
        ("IMAGE_GATEWAY_START_TIMEOUT", "0"),
        ("IMAGE_GATEWAY_START_TIMEOUT", "-5"),
        # Every address to Python's bind, an error to grpc's.
        ("IMAGE_GATEWAY_HOST", ""),
        ("IMAGE_GATEWAY_HOST", " "),
        # An empty path had served every call without a token, or gRPC in plaintext.
        ("IMAGE_GATEWAY_AUTH_TOKEN_FILE", ""),
        # Origins are compared as written: a wildcard inside one would match nothing.
        ("IMAGE_GATEWAY_CORS_ORIGIN", "https://*.example.com"),
    ],
)
def test_bad_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(SystemExit):
        config.parse([], {name: value})


@pytest.mark.parametrize(
    "argv",
    [
        ["--auth-token-file", ""],
        ["--grpc-tls-cert", "", "--grpc-tls-key", ""],
    ],
)
def test_an_empty_path_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # As `--auth-token-file "$TOKENS"` with the variable unset: the gateway had served every
    # call without a token, or gRPC in plaintext, without a word.
    with pytest.raises(SystemExit) as exited:
        config.parse(argv, {})
    assert exited.value.code == 2
    assert f"argument {argv[0]}: an empty path names no file" in capsys.readouterr().err


def test_a_thousand_threads_a_worker_are_allowed() -> None:
    names = ["workers", "http_threads", "grpc_threads", "grpc_calls", "max_streams"]
    s = config.parse([], {config.env_name(n): "1024" for n in [*names, "model_threads"]})
    assert {getattr(s, n) for n in names} == {1024}
    assert s.model_threads == 1024


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--http-port", "7000", "--grpc-port", "7000"], {}),
        (["--http-port", "7000"], {"IMAGE_GATEWAY_GRPC_PORT": "7000"}),
        ([], {"IMAGE_GATEWAY_HTTP_PORT": "50051"}),
    ],
)
def test_one_port_for_both_protocols_is_refused(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # With several workers both servers had joined one SO_REUSEPORT group on that port, and
    # the kernel handed gRPC's connections to the HTTP server: a ready gateway no gRPC client
    # could reach.
    with pytest.raises(SystemExit) as exited:
        config.parse(argv, env)
    assert exited.value.code == 2
    assert "--http-port and --grpc-port" in capsys.readouterr().err


def test_both_ports_may_be_picked_free() -> None:
    s = config.parse(["--http-port", "0", "--grpc-port", "0"], {})
    assert (s.http_port, s.grpc_port) == (0, 0)


def _help(name: str) -> str:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    (action,) = [a for a in parser._actions if a.dest == name]
    return " ".join((action.help or "").split())


def test_help_names_what_the_settings_act_on() -> None:
    # Every stop signal drains the gateway for --shutdown-grace, and --model-threads sets
    # OpenCV's own pool too (gateway/model_threads.py), as the README says.
    grace = _help("shutdown_grace")
    for signum in workers.STOP_SIGNALS:
        assert signum.name in grace
    assert "reload" in grace
    assert "OpenCV" in _help("model_threads")

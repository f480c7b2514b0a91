"""Settings come from flags, then IMAGE_GATEWAY_* variables, then defaults."""

from __future__ import annotations

import pytest

from gateway import config
from gateway.config import Settings


def test_defaults_bind_loopback() -> None:
    s = config.parse([], {})
    assert s == Settings()
    assert (s.host, s.http_port, s.grpc_port, s.model) == ("127.0.0.1", 5000, 50051, ("shape",))
    assert s.max_request_bytes > 20 * 1024 * 1024


def test_every_flag_has_an_environment_variable() -> None:
    env = {
        "IMAGE_GATEWAY_HOST": "0.0.0.0",
        "IMAGE_GATEWAY_HTTP_PORT": "8080",
        "IMAGE_GATEWAY_GRPC_PORT": "9090",
        "IMAGE_GATEWAY_MODEL": "qrcode, shape",
        "IMAGE_GATEWAY_MAX_REQUEST_BYTES": "1000",
        "IMAGE_GATEWAY_HTTP_THREADS": "3",
        "IMAGE_GATEWAY_GRPC_THREADS": "5",
        "IMAGE_GATEWAY_SHUTDOWN_GRACE": "1.5",
        "IMAGE_GATEWAY_LOG_LEVEL": "DEBUG",
    }
    assert config.parse([], env) == Settings(
        "0.0.0.0", 8080, 9090, ("qrcode", "shape"), 1000, 3, 5, 1.5, "DEBUG"
    )


def test_flags_win_and_model_repeats() -> None:
    s = config.parse(
        ["--http-port", "0", "--model", "shape", "--model", "qrcode"],
        {"IMAGE_GATEWAY_HTTP_PORT": "8080", "IMAGE_GATEWAY_MODEL": "x"},
    )
    assert s.http_port == 0
    assert s.model == ("shape", "qrcode")


@pytest.mark.parametrize(
    ("name", "value"),
    [("IMAGE_GATEWAY_HTTP_PORT", "70000"), ("IMAGE_GATEWAY_MAX_REQUEST_BYTES", "1e6")],
)
def test_bad_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(SystemExit):
        config.parse([], {name: value})

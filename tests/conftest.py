"""Fixtures that start real servers on ephemeral loopback ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.serve import Gateway, start

DATA = Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())
UNSUPPORTED = sorted((DATA / "unsupported").iterdir())


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Poll until `condition` holds; fail naming `what` if it does not within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        time.sleep(0.01)


MODELS = (
    "shape",
    "qrcode",
    "tests.models:failing",
    "tests.models:slow",
    "tests.models:spy",
    "tests.models:batching_spy",
    "tests.models:small_input",
    "tests.models:outputs",
)


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    gw = start(Settings(http_port=0, grpc_port=0, model=MODELS, shutdown_grace=2.0))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def http_url(gateway: Gateway) -> str:
    return gateway.http_url


@pytest.fixture(scope="session")
def channel(gateway: Gateway) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    with grpc.insecure_channel(gateway.grpc_target, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.ImageGatewayServiceStub:
    return pb_grpc.ImageGatewayServiceStub(channel)

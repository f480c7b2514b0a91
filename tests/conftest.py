"""Fixtures that start real servers on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.serve import Gateway, start

DATA = Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())
UNSUPPORTED = sorted((DATA / "unsupported").iterdir())

MODELS = (
    "shape",
    "qrcode",
    "tests.models:failing",
    "tests.models:slow",
    "tests.models:spy",
    "tests.models:batching_spy",
    "tests.models:small_input",
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

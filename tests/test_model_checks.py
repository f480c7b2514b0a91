"""A model declaring something wrongly fails at start, with its name and what is wrong; one
declaring it rightly is served alike over both protocols."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import requests

from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from clients.results import GatewayClientError
from gateway import config
from gateway.config import Settings
from gateway.core.batch_policy import BatchPolicy
from gateway.core.dataplane import DataPlane
from gateway.models.base import UNKNOWN_LABEL
from gateway.models.registry import ModelRegistry
from gateway.serve import Gateway, start
from tests.conftest import DATA

PNG = DATA / "images" / "hopper.png"


class Declared:
    """A model whose attributes are whatever a test sets."""

    def __init__(self, name: object = "m", description: object = "d", **attrs: Any) -> None:
        self.name = name
        self.description = description
        for key, value in attrs.items():
            setattr(self, key, value)

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        return [list(i.shape) for i in images]


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        # Listed over HTTP, INTERNAL over gRPC (int32), and every model hidden from ListModels.
        ({"min_input_size": (2**31, 10)}, "min_input_size"),
        # An infinite wait killed the batcher's thread: every request then waited 30 s for a 504.
        ({"max_batch_size": 8, "max_batch_wait_ms": float("inf")}, "max_batch_wait_ms"),
        # NaN never ended a wait.
        ({"max_batch_size": 8, "max_batch_wait_ms": float("nan")}, "max_batch_wait_ms"),
        ({"max_batch_size": 8, "max_batch_wait_ms": "abc"}, "max_batch_wait_ms"),
        ({"max_batch_size": 8, "max_batch_wait_ms": -1}, "max_batch_wait_ms"),
        # Batching was off without a word.
        ({"max_batch_size": 8.0}, "max_batch_size"),
        ({"max_batch_size": "8"}, "max_batch_size"),
        ({"max_batch_size": np.int64(8)}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_batch_size": 10_000}, "max_batch_size"),
        ({"max_batch_size": 8, "max_batch_wait_ms": 100_000}, "max_batch_wait_ms"),
        # Not a str: ListModels was INTERNAL, and any unknown name over HTTP a 500.
        ({"name": 123}, "name and description are str"),
        ({"description": None}, "name and description are str"),
        # Listed, but no route reaches it.
        ({"name": ""}, "model name"),
        # The label of unknown names: its counts and theirs would be one.
        ({"name": "-"}, "model name"),
        ({"name": "a//b"}, "model name"),
        ({"name": "a/../b"}, "model name"),
        ({"name": "/a"}, "model name"),
        ({"name": "a%2Fb"}, "model name"),
        # Its GET route would be the POST route of model "a".
        ({"name": "a/infer"}, "model name"),
        ({"name": "tab\there"}, "model name"),
        ({"name": "x" * 257}, "model name"),
    ],
)
def test_a_model_declared_wrongly_fails_at_start(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        load(Declared(**attrs))


def load(model: Declared, batching: dict[str, BatchPolicy | None] | None = None) -> None:
    """What a gateway's start does with a model: register it, then build the core around it."""
    DataPlane(ModelRegistry([model]), batching=batching).close()  # type: ignore[list-item]


def test_batching_set_by_the_operator_overrides_a_wrong_declaration() -> None:
    wrong = {"max_batch_size": 8, "max_batch_wait_ms": float("inf")}
    load(Declared(**wrong), batching={"m": None})
    load(Declared(**wrong), batching={"m": BatchPolicy(4, 0.002)})


def test_a_class_or_a_model_without_description_is_named_for_what_it_lacks() -> None:
    class NoDescription:
        name = "n"

        def predict(self, images: Any, params: Any) -> list[Any]:
            return []

    with pytest.raises(TypeError, match="returned the class Declared; return an instance"):
        ModelRegistry([Declared])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="lacks description"):
        ModelRegistry([NoDescription()])  # type: ignore[list-item]


class AsyncPredict(Declared):
    async def predict(  # type: ignore[override]
        self, images: Sequence[np.ndarray], params: Mapping[str, Any]
    ) -> list[Any]:
        return [list(i.shape) for i in images]


class OneArgument(Declared):
    def predict(self, images: Sequence[np.ndarray]) -> list[Any]:  # type: ignore[override]
        return [list(i.shape) for i in images]


class ThreeArguments(Declared):
    def predict(  # type: ignore[override]
        self, images: Sequence[np.ndarray], params: Mapping[str, Any], extra: Any
    ) -> list[Any]:
        return [list(i.shape) for i in images]


class Flexible(Declared):
    def predict(self, *args: Any, extra: Any = None) -> list[Any]:
        return [list(i.shape) for i in args[0]]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (AsyncPredict(), "predict is async"),
        (OneArgument(), r"predict\(images\) cannot be called as predict\(images, params\)"),
        (ThreeArguments(), "cannot be called as predict"),
    ],
)
def test_a_predict_the_gateway_cannot_call_fails_at_start(model: Declared, message: str) -> None:
    # Both loaded, then failed every request with model_error.
    with pytest.raises(TypeError, match=message):
        load(model)


def test_a_predict_taking_more_than_it_needs_is_accepted() -> None:
    load(Flexible())


@pytest.mark.parametrize(
    "attrs",
    [
        {"max_batch_size": 8, "max_batch_wait_ms": 0},
        {"max_batch_size": 1},
        {"max_batch_size": 0},
        {"max_batch_size": 9999, "max_batch_wait_ms": 99_999.5},
        {"max_batch_size": None},
        {"min_input_size": (2**31 - 1, 1)},
        {"name": "org/model"},
        {"name": "a model, with spaces and \u00e9"},
    ],
)
def test_a_model_declared_rightly_is_accepted(attrs: dict[str, Any]) -> None:
    load(Declared(**attrs))


@pytest.fixture(scope="module")
def slashed() -> Iterator[Gateway]:
    registry = ModelRegistry([Declared("shape-like"), Declared("org/model")])  # type: ignore[list-item]
    gw = start(Settings(http_port=0, grpc_port=0), registry=registry)
    yield gw
    gw.stop()


def test_a_model_named_with_a_slash_is_reached_over_both_protocols(slashed: Gateway) -> None:
    # Listed, and served over gRPC, but over HTTP "org/model" matched no route (404) and
    # "org%2Fmodel", as the client and the browser page send it, no model (cheroot leaves %2F
    # encoded).
    body = PNG.read_bytes()
    for path in ("org/model", "org%2Fmodel", "org%2fmodel"):
        url = f"{slashed.http_url}/v1/models/{path}"
        answer = requests.post(f"{url}/infer", data=body, timeout=10).json()
        assert (answer["model"], answer["result"]["output"]) == ("org/model", [128, 128, 3])
        assert requests.get(url, timeout=10).json()["name"] == "org/model"
    with grpc.insecure_channel(slashed.grpc_target) as channel:
        reply = pb_grpc.ImageGatewayServiceStub(channel).Infer(
            pb.InferRequest(model="org/model", image=pb.Image(data=body)), timeout=10
        )
    assert reply.model == "org/model"
    for url in (slashed.http_url, f"grpc://{slashed.grpc_target}"):
        with GatewayClient(url) as client:
            assert client.infer(PNG, model="org/model").output == [128, 128, 3]


def test_a_literal_percent_2f_in_a_path_names_no_model(slashed: Gateway) -> None:
    # "org%252Fmodel" spells the name "org%2Fmodel", which no model has (a proxy or an access
    # rule in front reads it so); cheroot decodes it to "org%2Fmodel", which was taken for
    # "org/model". Over gRPC that name is model_not_found too.
    body = PNG.read_bytes()
    for path in ("org%252Fmodel", "org%252fmodel"):
        url = f"{slashed.http_url}/v1/models/{path}"
        for resp in (
            requests.post(f"{url}/infer", data=body, timeout=10),
            requests.get(url, timeout=10),
        ):
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"]["code"] == "model_not_found"
            assert "org%2" in resp.json()["error"]["message"]
    with (
        grpc.insecure_channel(slashed.grpc_target) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.ImageGatewayServiceStub(channel).Infer(
            pb.InferRequest(model="org%2Fmodel", image=pb.Image(data=body)), timeout=10
        )
    assert dict(info.value.trailing_metadata())["error-code"] == "model_not_found"
    # The client sends such a name escaped once more, and gets the same answer over both.
    for url in (slashed.http_url, f"grpc://{slashed.grpc_target}"):
        with GatewayClient(url) as client, pytest.raises(GatewayClientError) as failed:
            client.infer(PNG, model="org%2Fmodel")
        assert failed.value.code == "model_not_found"


def _raw_answer(gw: Gateway, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """The status and JSON body of the answer to a request whose target is sent as written
    (HTTP libraries re-escape a path, and decode %-escapes of letters and digits)."""
    host, port = gw.http_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, _, rest = data.partition(b"\r\n")
    return int(status.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize(
    "spelt",
    [
        "org%252Fmodel",
        "org%25%32%46model",
        "org%25%32Fmodel",
        "org%25%32%66model",
        "org%252%46model",
        "org%%32Fmodel",
        "org%%32%46model",
    ],
)
def test_a_name_is_decoded_once_however_its_percent_2f_is_spelt(
    slashed: Gateway, spelt: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Each is "org%2Fmodel" (or "org%2fmodel") decoded once, as a proxy or an access rule in
    # front reads it. cheroot decodes the path once, keeping only %2F as it came, and the route
    # then took every %2F it was left with for "/": only "%252F" was caught, and the others
    # reached "org/model". (Even "%252F" was recorded as a request for "org/model".)
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = PNG.read_bytes()
    for method, path, data in (
        ("POST", f"/v1/models/{spelt}/infer", body),
        ("GET", f"/v1/models/{spelt}", b""),
    ):
        status, answer = _raw_answer(slashed, method, path, data)
        assert status == 404, (method, answer)
        assert answer["error"]["code"] == "model_not_found"
        assert "org%2" in answer["error"]["message"]
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert [r["model"] for r in records] == [UNKNOWN_LABEL] * 2


@pytest.mark.parametrize("spelt", ["org/model", "org%2Fmodel", "org%2F%6Dodel", "%6Frg/model"])
def test_a_name_decoded_once_to_a_served_name_reaches_it(slashed: Gateway, spelt: str) -> None:
    status, answer = _raw_answer(slashed, "POST", f"/v1/models/{spelt}/infer", PNG.read_bytes())
    assert (status, answer["model"]) == (200, "org/model"), answer
    status, answer = _raw_answer(slashed, "GET", f"/v1/models/{spelt}")
    assert (status, answer["name"]) == (200, "org/model"), answer
    status, answer = _raw_answer(slashed, "GET", f"/v1/models/{spelt}/%69nfer")
    assert (status, answer["error"]["code"]) == (405, "method_not_allowed"), answer


def test_get_on_an_infer_route_is_405(slashed: Gateway) -> None:
    resp = requests.get(f"{slashed.http_url}/v1/models/org/model/infer", timeout=10)
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_an_unknown_name_lists_a_bounded_number_of_models() -> None:
    # Every served name, whole: 9 KB of message for one long name.
    names = [f"{i:02d}-" + "n" * 250 for i in range(20)]
    registry = ModelRegistry([Declared(n) for n in names])  # type: ignore[misc]
    gw = start(Settings(http_port=0, grpc_port=0), registry=registry)
    try:
        resp = requests.post(f"{gw.http_url}/v1/models/nope/infer", data=b"x", timeout=10)
        message = resp.json()["error"]["message"]
        assert resp.status_code == 404 and len(message) < 1500
        assert message.endswith("and 4 more (GET /v1/models, ListModels)")
    finally:
        gw.stop()


def test_batching_can_name_a_model_whose_name_has_spaces() -> None:
    # "my model=off" was refused as malformed, so such a model's own batching stayed on.
    settings = config.parse(["--batching", "my model=off", "--batching", "a=b=4:2"])
    assert config.batch_policies(settings) == {"my model": None, "a=b": BatchPolicy(4, 0.002)}
    registry = ModelRegistry([Declared("my model", max_batch_size=8)])  # type: ignore[list-item]
    gw = start(Settings(http_port=0, grpc_port=0, batching=("my model=off",)), registry)
    try:
        assert gw.dataplane.batchers == {}
    finally:
        gw.stop()

"""A buggy model fails only the requests it failed, with model_error, on every front and with
batching on or off; the server goes on serving."""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import requests

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.core.outputs import NotJSONError, to_json_value
from gateway.serve import Gateway, start
from tests.conftest import wait_for
from tests.models import GATE, SEEN
from tests.wire import grpc_code, grpc_result

MODELS = ("shape", "tests.models:misbehaving", "tests.models:misbehaving_batched")
PLAIN, BATCHED = "misbehaving", "misbehaving-batched"


def png(width: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(1, 255, (10, width, 3), np.uint8)
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


BAD = png(13)  # the model misbehaves on an image 13 pixels wide
GOOD = [png(16, seed) for seed in range(3)]


def expected(data: bytes) -> list[int]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return [*image.shape, int(image[0, 0].sum())]


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    gateway = start(Settings(http_port=0, grpc_port=0, model=MODELS))
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def stub(gw: Gateway) -> Iterator[pb_grpc.ImageGatewayServiceStub]:
    with grpc.insecure_channel(gw.grpc_target) as channel:
        yield pb_grpc.ImageGatewayServiceStub(channel)


def http_infer(gw: Gateway, model: str, data: bytes, do: str) -> tuple[int, Any]:
    answer = requests.post(
        f"{gw.http_url}/v1/models/{model}/infer",
        data=data,
        params={"do": do},
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    body = answer.json()
    if "error" in body:
        return answer.status_code, body["error"]["code"]
    return answer.status_code, body["result"]["output"]


def grpc_infer(stub: pb_grpc.ImageGatewayServiceStub, model: str, data: bytes, do: str) -> Any:
    request = pb.InferRequest(model=model, image=pb.Image(data=data))
    request.parameters.update({"do": do})
    try:
        return grpc_result(stub.Infer(request, timeout=30).result)["output"]
    except grpc.RpcError as exc:
        return grpc_code(exc)


def still_serving(gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    for model in (PLAIN, BATCHED):
        assert http_infer(gw, model, GOOD[0], "") == (200, expected(GOOD[0]))
        assert grpc_infer(stub, model, GOOD[0], "") == expected(GOOD[0])


MODEL_ERROR = (grpc.StatusCode.INTERNAL, "model_error")


@pytest.mark.parametrize("model", [PLAIN, BATCHED])
@pytest.mark.parametrize(
    "do", ["SystemExit", "KeyboardInterrupt", "TimeoutError", "CancelledError", "GatewayError"]
)
def test_whatever_a_model_raises_is_model_error(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, model: str, do: str
) -> None:
    # SystemExit on a request thread stopped the HTTP server and left gRPC calls unanswered;
    # the model's own TimeoutError was taken for the deadline, its CancelledError for a client
    # gone.
    assert http_infer(gw, model, BAD, do) == (500, "model_error")
    assert grpc_infer(stub, model, BAD, do) == MODEL_ERROR
    still_serving(gw, stub)


@pytest.mark.parametrize("do", ["SystemExit", "TimeoutError", "write"])
def test_a_merged_batch_the_model_fails_fails_only_the_bad_request(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, do: str
) -> None:
    # Sent together with the same parameters, the four meet in one batch. With "write" the
    # model changes its input before it fails: retried alone, the good ones must still see
    # their own pixels.
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(grpc_infer, stub, BATCHED, data, do) for data in [*GOOD, BAD]]
        outputs = [call.result() for call in calls]
    assert outputs == [*map(expected, GOOD), MODEL_ERROR]
    still_serving(gw, stub)


@pytest.mark.parametrize("model", [PLAIN, BATCHED])
def test_a_model_that_refuses_the_parameters_fails_the_request_as_invalid(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, model: str
) -> None:
    # A ParameterError is the client's to mend, in the model's words, on every front; the
    # requests merged in one call (they share their parameters) are all refused, without a
    # retry each or a traceback in the log.
    words = f"model {model!r} refused the request's parameters: threshold must be a number, not 'x'"
    with logs_not_kept() as log:
        answer = requests.post(
            f"{gw.http_url}/v1/models/{model}/infer",
            data=GOOD[0],
            params={"do": "ParameterError"},
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_request"
        assert answer.json()["error"]["message"] == words
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(grpc_infer, stub, model, data, "ParameterError") for data in GOOD]
            assert {call.result() for call in calls} == {
                (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
            }
    assert "Traceback" not in log.getvalue()
    assert "retrying each alone" not in log.getvalue()
    still_serving(gw, stub)


@contextmanager
def logs_not_kept() -> Iterator[io.StringIO]:
    """The gateway's log, written to a string and not kept: pytest keeps every record it
    captures, and with it a traceback's frames and the images they hold."""
    logger = logging.getLogger("gateway")
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@pytest.mark.parametrize("model", [PLAIN, BATCHED])
@pytest.mark.parametrize("do", ["", "TimeoutError", "huge-int"])
@pytest.mark.parametrize("front", ["http", "grpc"])
def test_a_request_leaves_no_image_behind_for_the_cycle_collector(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, model: str, do: str, front: str
) -> None:
    # A model that raised, or answered what no front carries, left its request's images in a
    # reference cycle (through the exception's traceback), alive until the cycle collector ran;
    # a batched model held its last batch's images until the next batch came.
    gc.collect()
    gc.disable()
    try:
        with logs_not_kept():
            SEEN.clear()
            if front == "http":
                answer = http_infer(gw, model, BAD, do)
                assert answer == ((200, expected(BAD)) if do == "" else (500, "model_error"))
            else:
                answer = grpc_infer(stub, model, BAD, do)
                assert answer == (expected(BAD) if do == "" else MODEL_ERROR)
            assert SEEN
            wait_for(lambda: all(ref() is None for ref in SEEN), "the request's images freed")
    finally:
        gc.enable()


def test_a_merged_batch_that_failed_is_logged_with_its_traceback(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # Retried alone, each request succeeds or fails on its own, and a model that fails only on
    # batches had no other trace than one line.
    with logs_not_kept() as log, ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(grpc_infer, stub, BATCHED, data, "TimeoutError") for data in [*GOOD, BAD]
        ]
        assert [call.result() for call in calls] == [*map(expected, GOOD), MODEL_ERROR]
    text = log.getvalue()
    merged = text.index("failed on a merged batch of 4 requests; retrying each alone")
    # Its own record, before the failed retry's.
    record = text[merged : text.index("failed, request id", merged)]
    assert "Traceback" in record
    assert "TimeoutError: the model raised this itself" in record


@pytest.mark.parametrize("model", [PLAIN, BATCHED])
def test_outputs_in_any_sequence_are_answered_batched_or_not(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, model: str
) -> None:
    # A deque cannot be sliced: a merged batch failed all its requests with model_error.
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(grpc_infer, stub, model, data, "deque") for data in GOOD]
        assert [call.result() for call in calls] == list(map(expected, GOOD))
    assert http_infer(gw, model, GOOD[0], "deque") == (200, expected(GOOD[0]))


@pytest.mark.parametrize(
    "do", ["huge-int", "surrogate", "deep", "clashing-keys", "tuple-key", "str"]
)
def test_outputs_no_front_can_carry_are_model_error_everywhere(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, do: str
) -> None:
    assert http_infer(gw, PLAIN, BAD, do) == (500, "model_error")
    assert grpc_infer(stub, PLAIN, BAD, do) == MODEL_ERROR
    # In a stream, that message fails alone and the next one is answered.
    messages = [
        pb.InferStreamRequest(model=PLAIN, image=pb.Image(data=data)) for data in (BAD, GOOD[0])
    ]
    for message in messages:
        message.parameters.update({"do": do})
    replies = list(stub.InferStream(iter(messages), timeout=30))
    assert replies[0].result.error.code == "model_error"
    assert grpc_result(replies[1].result)["output"] == expected(GOOD[0])
    still_serving(gw, stub)


@pytest.mark.parametrize("model", [PLAIN, BATCHED])
def test_an_output_no_front_can_carry_fails_only_its_own_image(
    gw: Gateway, stub: pb_grpc.ImageGatewayServiceStub, model: str
) -> None:
    # The whole request failed, its other images' outputs lost, and the log said only
    # "NotJSONError: an integer of 1329 bits ...", not where in which output.
    images = [GOOD[0], BAD, GOOD[1]]
    with logs_not_kept() as log:
        answer = requests.post(
            f"{gw.http_url}/v1/models/{model}/infer",
            files={str(i): (f"{i}.png", data) for i, data in enumerate(images)},
            params={"do": "huge-int"},
            timeout=30,
        )
        request = pb.InferBatchRequest(
            model=model, images=[pb.Image(name=str(i), data=d) for i, d in enumerate(images)]
        )
        request.parameters.update({"do": "huge-int"})
        over_grpc = [grpc_result(r) for r in stub.InferBatch(request, timeout=30).results]
    assert answer.status_code == 200
    for results in (answer.json()["results"], over_grpc):
        # (The model answers the others with their shape.)
        assert [r.get("output") for r in results] == [[10, 16, 3], None, [10, 16, 3]]
        assert results[1]["error"]["code"] == "model_error"
    assert f"model {model!r} answered image 1 of request " in log.getvalue()
    assert "with an output no front can carry: output: an integer of 1329 bits" in (log.getvalue())


def test_where_in_an_output_a_value_has_no_json_form_is_named() -> None:
    with pytest.raises(NotJSONError) as caught:
        to_json_value({"boxes": [{"score": 0.5}, {"score": float("nan")}]})
    assert str(caught.value) == "['boxes'][1]['score']: nan has no JSON form"


def test_parameters_equal_in_python_but_not_in_json_are_not_merged() -> None:
    # True == 1 in Python: merged, both requests got one of the two parameter values.
    gw = start(Settings(http_port=0, grpc_port=0, model=("tests.models:batching_spy",)))
    try:
        with grpc.insecure_channel(gw.grpc_target) as channel, ThreadPoolExecutor(2) as pool:
            stub = pb_grpc.ImageGatewayServiceStub(channel)

            def call(tag: Any) -> Any:
                request = pb.InferRequest(model="batching-spy", image=pb.Image(data=GOOD[0]))
                request.parameters.update({"tag": tag})
                return grpc_result(stub.Infer(request, timeout=30).result)["output"]["tag"]

            tags = list(pool.map(call, [True, 1]))
        assert tags == [True, 1] and [type(t) for t in tags] == [bool, int]
    finally:
        gw.stop()


def test_requests_waiting_for_a_batch_keep_their_place_in_the_budget() -> None:
    # The batched model hangs (until the gate opens). Its requests hold their share of the
    # pixel budget while they wait, so the queue limit applies: with room for one image and a
    # queue of one, the third request is refused at once. They used to leave the budget once
    # decoded, and a hung model gathered every request sent, images and all, without limit.
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("tests.models:gated_batching",),
            max_concurrency=1,
            max_request_pixels=10 * 16,
            max_queue=1,
        )
    )
    GATE.clear()
    try:
        with grpc.insecure_channel(gw.grpc_target) as channel, ThreadPoolExecutor(2) as pool:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            first = pool.submit(grpc_infer, stub, "gated-batching", GOOD[0], "")
            wait_for(lambda: gw.dataplane.admission.active == 1, "the first request runs")
            second = pool.submit(grpc_infer, stub, "gated-batching", GOOD[1], "")
            wait_for(lambda: gw.dataplane.admission.waiting == 1, "the second one queues")
            refused = grpc_infer(stub, "gated-batching", GOOD[2], "")
            assert refused == (grpc.StatusCode.UNAVAILABLE, "overloaded")
            GATE.set()
            assert [first.result(), second.result()] == [[10, 16, 3], [10, 16, 3]]
    finally:
        GATE.set()
        gw.stop()


def test_a_batch_that_outlives_its_requests_keeps_their_pixels_in_the_budget() -> None:
    # The request is answered at its deadline while the model still holds its images. Its share
    # of the budget used to be given back then, and further requests decoded past the budget
    # while the batch ran.
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("tests.models:gated_batching",),
            request_timeout=1,
            max_concurrency=1,
            max_request_pixels=10 * 16,
            max_queue=0,
        )
    )
    GATE.clear()
    try:
        first = requests.post(f"{gw.http_url}/v1/infer", data=GOOD[0], timeout=20)
        assert (first.status_code, first.json()["error"]["code"]) == (504, "deadline_exceeded")
        second = requests.post(f"{gw.http_url}/v1/infer", data=GOOD[1], timeout=20)
        assert (second.status_code, second.json()["error"]["code"]) == (503, "overloaded")
        GATE.set()
        wait_for(lambda: gw.dataplane.admission.active == 0, "the batch's pixels given back")
        third = requests.post(f"{gw.http_url}/v1/infer", data=GOOD[2], timeout=20)
        assert (third.status_code, third.json()["result"]["output"]) == (200, [10, 16, 3])
    finally:
        GATE.set()
        gw.stop()


def test_a_batched_request_is_answered_at_its_deadline_while_its_batch_runs_on() -> None:
    gw = start(
        Settings(
            http_port=0, grpc_port=0, model=("tests.models:gated_batching",), request_timeout=1
        )
    )
    GATE.clear()
    try:
        answer = requests.post(f"{gw.http_url}/v1/infer", data=GOOD[0], timeout=20)
        assert (answer.status_code, answer.json()["error"]["code"]) == (504, "deadline_exceeded")
    finally:
        GATE.set()
        gw.stop()

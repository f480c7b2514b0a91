"""Dynamic batching: concurrent requests share a predict call, and fail only alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import requests

from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway import config
from gateway.config import Settings
from gateway.core.batch_policy import BatchPolicy
from gateway.core.batching import Batcher, DroppedError, WaitTimeoutError
from gateway.core.errors import ErrorCode, GatewayError
from gateway.serve import Gateway, start
from tests.conftest import wait_for
from tests.models import BATCHING_SPY, GATE, GATED_BATCHING
from tests.test_faults import gated_gateway
from tests.wire import grpc_result, post_octet

MODEL = "batching-spy"


def png(width: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((8, width, 3), np.uint8))
    assert ok
    return buf.tobytes()


def call(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub, i: int, width: int, tag: str = "a"
) -> dict[str, Any]:
    if i % 2:
        request = pb.InferRequest(model=MODEL, image=pb.Image(data=png(width)))
        request.parameters.update({"tag": tag})
        try:
            return grpc_result(stub.Infer(request, timeout=30).result)
        except grpc.RpcError as exc:
            return {"error": {"code": dict(exc.trailing_metadata())["error-code"]}}
    resp = requests.post(
        f"{gateway.http_url}/v1/models/{MODEL}/infer",
        data=png(width),
        params={"tag": tag},
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    body = resp.json()
    return body["result"] if resp.ok else {"error": body["error"]}


def test_concurrent_requests_from_both_protocols_share_calls(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    before = len(BATCHING_SPY.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: call(gateway, stub, i, 20 + i), range(8)))
    # Each request gets its own output back, whatever batch it rode in.
    assert [r["output"]["width"] for r in results] == [20 + i for i in range(8)]
    sizes = BATCHING_SPY.batch_sizes[before:]
    assert sum(sizes) == 8
    assert max(sizes) > 1, sizes


def test_a_failing_request_fails_alone(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    widths = [20, 13, 21, 22, 23, 24]
    with ThreadPoolExecutor(len(widths)) as pool:
        results = list(pool.map(lambda a: call(gateway, stub, *a), enumerate(widths)))
    assert results[1]["error"]["code"] == "model_error"
    for width, result in zip(widths, results, strict=True):
        if width != 13:
            assert result["output"]["width"] == width


def test_different_parameters_are_never_merged(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: call(gateway, stub, i, 30, tag="ab"[i % 2]), range(6)))
    assert [r["output"]["tag"] for r in results] == ["a", "b", "a", "b", "a", "b"]


def test_requests_of_different_color_modes_are_never_merged(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # Without batching a call gets one request's images, all of one color mode: a model that
    # stacks its batch must not get 2-D grayscale and 3-D color arrays, or 8 and 16 bits, at once.
    modes = ["color", "grayscale", "unchanged"]

    def one(i: int) -> int:
        mode = modes[i % 3]
        if i % 2:
            request = pb.InferRequest(
                model=MODEL, image=pb.Image(data=png(30 + i)), color_mode=_GRPC_MODES[mode]
            )
            return int(grpc_result(stub.Infer(request, timeout=30).result)["output"]["width"])
        resp = requests.post(
            f"{gateway.http_url}/v1/models/{MODEL}/infer",
            data=png(30 + i),
            params={"color_mode": mode},
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        return int(resp.json()["result"]["output"]["width"])

    before = len(BATCHING_SPY.layouts)
    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(12))) == [30 + i for i in range(12)]
    calls = BATCHING_SPY.layouts[before:]
    assert all(len(layouts) == 1 for layouts in calls), calls
    # Still batched: twelve requests in fewer calls.
    assert len(calls) < 12, calls


_GRPC_MODES = {
    "color": pb.COLOR_MODE_COLOR,
    "grayscale": pb.COLOR_MODE_GRAYSCALE,
    "unchanged": pb.COLOR_MODE_UNCHANGED,
}


def test_a_batch_of_at_most_one_image_is_no_batching() -> None:
    # As a model's own max_batch_size of 0 or 1 is: every call at once, none waiting for the
    # batcher's single thread.
    settings = config.parse(["--batching", "embed=0:5", "--batching", "shape=1:0"], {})
    assert config.batch_policies(settings) == {"embed": None, "shape": None}
    with gated_gateway(
        model=("shape", "tests.models:gated_batching"), batching=("gated-batching=1:0",)
    ) as gw:
        assert gw.dataplane.batchers == {}
        before = len(GATED_BATCHING.tags)
        with ThreadPoolExecutor(2) as pool:
            answers = [
                pool.submit(post_octet, gw.http_url, "gated-batching", png(10)) for _ in range(2)
            ]
            # Both requests are inside the model at once: neither waits for the other.
            wait_for(lambda: len(GATED_BATCHING.tags) == before + 2, "two calls run together")
            GATE.set()
            assert [a.result().status_code for a in answers] == [200, 200]


def test_model_listings_give_the_batching_in_force() -> None:
    # Its own attributes (batching-spy asks for 16 / 300 ms), the operator's --batching over
    # them (outputs), and none (shape), alike over HTTP, gRPC and the Python client.
    with gated_gateway(
        model=("shape", "tests.models:batching_spy", "tests.models:outputs"),
        batching=("outputs=4:1.5",),
    ) as gw:
        expected = {"shape": None, "batching-spy": (16, 300.0), "outputs": (4, 1.5)}
        listed = requests.get(f"{gw.http_url}/v1/models", timeout=10).json()["models"]
        assert {m["name"]: m["batching"] for m in listed} == {
            name: None if p is None else {"max_batch_size": p[0], "max_batch_wait_ms": p[1]}
            for name, p in expected.items()
        }
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models:
                policy = expected[m.name]
                assert m.HasField("batching") == (policy is not None)
                if policy is not None:
                    assert (m.batching.max_batch_size, m.batching.max_batch_wait_ms) == policy
            one = stub.GetModel(pb.GetModelRequest(name="outputs"), timeout=10).model
            assert (one.batching.max_batch_size, one.batching.max_batch_wait_ms) == (4, 1.5)
        for url in (gw.http_url, f"grpc://{gw.grpc_target}"):
            with GatewayClient(url) as client:
                assert {m.name: m.batching for m in client.list_models()} == expected


def test_batching_settings() -> None:
    settings = config.parse(["--batching", "embed=16:5", "--batching", "shape=off"], {})
    assert config.batch_policies(settings) == {"embed": BatchPolicy(16, 0.005), "shape": None}
    env = config.parse([], {"IMAGE_GATEWAY_BATCHING": "embed=8:2.5"})
    assert config.batch_policies(env) == {"embed": BatchPolicy(8, 0.0025)}
    for bad in ("embed", "embed=-1:5", "embed=16", "=16:5", "embed=16:x"):
        try:
            config.parse(["--batching", bad], {})
        except SystemExit:
            continue
        raise AssertionError(f"{bad!r} was accepted")


class GatedModel:
    """Blocks its first call until released, so that requests pile up behind it."""

    name = "gated"
    description = "for ordering tests"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        if not self.calls:
            self.calls.append([str(params["tag"])])
            self.release.wait(10)
            return [params["tag"]] * len(images)
        self.calls.append([str(params["tag"])] * len(images))
        return [params["tag"]] * len(images)


@contextlib.contextmanager
def running(model: Any, policy: BatchPolicy) -> Iterator[Batcher]:
    """A batcher of `model`, closed on the way out."""
    batcher = Batcher(model, policy)
    try:
        yield batcher
    finally:
        batcher.close()


def test_batcher_takes_matching_jobs_from_anywhere_in_its_queue() -> None:
    model = GatedModel()

    def image() -> np.ndarray:
        # A new array each time: jobs must never be compared by their contents.
        return np.zeros((2, 2, 3), np.uint8)

    with running(model, BatchPolicy(max_batch_size=8, max_wait=0.05)) as batcher:
        with ThreadPoolExecutor(7) as pool:
            first = pool.submit(batcher.predict, [image()], {"tag": "x"}, 10)
            while not model.calls:
                threading.Event().wait(0.01)
            # Queued behind the blocked call, with parameters interleaved.
            tags = ["a", "b", "a", "b", "a", "b"]
            futures = [pool.submit(batcher.predict, [image()], {"tag": t}, 10) for t in tags]
            wait_for(lambda: batcher.waiting == len(tags), "all six queue")
            model.release.set()
            assert first.result() == ["x"]
            assert [f.result() for f in futures] == [[t] for t in tags]
        # After the first call: all the "a"s in one call and all the "b"s in another.
        assert sorted(model.calls[1:]) == [["a", "a", "a"], ["b", "b", "b"]]


def test_jobs_given_up_on_never_reach_the_model() -> None:
    model = GatedModel()
    image = np.zeros((2, 2, 3), np.uint8)
    with running(model, BatchPolicy(max_batch_size=8, max_wait=0.001)) as batcher:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(batcher.predict, [image], {"tag": "x"}, 10)
            wait_for(lambda: bool(model.calls), "the first call holds the batcher")
            # Queued behind it: one whose caller stops waiting, one nobody wants any more by the
            # time a batch would take it, and one still wanted.
            with pytest.raises(WaitTimeoutError):
                batcher.predict([image], {"tag": "late"}, 0.05)
            # Gone from the queue at once, its images with it, though no batch runs.
            assert batcher.waiting == 0
            gone = GatewayError(ErrorCode.CANCELLED, "the client went away")
            unwanted = pool.submit(batcher.predict, [image], {"tag": "gone"}, 10, lambda: gone)
            kept = pool.submit(batcher.predict, [image], {"tag": "kept"}, 10, lambda: None)
            wait_for(lambda: batcher.waiting == 2, "two jobs queue")
            model.release.set()
            assert first.result() == ["x"]
            assert kept.result() == ["kept"]
            with pytest.raises(DroppedError):
                unwanted.result()
        assert model.calls == [["x"], ["kept"]]
        assert batcher.waiting == 0


def test_a_job_whose_client_leaves_while_it_waits_for_a_batch_leaves_the_queue() -> None:
    model = GatedModel()
    image = np.zeros((2, 2, 3), np.uint8)
    left = threading.Event()
    gone = GatewayError(ErrorCode.CANCELLED, "the client went away")
    with running(model, BatchPolicy(max_batch_size=8, max_wait=0.001)) as batcher:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(batcher.predict, [image], {"tag": "x"}, 10)
            wait_for(lambda: bool(model.calls), "the first call holds the batcher")
            waiting = pool.submit(
                batcher.predict, [image], {"tag": "y"}, 10, lambda: gone if left.is_set() else None
            )
            wait_for(lambda: batcher.waiting == 1, "the second job queues")
            left.set()
            # Dropped while the batch ahead of it still runs: its thread and its share of the
            # pixel budget are not held until a batch would take it.
            with pytest.raises(DroppedError):
                waiting.result(timeout=5)
            assert batcher.waiting == 0
            model.release.set()
            assert first.result() == ["x"]
        assert model.calls == [["x"]]


class FailsMerged:
    """Fails every call of more than one image, setting `merged`; records every call's tags."""

    name = "fails-merged"
    description = "for retry tests"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.merged = threading.Event()

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        self.calls.append([str(params["tag"])] * len(images))
        if len(images) > 1:
            self.merged.set()
            raise ValueError("merged")
        return [params["tag"]]


def test_the_retries_after_a_failed_merged_call_skip_jobs_nobody_waits_for() -> None:
    model = FailsMerged()
    image = np.zeros((2, 2, 3), np.uint8)
    gone = GatewayError(ErrorCode.CANCELLED, "the client went away")

    def stopped_once_merged() -> GatewayError | None:
        # The second job's client leaves while the merged call runs.
        return gone if model.merged.is_set() else None

    # A batch of two is taken as soon as both jobs are in, however long apart they come.
    with running(model, BatchPolicy(max_batch_size=2, max_wait=30)) as batcher:
        with ThreadPoolExecutor(2) as pool:
            kept = pool.submit(batcher.predict, [image], {"tag": "t"}, 10, lambda: None)
            left = pool.submit(batcher.predict, [image], {"tag": "t"}, 10, stopped_once_merged)
            assert kept.result() == ["t"]
            with pytest.raises(DroppedError):
                left.result()
        # The merged call, then the one retry somebody still waits for.
        assert model.calls == [["t", "t"], ["t"]]


def test_a_deadline_shorter_than_the_batch_wait_still_gets_its_answer() -> None:
    # The batch used to wait its whole window (30 s here), and the request failed at its 2 s.
    model = FailsMerged()
    image = np.zeros((2, 2, 3), np.uint8)
    with running(model, BatchPolicy(max_batch_size=8, max_wait=30)) as batcher:
        assert batcher.predict([image], {"tag": "t"}, timeout=2) == ["t"]


def test_batching_for_a_model_not_served_stops_the_start() -> None:
    with pytest.raises(ValueError, match="embeding"):
        start(Settings(http_port=0, grpc_port=0, batching=("embeding=16:2",)))

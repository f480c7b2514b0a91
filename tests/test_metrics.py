"""/metrics counts exactly the calls made, per protocol and status, with one or two workers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.metrics import SampledShare
from gateway.serve import Gateway, start
from tests.bombs import bomb
from tests.conftest import DATA, wait_for
from tests.test_process import (
    a_replacement_serves,
    launch,
    replaced,
    replacements,
    spawned,
)
from tests.wire import post_multipart, post_octet

PNG = (DATA / "images" / "hopper.png").read_bytes()


def request_counts(http_url: str) -> Counter[tuple[str, str, str, str]]:
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_requests":
            for sample in family.samples:
                if sample.name == "gateway_requests_total":
                    labels = sample.labels
                    key = (labels["protocol"], labels["method"], labels["model"], labels["code"])
                    counts[key] += int(sample.value)
    return counts


def scripted_calls(http_url: str, grpc_target: str) -> Counter[tuple[str, str, str, str]]:
    """Make a fixed mix of calls; return what /metrics should count for them."""
    expected: Counter[tuple[str, str, str, str]] = Counter()
    route = "POST /v1/models/<model>/infer"
    for _ in range(5):
        assert post_octet(http_url, "shape", PNG).status_code == 200
    expected["http", route, "shape", "200"] += 5
    for _ in range(3):
        assert post_octet(http_url, "shape", b"junk").status_code == 422
    expected["http", route, "shape", "422"] += 3
    # One channel per call, so that with several workers the calls spread across them.
    for i in range(6):
        with grpc.insecure_channel(
            grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            if i % 3 == 2:
                with contextlib.suppress(grpc.RpcError):
                    stub.Infer(
                        pb.InferRequest(model="shape", image=pb.Image(data=b"x")), timeout=10
                    )
                expected["grpc", "Infer", "shape", "INVALID_ARGUMENT"] += 1
            else:
                stub.InferBatch(
                    pb.InferBatchRequest(model="shape", images=[pb.Image(data=PNG)] * 2),
                    timeout=10,
                )
                expected["grpc", "InferBatch", "shape", "OK"] += 1
    return expected


Counts = Counter[tuple[str, str, str, str]]


def delta(after: Counts, before: Counts) -> Counts:
    # Scrapes of /metrics itself are counted too; they are not part of the script.
    return Counter(
        {k: after[k] - before[k] for k in after if after[k] != before[k] and k[1] != "GET /metrics"}
    )


def counted_calls(http_url: str) -> Counts:
    """What /metrics counts, its own scrapes left out."""
    counts = request_counts(http_url)
    return Counter({k: v for k, v in counts.items() if k[1] != "GET /metrics"})


def test_metrics_count_the_calls_in_one_process(gateway: Gateway) -> None:
    before = request_counts(gateway.http_url)
    expected = scripted_calls(gateway.http_url, gateway.grpc_target)
    assert delta(request_counts(gateway.http_url), before) == expected
    text = requests.get(f"{gateway.http_url}/metrics", timeout=10).text
    for series in (
        "gateway_request_duration_seconds_bucket",
        "gateway_decode_seconds_bucket",
        "gateway_image_bytes_bucket",
        "gateway_image_pixels_bucket",
        "gateway_images_per_request_bucket",
        "gateway_model_batch_size_bucket",
        "gateway_in_flight_requests",
        'gateway_image_errors_total{code="undecodable_image"}',
    ):
        assert series in text, series


def test_metrics_count_the_calls_across_two_workers(tmp_path: Path) -> None:
    served = launch(tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "2")
    try:
        # Shown at 0 from the start, for increase() to count the first of each.
        assert replacements(served.http_url) == replaced()
        expected = scripted_calls(served.http_url, served.grpc_target)

        # Each worker applies its updates within FLUSH_INTERVAL; wait (bounded) for the other
        # worker's, then any worker's /metrics sums all of them, over fresh connections.
        deadline = time.monotonic() + 10
        while counted_calls(served.http_url) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(4):
            assert counted_calls(served.http_url) == expected
    finally:
        served.proc.terminate()
        assert served.proc.wait(timeout=30) == 0


def histogram(http_url: str, name: str) -> dict[str, float]:
    """One unlabelled histogram's samples: "count", "sum" and each bucket by its bound."""
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                values[sample.labels["le"]] = sample.value
            elif sample.name in (f"{name}_count", f"{name}_sum"):
                values[sample.name.rsplit("_", 1)[1]] = sample.value
    return values


def test_histograms_count_each_observation_in_its_bucket(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # Updates are summed per series before they are applied: the buckets, count and sum must
    # still be what one observe() per request gives.
    name = "gateway_images_per_request"
    before = histogram(gateway.http_url, name)
    files = [(str(i), (f"{i}.png", PNG)) for i in range(3)]
    assert requests.post(f"{gateway.http_url}/v1/infer", files=files, timeout=10).ok
    for _ in range(2):
        assert post_octet(gateway.http_url, "shape", PNG).ok
    stub.InferBatch(pb.InferBatchRequest(images=[pb.Image(data=PNG)] * 5), timeout=10)
    after = histogram(gateway.http_url, name)
    gained = {k: after[k] - before.get(k, 0) for k in after}
    # Buckets are cumulative: le=2 holds the two 1-image requests, le=4 adds the 3-image one.
    assert gained == {
        "1.0": 2, "2.0": 2, "4.0": 3, "8.0": 4, "16.0": 4, "32.0": 4, "64.0": 4, "+Inf": 4,
        "count": 4, "sum": 10,
    }  # fmt: skip
    in_flight = requests.get(f"{gateway.http_url}/metrics", timeout=10).text
    assert "gateway_in_flight_requests 0.0" in in_flight


def test_labels_are_only_served_models_and_matched_routes(
    gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    """A client choosing model names or method tokens cannot add series: each series is kept
    for the life of the process, so those would be memory without bound."""
    before = request_counts(gateway.http_url)
    for i in range(3):
        assert post_octet(gateway.http_url, f"nope-{i}", PNG).status_code == 404
        assert requests.get(f"{gateway.http_url}/v1/models/nope-{i}", timeout=10).status_code == 404
        assert (
            requests.request("BREW", f"{gateway.http_url}/v1/infer", timeout=10).status_code == 405
        )
        with contextlib.suppress(grpc.RpcError):
            stub.Infer(pb.InferRequest(model=f"nope-{i}", image=pb.Image(data=PNG)), timeout=10)
        with contextlib.suppress(grpc.RpcError):
            stub.GetModel(pb.GetModelRequest(name=f"nope-{i}"), timeout=10)
    assert requests.post(f"{gateway.http_url}/v1/infer", data=PNG, timeout=10).ok
    assert requests.get(f"{gateway.http_url}/v1/models/shape", timeout=10).ok
    stub.GetModel(pb.GetModelRequest(name="shape"), timeout=10)
    stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=10)
    assert delta(request_counts(gateway.http_url), before) == {
        ("http", "POST /v1/models/<model>/infer", "-", "404"): 3,
        ("http", "GET /v1/models/<model>", "-", "404"): 3,
        ("http", "-", "", "405"): 3,
        ("grpc", "Infer", "-", "NOT_FOUND"): 3,
        ("grpc", "GetModel", "-", "NOT_FOUND"): 3,
        # The default model, named or not, under its own name.
        ("http", "POST /v1/infer", "shape", "200"): 1,
        ("http", "GET /v1/models/<model>", "shape", "200"): 1,
        ("grpc", "GetModel", "shape", "OK"): 1,
        ("grpc", "Infer", "shape", "OK"): 1,
    }


def image_errors(http_url: str) -> Counter[str]:
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_image_errors_total":
                counts[sample.labels["code"]] += int(sample.value)
    return counts


def request_errors(http_url: str) -> Counter[tuple[str, str]]:
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_request_errors_total":
                counts[sample.labels["protocol"], sample.labels["code"]] += int(sample.value)
    return counts


def test_requests_refused_before_their_route_runs_keep_their_model_label() -> None:
    gw = start(Settings(http_port=0, grpc_port=0, max_request_bytes=50_000, max_image_bytes=20_000))
    try:
        before, errors_before = request_counts(gw.http_url), image_errors(gw.http_url)
        over_request, over_image = b"\0" * 60_000, PNG + b"\0" * (20_001 - len(PNG))
        for path in ("/v1/models/shape/infer", "/v1/infer", "/", "/v1/models/nope/infer"):
            answer = requests.post(
                gw.http_url + path,
                data=over_request,
                headers={"Content-Type": "application/octet-stream"},
                timeout=10,
            )
            assert answer.status_code == 413
        assert post_octet(gw.http_url, "shape", over_image).status_code == 413
        counted = delta(request_counts(gw.http_url), before)
        assert counted == {
            ("http", "POST /v1/models/<model>/infer", "shape", "413"): 2,
            ("http", "POST /v1/infer", "shape", "413"): 1,
            ("http", "POST /", "shape", "413"): 1,
            ("http", "POST /v1/models/<model>/infer", "-", "413"): 1,
        }
        # The image over its own cap is an image refused; the bodies over the request's are not.
        assert image_errors(gw.http_url) - errors_before == {"image_too_large": 1}
    finally:
        gw.stop()


def test_grpc_requests_refused_from_their_wire_form_keep_their_model_label() -> None:
    # Refused before protobuf parses them (more images than --max-images), they were counted
    # under no model, where the same refusal over HTTP counts under the model it names.
    gw = start(Settings(http_port=0, grpc_port=0, max_images=2))
    try:
        before = request_counts(gw.http_url)
        images = [pb.Image(data=PNG)] * 3
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            for model in ("shape", "", "nope"):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.InferBatch(pb.InferBatchRequest(model=model, images=images), timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert post_multipart(gw.http_url, "shape", [PNG] * 3).status_code == 413
        assert delta(request_counts(gw.http_url), before) == {
            ("grpc", "InferBatch", "shape", "RESOURCE_EXHAUSTED"): 2,
            ("grpc", "InferBatch", "-", "RESOURCE_EXHAUSTED"): 1,
            ("http", "POST /v1/models/<model>/infer", "shape", "413"): 1,
        }
    finally:
        gw.stop()


def test_images_a_model_failed_on_count_as_image_errors(gateway: Gateway) -> None:
    # The request fails whole as model_error; its images were not counted anywhere.
    before = image_errors(gateway.http_url)
    assert post_octet(gateway.http_url, "failing", PNG).status_code == 500
    answer = post_multipart(gateway.http_url, "failing", [PNG, b"not an image", PNG])
    assert answer.json()["error"]["code"] == "model_error"
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        request = pb.InferBatchRequest(model="failing", images=[pb.Image(data=PNG)])
        with contextlib.suppress(grpc.RpcError):
            pb_grpc.ImageGatewayServiceStub(channel).InferBatch(request, timeout=10)
    counted = image_errors(gateway.http_url) - before
    assert counted == {"model_error": 4, "undecodable_image": 1}


def test_images_refused_in_a_request_that_fails_whole_count_as_image_errors(
    gateway: Gateway,
) -> None:
    # An undecodable image counted when its request succeeded or its model failed, and not
    # when the request was refused for its pixels, its deadline or the load.
    before = image_errors(gateway.http_url)
    heavy = bomb("png", 7000, 7000)  # 49 megapixels: three are past the request's 100
    answer = post_multipart(gateway.http_url, "shape", [heavy, b"not an image", heavy, heavy])
    assert answer.json()["error"]["code"] == "too_many_pixels"
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        request = pb.InferBatchRequest(
            images=[pb.Image(data=d) for d in (heavy, heavy, b"", heavy)]
        )
        with pytest.raises(grpc.RpcError):
            pb_grpc.ImageGatewayServiceStub(channel).InferBatch(request, timeout=10)
    counted = image_errors(gateway.http_url) - before
    assert counted == {"undecodable_image": 1, "empty_image": 1}


def test_a_grpc_message_over_the_limit_is_counted_as_cancelled() -> None:
    # grpc refuses it before the gateway sees it, and gives no sign but the call's end: the
    # gateway, already reading the message, records a call that ended before its message came.
    gw = start(Settings(http_port=0, grpc_port=0, max_request_bytes=100_000))
    try:
        before = request_errors(gw.http_url)
        with grpc.insecure_channel(gw.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
            request = pb.InferRequest(image=pb.Image(data=bytes(200_000)))
            pb_grpc.ImageGatewayServiceStub(channel).Infer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "error-code" not in dict(info.value.trailing_metadata() or ())
        wait_for(
            lambda: request_errors(gw.http_url) - before == Counter({("grpc", "cancelled"): 1}),
            "the call is counted",
        )
    finally:
        gw.stop()


def test_counts_of_replaced_workers_stay_counted_in_one_file(tmp_path: Path) -> None:
    served = launch(tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "2")
    try:
        expected = scripted_calls(served.http_url, served.grpc_target)

        wait_for(lambda: counted_calls(served.http_url) == expected, "every worker's counts")
        decoded = histogram(served.http_url, "gateway_decode_seconds")
        (directory,) = Path(tempfile.gettempdir()).glob(
            f"image-gateway-metrics-{served.proc.pid}-*"
        )
        first = set(spawned(served.proc.pid))
        # One worker killed and replaced, then both replaced by a reload.
        os.kill(min(first), signal.SIGKILL)
        wait_for(lambda: "starting another" in served.log.read_text(), "the death noticed", 30)
        wait_for(lambda: a_replacement_serves(served.log), "its replacement", 30)
        os.kill(served.proc.pid, signal.SIGUSR1)
        wait_for(lambda: "reload done" in served.log.read_text(), "the reload", 60)
        gone = first | set(re.findall(r"replaced worker (\d+) exited", served.log.read_text()))
        assert counted_calls(served.http_url) == expected
        assert replacements(served.http_url) == replaced(exited=1, reload=2)
        assert histogram(served.http_url, "gateway_decode_seconds") == decoded
        names = {p.name for p in directory.glob("*.db")}
        assert "counter_archive.db" in names and "histogram_archive.db" in names
        assert not [name for name in names if name.split("_")[-1][:-3] in map(str, gone)]
    finally:
        served.proc.terminate()
        assert served.proc.wait(timeout=30) == 0


def test_grpc_health_checks_are_counted_as_http_probes_are(
    gateway: Gateway, channel: grpc.Channel
) -> None:
    # Only the checks the gateway refused (overloaded, request_timeout) were counted: the
    # series had the failures and none of the answers, and a check that was not protobuf,
    # answered invalid_request, had no count and no access record.
    before, errors_before = request_counts(gateway.http_url), request_errors(gateway.http_url)
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
    for service in ("nope", "x" * 10_000):
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Which service it does not know, and the error code any other failed call carries.
        assert info.value.details().startswith(f"no health status for service '{service[:100]}'")
        assert ("error-code", "not_found") in info.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert delta(request_counts(gateway.http_url), before) == {
        ("grpc", "Check", "", "OK"): 3,
        ("grpc", "Check", "", "NOT_FOUND"): 2,
        ("grpc", "Check", "", "INVALID_ARGUMENT"): 1,
    }
    assert request_errors(gateway.http_url) - errors_before == {
        ("grpc", "invalid_request"): 1,
        ("grpc", "not_found"): 2,
    }


def test_sampled_shares_of_one_gauge_add_up_and_leave_with_their_server() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("shared", "a gauge two servers sample", registry=registry)
    first, second = SampledShare(gauge), SampledShare(gauge)
    first.set(2)
    second.set(5)
    first.set(3)  # each sample moves the gauge by its own change only
    assert registry.get_sample_value("shared") == 8
    second.clear()
    second.set(7)  # a sweep after its server stopped
    assert registry.get_sample_value("shared") == 3
    first.set(0)
    assert registry.get_sample_value("shared") == 0

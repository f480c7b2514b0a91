"""Faults: clients that vanish or trickle, overload, and shutdown while busy."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway import serve as serve_module
from gateway.config import Settings
from gateway.core.admission import THREAD_QUEUE
from gateway.rest import dispatch as dispatch_module
from gateway.rest import heads as heads_module
from gateway.rest import linger as linger_module
from gateway.rest import watchdog as watchdog_module
from gateway.rest.linger import Lingerer
from gateway.rest.socketfile import (
    KnownLengthBody,
    SocketReader,
    SocketWriter,
    move_timeout_to_kernel,
    peer_closed,
    send_now,
)
from gateway.rest.watchdog import Watchdog
from gateway.rpc import pool as rpc_pool
from gateway.serve import Gateway, start
from tests.conftest import DATA, wait_for
from tests.models import GATE, GATED_BATCHING, SPY
from tests.test_framing import first_answer
from tests.test_metrics import delta, request_counts, request_errors
from tests.test_operability import access_records
from tests.test_process import _metrics, launch, spawned
from tests.wire import (
    grpc_code,
    grpc_result,
    http_host_port,
    post_octet,
    send_and_see_read,
    tcp_queues,
)

PNG_PATH = DATA / "images" / "hopper.png"
PNG = PNG_PATH.read_bytes()


@contextlib.contextmanager
def gated_gateway(**settings: Any) -> Iterator[Gateway]:
    """A gateway serving shape and the gated model (`settings` may change either), with the gate
    shut for the test to open; on the way out the gate opens and the gateway stops."""
    defaults: dict[str, Any] = {
        "http_port": 0,
        "grpc_port": 0,
        "max_concurrency": 8,
        "model": ("shape", "tests.models:gated"),
    }
    gw = start(Settings(**{**defaults, **settings}))
    GATE.clear()
    try:
        yield gw
    finally:
        GATE.set()
        gw.stop()


@contextlib.contextmanager
def only_http_thread_held(gw: Gateway) -> Iterator[None]:
    """While the block runs, the one HTTP thread of a `gated_gateway(http_threads=1)` is held
    by a gated request; after it the gate opens and that request must be answered."""
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_octet, gw.http_url, "gated", PNG)
        try:
            wait_for(lambda: gw.dataplane.admission.active == 1, "the only HTTP thread is held")
            yield
        finally:
            GATE.set()
        assert held.result().status_code == 200


@contextlib.contextmanager
def closing_all() -> Iterator[list[socket.socket]]:
    """A list for the test's sockets, each closed on the way out."""
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


@contextlib.contextmanager
def probe_flood(askers: int) -> Iterator[tuple[Gateway, list[socket.socket]]]:
    """A gateway whose only HTTP thread a gated request holds (so probes go to the probe
    threads), and `askers` connections that each ask for /metrics 600 times and read nothing;
    closed on the way out, when the held request must be answered."""
    with gated_gateway(http_threads=1) as gw:
        with closing_all() as flood, only_http_thread_held(gw):
            flood += [metrics_asker(http_host_port(gw.http_url), 600) for _ in range(askers)]
            yield gw, flood
        still_serving(gw)


def metrics_asker(address: tuple[str, int], times: int) -> socket.socket:
    """A connection with a tiny receive window that has asked for /metrics `times` times."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.connect(address)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * times)
    return s


@contextlib.contextmanager
def grpc_channels(gw: Gateway, count: int) -> Iterator[list[grpc.Channel]]:
    """`count` channels to the gateway, each its own connection, connected before they are
    given (calls made while a channel connects reach the server in any order); closed on the
    way out."""
    channels = [grpc.insecure_channel(gw.grpc_target) for _ in range(count)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        yield channels
    finally:
        for channel in channels:
            channel.close()


@contextlib.contextmanager
def silent_calls(channel: grpc.Channel, method: str, count: int, **kw: Any) -> Iterator[list[Any]]:
    """`count` calls of the unary `method` that send their headers and never their message (a
    request iterator that never yields), as futures; let go of on the way out."""
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait(60)
        yield b""

    call = channel.stream_unary(method)
    try:
        yield [call.future(nothing(), timeout=30, **kw) for _ in range(count)]
    finally:
        never.set()


def raw_post(model: str, body: bytes, content_type: str = "application/octet-stream") -> bytes:
    """An HTTP/1.1 POST of `body` to a model's infer route, as bytes to send on a socket."""
    return (
        f"POST /v1/models/{model}/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def still_serving(gw: Gateway) -> None:
    assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
    with grpc.insecure_channel(gw.grpc_target) as ch:
        reply = pb_grpc.ImageGatewayServiceStub(ch).Infer(
            pb.InferRequest(model="shape", image=pb.Image(data=PNG)), timeout=10
        )
        assert grpc_result(reply.result)["output"] == [128, 128, 3]


def test_client_vanishing_mid_upload(gateway: Gateway) -> None:
    host, port = http_host_port(gateway.http_url)
    for _ in range(20):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 5000000\r\n\r\n"
            )
            s.sendall(PNG[:1000])
    for _ in range(20):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 900000\r\n\r\n"
                b'--zz\r\nContent-Disposition: form-data; name="0"; filename="a"\r\n\r\n'
            )
            s.sendall(PNG)
    still_serving(gateway)


def test_bodies_arriving_in_pieces_are_read_whole(gateway: Gateway) -> None:
    # The body is read from the socket into its buffer a piece (1 MiB) at a time: a body sent in
    # several writes with pauses between, and one of several pieces, both arrive whole.
    noise = np.random.default_rng(1).integers(0, 256, (900, 900, 3), np.uint8)
    ok, big = cv2.imencode(".png", noise, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    assert ok and len(big) > 2 * 1024 * 1024
    for body, expected in ((PNG, [128, 128, 3]), (big.tobytes(), [900, 900, 3])):
        with socket.create_connection(http_host_port(gateway.http_url), timeout=10) as s:
            s.sendall(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/octet-stream\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            third = len(body) // 3
            for piece in (body[:third], body[third : 2 * third], body[2 * third :]):
                s.sendall(piece)
                time.sleep(0.05)  # separate arrivals; not a timing assert
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(payload)["result"]["output"] == expected
    # A client that stops sending halfway gets a clear answer, and the server goes on.
    with socket.create_connection(http_host_port(gateway.http_url), timeout=10) as s:
        s.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {len(PNG)}\r\n\r\n".encode()
            + PNG[: len(PNG) // 2]
        )
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_request"
    still_serving(gateway)


def test_cancelled_stream(gateway: Gateway, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    def two_requests(gate: threading.Event) -> Iterator[pb.InferStreamRequest]:
        yield pb.InferStreamRequest(image=pb.Image(data=PNG))
        gate.wait(5)
        yield pb.InferStreamRequest(image=pb.Image(data=PNG))

    for _ in range(10):
        gate = threading.Event()
        call = stub.InferStream(two_requests(gate), timeout=10)
        first = next(call)
        assert grpc_result(first.result)["output"] == [128, 128, 3]
        call.cancel()
        gate.set()
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    still_serving(gateway)


def refused_streams(http_url: str) -> float:
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
        and sample.labels["method"] == "InferStream"
        and sample.labels["code"] == "UNAVAILABLE"
    )


def test_idle_streams_cannot_take_the_threads_of_unary_calls() -> None:
    gw = start(Settings(http_port=0, grpc_port=0, grpc_threads=2, max_streams=2))
    stop = threading.Event()
    one = pb.InferStreamRequest(image=pb.Image(data=PNG))

    def one_then_silence() -> Iterator[pb.InferStreamRequest]:
        yield one
        stop.wait(30)

    channels = [grpc.insecure_channel(gw.grpc_target) for _ in range(3)]
    try:
        stubs = [pb_grpc.ImageGatewayServiceStub(ch) for ch in channels]
        # Two streams that go silent after one image hold the two stream threads ...
        idle = []
        for stub in stubs[:2]:
            call = stub.InferStream(one_then_silence(), timeout=30)
            assert grpc_result(next(call).result)["output"] == [128, 128, 3]
            idle.append(call)
        # ... so a third is refused at once, with the table's code, and counted ...
        refused_before = refused_streams(gw.http_url)
        with pytest.raises(grpc.RpcError) as info:
            list(stubs[2].InferStream(iter([one]), timeout=5))
        assert grpc_code(info.value) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
        assert refused_streams(gw.http_url) == refused_before + 1
        # ... and unary calls still have their threads.
        for _ in range(4):
            reply = stubs[2].Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=5)
            assert grpc_result(reply.result)["output"] == [128, 128, 3]
        stop.set()
        for call in idle:
            assert list(call) == []
        # Once they end, streams are taken again.
        replies = list(stubs[2].InferStream(iter([one]), timeout=5))
        assert grpc_result(replies[0].result)["output"] == [128, 128, 3]
    finally:
        stop.set()
        for ch in channels:
            ch.close()
        gw.stop()


def test_health_checks_and_streams_keep_their_threads_while_unary_calls_hold_theirs() -> None:
    # One pool of grpc_threads + max_streams (here 4) ran every call: four slow unary calls held
    # it all, and a health check or a new stream waited behind them.
    with gated_gateway(grpc_threads=2, max_streams=2) as gw, grpc_channels(gw, 1) as (channel,):
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        gated = pb.InferRequest(model="gated", image=pb.Image(data=PNG))
        held = [stub.Infer.future(gated, timeout=30) for _ in range(4)]
        admission = gw.dataplane.admission
        wait_for(lambda: admission.active == 2, "two gated calls hold the unary threads")
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        one = pb.InferStreamRequest(image=pb.Image(data=PNG))
        replies = list(stub.InferStream(iter([one]), timeout=5))
        assert grpc_result(replies[0].result)["output"] == [128, 128, 3]
        # Unary calls get --grpc-threads, no more: the other two wait for a thread.
        assert admission.active == 2 and not any(f.done() for f in held)
        GATE.set()
        for future in held:
            assert grpc_result(future.result().result)["output"] == [128, 128, 3]


def test_grpc_calls_past_the_thread_queue_are_refused_overloaded() -> None:
    # grpcio queued unary calls waiting for a thread without bound: under overload they waited
    # until their deadline instead of being refused at once, as HTTP refuses connections past
    # the same number.
    with gated_gateway(grpc_threads=1) as gw, grpc_channels(gw, 4) as channels:
        before = request_counts(gw.http_url)
        stubs = [pb_grpc.ImageGatewayServiceStub(ch) for ch in channels]
        held = stubs[0].Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=60
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the only gRPC thread is held")
        plain = pb.InferRequest(image=pb.Image(data=PNG))
        calls = [
            stubs[i % 4].Infer.future(plain, timeout=60, metadata=(("x-request-id", f"c-{i}"),))
            for i in range(THREAD_QUEUE + 3)
        ]
        wait_for(lambda: sum(f.done() for f in calls) == 3, "the calls past the queue end")
        wait_for(
            lambda: waiting_for_thread(gw.http_url, "grpc") == THREAD_QUEUE,
            "the metrics show the calls waiting",
        )
        for future in calls:
            if future.done():
                error = future.exception()
                assert isinstance(error, grpc.RpcError)
                assert grpc_code(error) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
                assert "retry later" in error.details()
                assert dict(error.trailing_metadata())["x-request-id"] == f"c-{calls.index(future)}"
        check = health_pb2_grpc.HealthStub(channels[1]).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        GATE.set()
        assert grpc_result(held.result().result)["output"] == [128, 128, 3]
        served = [f.result() for f in calls if f.exception() is None]
        assert len(served) == THREAD_QUEUE
        counted = delta(request_counts(gw.http_url), before)
        assert counted[("grpc", "Infer", "", "UNAVAILABLE")] == 3
        assert counted[("grpc", "Infer", "shape", "OK")] == THREAD_QUEUE
        still_serving(gw)


def test_grpc_calls_that_end_while_they_wait_for_a_thread_are_recorded() -> None:
    # grpcio ends a call whose client's deadline passes or who cancels it while it waits for a
    # thread; no handler ran, so it was neither logged nor counted (HTTP counts such a client
    # as 499).
    with gated_gateway(grpc_threads=1) as gw, grpc_channels(gw, 1) as (channel,):
        before = request_counts(gw.http_url)
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        held = stub.Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=30
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the only gRPC thread is held")
        plain = pb.InferRequest(image=pb.Image(data=PNG))
        late = stub.Infer.future(plain, timeout=0.5)
        left = stub.Infer.future(plain, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            late.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        left.cancel()
        route = ("grpc", "Infer", "")
        # Recorded while it waits, not once a thread comes to it.
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[(*route, "CANCELLED")] == 1,
            "the cancelled call is recorded",
        )
        GATE.set()
        assert grpc_result(held.result().result)["output"] == [128, 128, 3]
        counted = delta(request_counts(gw.http_url), before)
        assert counted[(*route, "DEADLINE_EXCEEDED")] == 1
        still_serving(gw)


def test_the_wait_for_a_thread_counts_in_the_request_timeout() -> None:
    # The deadline, the recorded duration and the client check counted from when a thread took
    # the request up: behind one slow request, another waited past --request-timeout in
    # cheroot's or grpcio's queue and was then served in full, its wait recorded nowhere.
    with (
        gated_gateway(http_threads=1, grpc_threads=1, request_timeout=1.0) as gw,
        grpc_channels(gw, 1) as (channel,),
    ):
        admission = gw.dataplane.admission
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with ThreadPoolExecutor(2) as pool:
            held_http = pool.submit(post_octet, gw.http_url, "gated", PNG)
            held_grpc = stub.Infer.future(
                pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=30
            )
            wait_for(lambda: admission.active == 2, "the gated requests hold both threads")
            queued_http = pool.submit(post_octet, gw.http_url, "shape", PNG)
            queued_grpc = stub.Infer.future(pb.InferRequest(image=pb.Image(data=PNG)), timeout=30)
            # Each has arrived: it waits for a thread, or is answered already (at its deadline,
            # on a machine slow enough that the wait below starts late).
            wait_for(
                lambda: waiting_for_thread(gw.http_url, "http") == 1 or queued_http.done(),
                "the HTTP request waits for a thread",
            )
            wait_for(
                lambda: waiting_for_thread(gw.http_url, "grpc") == 1 or queued_grpc.done(),
                "the gRPC call waits for a thread",
            )
            time.sleep(1.5)  # past the request timeout, while they wait for a thread
            GATE.set()
            assert held_http.result().status_code == 504
            response = queued_http.result()
            assert (response.status_code, response.json()["error"]["code"]) == (
                504,
                "deadline_exceeded",
            )
            with pytest.raises(grpc.RpcError) as info:
                queued_grpc.result()
            assert grpc_code(info.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded")
            with pytest.raises(grpc.RpcError):
                held_grpc.result()


@pytest.mark.parametrize("draining", [False, True], ids=["deadline", "draining"])
def test_requests_waiting_for_a_thread_are_answered_at_their_deadline_or_drain(
    draining: bool,
) -> None:
    # They were answered only once a thread came free: past their deadline (clients without a
    # timeout of their own waited on), or at a shutdown past the grace, as a reset.
    with (
        gated_gateway(
            http_threads=1, grpc_threads=1, request_timeout=1.0 if not draining else 30.0
        ) as gw,
        grpc_channels(gw, 1) as (channel,),
    ):
        errors_before = request_errors(gw.http_url)
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        with ThreadPoolExecutor(2) as pool:
            held_http = pool.submit(post_octet, gw.http_url, "gated", PNG)
            held_grpc = stub.Infer.future(
                pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=60
            )
            wait_for(lambda: gw.dataplane.admission.active == 2, "the gated requests hold both")
            waiting = socket.create_connection(http_host_port(gw.http_url), timeout=10)
            waiting.sendall(raw_post("shape", PNG))
            waiting_grpc = stub.Infer.future(pb.InferRequest(image=pb.Image(data=PNG)))
            if draining:
                gw.dataplane.admission.drain()
            expected = ("shutting_down", 503) if draining else ("deadline_exceeded", 504)
            head, _, body = _until_closed(waiting).partition(b"\r\n\r\n")
            waiting.close()
            assert head.startswith(f"HTTP/1.1 {expected[1]} ".encode()), head
            assert json.loads(body)["error"]["code"] == expected[0]
            with pytest.raises(grpc.RpcError) as info:
                waiting_grpc.result(timeout=10)
            status = grpc.StatusCode.UNAVAILABLE if draining else grpc.StatusCode.DEADLINE_EXCEEDED
            assert grpc_code(info.value) == (status, expected[0])
            # Answered while the threads were still held.
            assert not held_http.done() and not held_grpc.done()
            # Counted by their code, which the status (503, UNAVAILABLE) alone does not tell. A
            # call answered without a handler is recorded just after its answer is sent.
            counted = {("http", expected[0]): 1, ("grpc", expected[0]): 1}
            wait_for(
                lambda: request_errors(gw.http_url) - errors_before == counted,
                "each is counted by its code",
            )
            GATE.set()
            held_http.result()
            with contextlib.suppress(grpc.RpcError):  # past its deadline by now, or served
                held_grpc.result()
        if not draining:
            still_serving(gw)


class _TakenAsTheSweepLooks:
    """A connection waiting for a thread that a thread takes while the sweep looks at it: its
    arrival time is cleared (as a thread's request does, reading it) once its socket is read."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self.queued_at: float | None = time.monotonic()

    @property
    def socket(self) -> socket.socket:
        self.queued_at = None
        return self._socket


def test_a_connection_taken_by_a_thread_while_the_sweep_looks_is_no_error() -> None:
    # The sweep of connections waiting for a thread read each one's arrival time twice, once
    # under the queue's lock and once outside it: a thread that took the connection in between
    # had cleared it, and the sweep failed on None (a traceback in the log, and no sweep that
    # turn), some times a minute under a load of new connections.
    with gated_gateway(http_threads=1) as gw, only_http_thread_held(gw):
        client, server_side = socket.socketpair()
        waiting = gw.http.requests._queue
        taken = _TakenAsTheSweepLooks(server_side)
        with waiting.mutex:
            waiting.queue.append(taken)
        try:
            gw.http._sweep_waiting()
        finally:
            with waiting.mutex:
                waiting.queue.remove(taken)
            client.close()
            server_side.close()


def test_clients_that_left_while_waiting_for_a_thread_give_their_places_up() -> None:
    # Their requests kept their places in the 256 until a thread or the deadline came: live
    # clients behind them were refused overloaded, and the leavers were answered and counted.
    with gated_gateway(http_threads=1, grpc_threads=1) as gw, grpc_channels(gw, 4) as channels:
        address = http_host_port(gw.http_url)
        stubs = [pb_grpc.ImageGatewayServiceStub(ch) for ch in channels]
        with ThreadPoolExecutor(1) as pool:
            held_http = pool.submit(post_octet, gw.http_url, "gated", PNG)
            held_grpc = stubs[0].Infer.future(
                pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=60
            )
            wait_for(lambda: gw.dataplane.admission.active == 2, "the gated requests hold both")
            before = request_errors(gw.http_url)
            leavers = []
            for _ in range(THREAD_QUEUE):
                s = socket.create_connection(address, timeout=10)
                s.sendall(raw_post("shape", PNG))
                leavers.append(s)
            plain = pb.InferRequest(image=pb.Image(data=PNG))
            calls = [stubs[i % 4].Infer.future(plain, timeout=1) for i in range(THREAD_QUEUE)]
            wait_for(
                lambda: waiting_for_thread(gw.http_url, "http") == THREAD_QUEUE,
                "the HTTP leavers wait",
            )
            for s in leavers:
                s.close()
            for call in calls:
                with pytest.raises(grpc.RpcError):
                    call.result()  # past the client's own deadline
            # Their places given up, each counted as a client that left, not answered
            # overloaded or deadline_exceeded by the server.
            gone = {
                ("http", "cancelled"): THREAD_QUEUE,
                ("grpc", "deadline_exceeded"): THREAD_QUEUE,
            }
            wait_for(
                lambda: request_errors(gw.http_url) - before == gone,
                "the places are given up",
            )
            # Live clients get the places.
            live_http = pool.submit(post_octet, gw.http_url, "shape", PNG)
            live_grpc = stubs[1].Infer.future(plain, timeout=60)
            wait_for(
                lambda: waiting_for_thread(gw.http_url, "grpc") == 1,
                "the live call waits for a thread",
            )
            GATE.set()
            assert live_http.result().json()["result"]["output"] == [128, 128, 3]
            assert grpc_result(live_grpc.result().result)["output"] == [128, 128, 3]
            held_http.result()
            held_grpc.result()
        still_serving(gw)


def test_a_request_whose_client_left_while_it_waited_for_a_thread_is_not_computed() -> None:
    # Its time counted from when a thread took it up, so the first check of its client came too
    # late: a small image reached the model for nobody, and a retry storm did the work twice.
    with gated_gateway(
        http_threads=1, model=("shape", "tests.models:gated", "tests.models:spy")
    ) as gw:
        SPY.calls.clear()
        before = request_counts(gw.http_url)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(post_octet, gw.http_url, "gated", PNG)
            wait_for(lambda: gw.dataplane.admission.active == 1, "the only HTTP thread is held")
            with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
                s.sendall(raw_post("spy", PNG))
                # Queued for the thread, then its client leaves. The request must be older than
                # CLIENT_CHECK_AFTER (10 ms) when a thread takes it, or its client is not asked:
                # counted from its arrival, not from when the test sent it.
                wait_for(lambda: gw.http.requests.qsize == 1, "the request waits for the thread")
                time.sleep(0.2)
            GATE.set()
            assert held.result().status_code == 200
        route = ("http", "POST /v1/models/<model>/infer", "spy")
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[(*route, "499")] == 1,
            "the request is counted as cancelled",
        )
        assert SPY.calls == []


@pytest.fixture(scope="module")
def strict_gateway() -> Iterator[Gateway]:
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("shape", "tests.models:slow"),
            request_timeout=1.0,
            max_concurrency=1,
            max_queue=0,
            # One 128x128 image takes the whole pixel budget.
            max_request_pixels=128 * 128,
            shutdown_grace=2.0,
        )
    )
    yield gw
    gw.stop()


def test_trickling_client_is_cut_off_with_an_answer(strict_gateway: Gateway) -> None:
    host, port = http_host_port(strict_gateway.http_url)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
        )
        # One byte every 0.1 s would take hours; the gateway must end it within a few seconds,
        # with an answer (shutting the socket both ways had cut the answer off too). The client
        # goes on sending until the answer comes: what it sent meanwhile must not reset it.
        answer = b""
        s.settimeout(0.1)
        for i in range(200):
            s.sendall(PNG[i : i + 1])
            with contextlib.suppress(TimeoutError):
                answer = s.recv(65536)
                break
        assert answer, "no answer: the connection ended without one, or lasted 20 s"
        s.settimeout(10)
        answer += _until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    still_serving(strict_gateway)


def test_a_client_trickling_its_headers_is_cut_off_with_an_answer(strict_gateway: Gateway) -> None:
    # cheroot's read timeout applies to each read: a header byte every few seconds held a thread
    # for ever, and ten such clients stopped every request of a worker.
    with socket.create_connection(http_host_port(strict_gateway.http_url), timeout=10) as s:
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        answer = b""
        s.settimeout(0.1)
        for _ in range(200):
            s.sendall(b"a")
            with contextlib.suppress(TimeoutError):
                answer = s.recv(65536)
                break
        assert answer, "no answer while the client went on sending its headers for 20 s"
        s.settimeout(10)
        answer += _until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert error["message"] == "the request line and headers did not arrive within 1 s"
    still_serving(strict_gateway)


def test_a_head_watch_that_expires_as_the_head_completes_leaves_the_body_alone() -> None:
    # The watchdog took an expired head watch, and by the time it looked, the head had come and
    # the body was arriving: it cut the body, at the head's 10 s instead of the body's limit.
    # The request is cheroot's in all it reads; the socket pair stands for the client.
    client, server_side = socket.socketpair()
    watchdog = Watchdog(2.0)
    try:
        reader = SocketReader(server_side)
        req = types.SimpleNamespace(
            conn=types.SimpleNamespace(rfile=reader, socket=server_side),
            rfile=KnownLengthBody(reader, 1000),  # the body, 1000 bytes still to come
            reading_head=False,  # the head has just come in
            head_cut=False,
        )
        watchdog.watch(req, 0.01, head=True)
        time.sleep(3 * watchdog.interval)  # past several ticks; not a timing assert
        assert not reader.was_cut and not req.head_cut
        # The same request's body watch does cut it, and a head still arriving is cut as one.
        watchdog.watch(req, 0.01)
        wait_for(lambda: reader.was_cut, "the body's watch cut the body")
        assert not req.head_cut
        head_reader = SocketReader(server_side)
        req.conn.rfile, req.reading_head = head_reader, True
        watchdog.watch(req, 0.01, head=True)
        wait_for(lambda: head_reader.was_cut, "a head still arriving was cut")
        assert req.head_cut
    finally:
        watchdog.stop()
        client.close()
        server_side.close()


def test_overload_answers_503_and_unavailable() -> None:
    # One slot, no queue: the gated call holds the slot until the test opens the gate.
    with (
        gated_gateway(max_concurrency=1, max_queue=0, max_request_pixels=128 * 128) as gw,
        grpc_channels(gw, 1) as (channel,),
    ):
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        busy = stub.Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=30
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the gated call takes the only slot")
        resp = post_octet(gw.http_url, "shape", PNG)
        assert (resp.status_code, resp.json()["error"]["code"]) == (503, "overloaded")
        assert resp.headers["Retry-After"] == "1"
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(model="shape", image=pb.Image(data=PNG)), timeout=10)
        assert grpc_code(info.value) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
        GATE.set()
        assert grpc_result(busy.result().result)["output"] == [128, 128, 3]
        still_serving(gw)


def test_small_requests_share_the_pixel_budget() -> None:
    # Budget: one request of 4 x 128x128 pixels. A gated 128x128 request holds a quarter of it
    # until the test opens the gate.
    with (
        gated_gateway(max_concurrency=1, max_queue=0, max_request_pixels=4 * 128 * 128) as gw,
        grpc_channels(gw, 1) as (channel,),
    ):
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        busy = stub.Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=30
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the gated call holds its pixels")
        # A second small request fits beside it ...
        resp = post_octet(gw.http_url, "shape", PNG)
        assert resp.status_code == 200, resp.text
        # ... a request for the whole budget does not, and there is no queue.
        batch = pb.InferBatchRequest(model="shape", images=[pb.Image(data=PNG)] * 4)
        with pytest.raises(grpc.RpcError) as info:
            stub.InferBatch(batch, timeout=10)
        assert grpc_code(info.value) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
        GATE.set()
        assert grpc_result(busy.result().result)["output"] == [128, 128, 3]
        # Once the gated one is done, the whole budget is free again.
        assert len(stub.InferBatch(batch, timeout=10).results) == 4


def test_request_timeout_gives_504(strict_gateway: Gateway) -> None:
    # The slow model is still running when the 1 s budget ends; the gateway answers as soon as
    # it notices (before the model's output is used) rather than holding the client.
    resp = post_octet(strict_gateway.http_url, "slow", PNG, params={"seconds": "1.5"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (504, "deadline_exceeded")
    still_serving(strict_gateway)


def test_requests_of_clients_that_left_are_dropped_unrun() -> None:
    # One slot, held by the gated model until the test opens the gate; requests behind it queue.
    with gated_gateway(
        model=("shape", "tests.models:gated", "tests.models:spy"),
        max_concurrency=1,
        max_queue=4,
        max_request_pixels=128 * 128,
    ) as gw:
        admission = gw.dataplane.admission
        SPY.calls.clear()
        before = request_counts(gw.http_url)
        with grpc.insecure_channel(gw.grpc_target) as ch:
            stub = pb_grpc.ImageGatewayServiceStub(ch)
            busy = stub.Infer.future(pb.InferRequest(model="gated", image=pb.Image(data=PNG)))
            wait_for(lambda: admission.active == 1, "the gated call holds the slot")
            # An HTTP client sends its whole request, then closes its connection while it waits:
            # the request leaves the queue though the slot is still taken.
            with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
                s.sendall(raw_post("spy", PNG))
                wait_for(lambda: admission.waiting == 1, "the HTTP request waits")
            wait_for(lambda: admission.waiting == 0, "the HTTP request leaves the queue")
            # So does a gRPC call cancelled by its client while it waits.
            spy_call = pb.InferRequest(model="spy", image=pb.Image(data=PNG))
            cancelled = stub.Infer.future(spy_call, timeout=30)
            wait_for(lambda: admission.waiting == 1, "the gRPC call waits")
            assert cancelled.cancel()
            wait_for(lambda: admission.waiting == 0, "the gRPC call leaves the queue")
            # Clients that stay are answered, on both protocols.
            kept = stub.Infer.future(spy_call, timeout=30)
            wait_for(lambda: admission.waiting == 1, "a gRPC call waits")
            with ThreadPoolExecutor(1) as pool:
                kept_http = pool.submit(post_octet, gw.http_url, "spy", PNG)
                wait_for(lambda: admission.waiting == 2, "an HTTP request waits")
                GATE.set()
                assert kept_http.result().status_code == 200
            assert grpc_result(busy.result().result)["output"] == [128, 128, 3]
            assert "checksum" in grpc_result(kept.result().result)["output"]
        wait_for(lambda: admission.active == admission.waiting == 0, "the gateway is idle")
        # The spy model ran for the two clients that stayed: the two that left cost no decode
        # and no model call, and were counted as cancelled.
        assert [call["batch"] for call in SPY.calls] == [1, 1]
        counts = delta(request_counts(gw.http_url), before)
        assert counts["http", "POST /v1/models/<model>/infer", "spy", "499"] == 1
        assert counts["grpc", "Infer", "spy", "CANCELLED"] == 1
        assert counts["grpc", "Infer", "spy", "OK"] == 1
        assert counts["http", "POST /v1/models/<model>/infer", "spy", "200"] == 1
        still_serving(gw)


def test_batched_requests_given_up_on_are_left_out_of_the_next_batch() -> None:
    # The batched model's first call holds the batcher until the test opens the gate; the
    # requests behind it wait in the batcher's queue, where one's deadline passes and another's
    # client leaves. Neither is computed once the batcher is free: only the request whose client
    # still waits is.
    with gated_gateway(model=("shape", "tests.models:gated_batching")) as gw:
        model = "gated-batching"
        batcher = gw.dataplane.batchers[model]
        GATED_BATCHING.tags.clear()

        def grpc_call(tag: str) -> pb.InferRequest:
            call = pb.InferRequest(model=model, image=pb.Image(data=PNG))
            call.parameters.update({"tag": tag})
            return call

        before = request_counts(gw.http_url)
        with grpc.insecure_channel(gw.grpc_target) as ch, ThreadPoolExecutor(1) as pool:
            stub = pb_grpc.ImageGatewayServiceStub(ch)
            first = stub.Infer.future(grpc_call("first"), timeout=30)
            wait_for(lambda: GATED_BATCHING.tags == ["first"], "the first call holds the batcher")
            late = stub.Infer.future(grpc_call("late"), timeout=0.5)
            wait_for(lambda: batcher.waiting == 1, "the call with a short deadline waits")
            assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # It leaves the queue as its wait ends, its images with it.
            wait_for(lambda: batcher.waiting == 0, "the call given up on leaves the queue")
            with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
                s.sendall(
                    f"POST /v1/models/{model}/infer?tag=left HTTP/1.1\r\nHost: x\r\n".encode()
                    + b"Content-Type: application/octet-stream\r\n"
                    + f"Content-Length: {len(PNG)}\r\n\r\n".encode()
                    + PNG
                )
                wait_for(lambda: batcher.waiting == 1, "the HTTP request waits")
            kept = pool.submit(post_octet, gw.http_url, model, PNG, params={"tag": "kept"})
            wait_for(lambda: batcher.waiting == 2, "the request that stays waits")
            GATE.set()
            assert kept.result().json()["result"]["output"] == [128, 128, 3]
            assert grpc_result(first.result().result)["output"] == [128, 128, 3]
        assert GATED_BATCHING.tags == ["first", "kept"]
        assert batcher.waiting == 0
        route = ("http", "POST /v1/models/<model>/infer", model)
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[(*route, "499")] == 1,
            "the request of the client that left is counted as cancelled",
        )
        counts = delta(request_counts(gw.http_url), before)
        assert counts[(*route, "200")] == 1
        assert counts["grpc", "Infer", model, "OK"] == 1
        assert counts["grpc", "Infer", model, "DEADLINE_EXCEEDED"] == 1
        still_serving(gw)


def test_a_request_stops_decoding_once_its_client_has_left() -> None:
    # 32 photos of 4000x3000 take the decoder most of a second; the client sends them all and
    # closes its connection at once. The gateway notices between two images and never runs
    # the model.
    photo = cv2.imdecode(np.frombuffer((DATA / "images" / "rocket.jpg").read_bytes(), np.uint8), 1)
    assert photo is not None
    ok, jpeg = cv2.imencode(".jpg", cv2.resize(photo, (4000, 3000)))
    assert ok
    count, boundary = 32, "zz"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{i}"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + jpeg.tobytes()
            + b"\r\n"
            for i in range(count)
        )
        + f"--{boundary}--\r\n".encode()
    )
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            model=("shape", "tests.models:spy"),
            max_request_pixels=count * 4000 * 3000,
        )
    )
    SPY.calls.clear()
    try:
        before = request_counts(gw.http_url)
        with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
            s.sendall(raw_post("spy", body, f"multipart/form-data; boundary={boundary}"))
        route = ("http", "POST /v1/models/<model>/infer", "spy")
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[(*route, "499")] == 1,
            "the request is counted as cancelled",
        )
        assert SPY.calls == []
        still_serving(gw)
    finally:
        gw.stop()


def test_a_client_that_half_closes_reads_why_and_nothing_after(gateway: Gateway) -> None:
    # A client that ends its sending side counts as gone: its request is dropped as cancelled
    # (499), at the latest when the model returns. A client that only half-closed reads that
    # answer; the request it pipelined behind was then answered too, on a connection the
    # server had judged gone. Now the connection ends after the 499.
    head = (
        b"POST /v1/models/slow/infer?seconds=0.3 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(PNG)
    )
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    before = request_counts(gateway.http_url)
    with socket.create_connection(http_host_port(gateway.http_url), timeout=10) as s:
        s.sendall(head + PNG + pipelined)
        s.shutdown(socket.SHUT_WR)
        answer = _until_closed(s)
    assert answer.startswith(b"HTTP/1.1 499 Client Closed Request\r\n"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close\r\n" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "cancelled"
    route = ("http", "POST /v1/models/<model>/infer", "slow")
    wait_for(
        lambda: delta(request_counts(gateway.http_url), before) == Counter({(*route, "499"): 1}),
        "the request is counted as cancelled, and nothing else",
    )
    still_serving(gateway)


def test_peer_closed_tells_a_client_that_left_from_one_that_pipelines() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        served, _ = listener.accept()
        served.settimeout(10)  # as cheroot's sockets: a recv would first wait for bytes
        with served:
            assert not peer_closed(served)
            client.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not peer_closed(served), "a pipelined request is no departure"
            client.shutdown(socket.SHUT_WR)
            assert peer_closed(served)
            client.close()
            assert peer_closed(served)
        assert peer_closed(served), "a socket the server closed itself"


def _until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _json_error(gw: Gateway, request: bytes) -> tuple[int, str]:
    """Send raw bytes; the answer must be a JSON error that ends the connection."""
    with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(request)  # the server may answer and close before it has read it all
        answer = _until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    error = json.loads(body)["error"]
    assert headers["Content-Type"] == "application/json", answer[:300]
    assert headers["Connection"] == "close"
    assert headers["X-Request-ID"] == error["request_id"]
    assert error["message"]
    return int(lines[0].split()[1]), error["code"]


def test_requests_that_stop_arriving_get_408_and_the_connection_ends() -> None:
    gw = start(Settings(http_port=0, grpc_port=0, shutdown_grace=2.0))
    # cheroot's read timeout (10 s as served), for the connections accepted from here on.
    gw.http.timeout = 0.5
    head = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
    multipart = b"multipart/form-data; boundary=zz"
    try:
        # Headers without the blank line that ends them: cheroot answers, before the app runs.
        assert _json_error(gw, head) == (408, "request_timeout")
        for ctype, sent in (
            (b"application/octet-stream", PNG[:1000]),
            (multipart, b'--zz\r\nContent-Disposition: form-data; name="0"; filename="a"\r\n\r\n'),
        ):
            # A body of 50000 bytes, of which only the first few come.
            request = head + b"Content-Type: " + ctype + b"\r\nContent-Length: 50000\r\n\r\n" + sent
            assert _json_error(gw, request) == (408, "request_timeout")
        still_serving(gw)
    finally:
        gw.stop()


def test_malformed_and_oversized_request_heads_get_json_errors(gateway: Gateway) -> None:
    before = request_counts(gateway.http_url)
    host = b"Host: x\r\n"
    too_large = (431, "headers_too_large")
    cases = [
        (b"GET /v1/models HTTP/1.1 extra\r\n" + host + b"\r\n", (400, "invalid_request")),
        (b"GET /v1/models HTTP/9.9\r\n" + host + b"\r\n", (505, "unsupported_http_version")),
        (b"POST / HTTP/1.1\r\n" + host + b"Content-Length: x\r\n\r\n", (400, "invalid_request")),
        # A request line, or one header line, that never ends: refused at 64 KiB, not buffered.
        (b"GET /" + b"a" * 200_000, too_large),
        (b"GET / HTTP/1.1\r\n" + host + b"X-Long: " + b"a" * 200_000, too_large),
        (b"GET / HTTP/1.1\r\n" + host + b"X-A: b\r\n" * 10_000 + b"\r\n", too_large),
    ]
    for request, expected in cases:
        assert _json_error(gateway, request) == expected, request[:60]
    # Counted under one method label, whatever the client sent as its method.
    counted = delta(request_counts(gateway.http_url), before)
    assert counted[("http", "-", "", "400")] == 2
    assert counted[("http", "-", "", "505")] == 1
    assert counted[("http", "-", "", "431")] == 3
    still_serving(gateway)


def test_connections_past_the_accepted_queue_get_503_overloaded() -> None:
    with gated_gateway(http_threads=1) as gw:
        address = http_host_port(gw.http_url)
        waiting: list[socket.socket] = []
        try:
            # The only HTTP thread is held by the gated model ...
            busy = socket.create_connection(address, timeout=30)
            busy.sendall(
                b"POST /v1/models/gated/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/octet-stream\r\n"
                + f"Content-Length: {len(PNG)}\r\n\r\n".encode()
                + PNG
            )
            wait_for(lambda: gw.dataplane.admission.active == 1, "the gated request runs")
            # ... while more connections send a request than may wait for a thread.
            extra = 6
            overloaded = ("http", "-", "", "503")
            at_start = request_counts(gw.http_url)
            waiting = [
                socket.create_connection(address, timeout=30) for _ in range(THREAD_QUEUE + extra)
            ]
            for i, s in enumerate(waiting):
                s.sendall(
                    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    + f"X-Request-ID: waiting-{i}\r\n\r\n".encode()
                )
            # cheroot's selector waited up to 1 s for a place for each of them in turn, accepting
            # nothing else meanwhile: a probe then waited too.
            assert requests.get(gw.http_url + "/healthz", timeout=3).status_code == 200
            refused: list[socket.socket] = []
            with selectors.DefaultSelector() as selector:
                for s in waiting:
                    selector.register(s, selectors.EVENT_READ, s)
                # Answered while the thread is still held: the connections the queue had no
                # room for.
                give_up = time.monotonic() + 30
                while len(refused) < extra and time.monotonic() < give_up:
                    for key, _ in selector.select(timeout=1):
                        selector.unregister(key.fileobj)
                        refused.append(key.data)
            assert len(refused) == extra
            # A refusal is counted once its answer is sent, so a loaded machine may show its
            # answer here before its count.
            wait_for(
                lambda: delta(request_counts(gw.http_url), at_start)[overloaded] == extra,
                "the refusals are counted",
            )
            # Clients that leave before sending anything, with the queue full: closed, not answered
            # 503 and counted for nobody.
            before = request_counts(gw.http_url)
            for _ in range(5):
                socket.create_connection(address, timeout=5).close()
            time.sleep(0.5)
            assert delta(request_counts(gw.http_url), before)[overloaded] == 0
            # A client need not read at once: a reset sent after the answer would destroy it by
            # then.
            time.sleep(0.5)
            for s in refused:
                head, _, body = _until_closed(s).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503"), head
                assert b"\r\nRetry-After: 1\r\n" in head
                assert json.loads(body)["error"]["code"] == "overloaded"
                # The request was not read, but the id its client chose comes back (it had a
                # fresh one).
                sent_id = f"waiting-{waiting.index(s)}"
                assert json.loads(body)["error"]["request_id"] == sent_id
                assert f"\r\nX-Request-ID: {sent_id}\r\n".encode() in head
            GATE.set()
            assert _until_closed(busy).startswith(b"HTTP/1.1 200")
            # The queued connections are served once the thread is free.
            for s in waiting:
                if s not in refused:
                    assert _until_closed(s).startswith(b"HTTP/1.1 200")
            busy.close()
            still_serving(gw)
        finally:
            for s in waiting:
                s.close()


def test_connections_that_send_nothing_hold_no_http_thread() -> None:
    # cheroot hands a connection to a thread as soon as it is accepted: while a thread was idle,
    # a client that connected and sent nothing held it until its head timed out (10 s), so as
    # many silent connections as threads stopped every HTTP request of the worker.
    with gated_gateway(http_threads=2) as gw, closing_all() as silent:
        address = http_host_port(gw.http_url)
        silent += [socket.create_connection(address, timeout=10) for _ in range(4)]
        wait_for(lambda: gw.http.dispatcher.parked == 4, "all four wait in the selector")
        assert gw.http.requests.idle == 2
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        # One that speaks at last is served like any other.
        silent[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _until_closed(silent[0]).startswith(b"HTTP/1.1 200")
        wait_for(lambda: gw.http.dispatcher.parked == 3, "the others still wait")


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def test_past_the_parked_connections_the_longest_silent_one_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With PARKED_MAX connections parked, a new one whose request had not come when it was
    # accepted was refused 503: for as long as a flood of silent connections lasted, real
    # clients and /healthz probes were refused, as the race between accept and request went.
    monkeypatch.setattr(dispatch_module, "PARKED_MAX", 4)
    with gated_gateway() as gw, closing_all() as silent:
        address = http_host_port(gw.http_url)
        silent += [socket.create_connection(address, timeout=10) for _ in range(4)]
        wait_for(lambda: gw.http.dispatcher.parked == 4, "all four wait in the selector")
        fresh = socket.create_connection(address, timeout=10)
        silent.append(fresh)
        # Accepted before its request comes: something gives.
        wait_for(lambda: _readable(fresh) or _readable(silent[0]), "the fifth is accepted")
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _until_closed(fresh).startswith(b"HTTP/1.1 200")
        # The one that had waited longest was ended, without an answer; the others wait on.
        assert _until_closed(silent[0]) == b""
        assert not any(_readable(s) for s in silent[1:4])
        wait_for(lambda: gw.http.dispatcher.parked == 3, "the other three still wait")


def _octet_head(model: str, length: int, *extra: bytes) -> bytes:
    return (
        f"POST /v1/models/{model}/infer HTTP/1.1\r\nHost: x\r\n".encode()
        + b"".join(extra)
        + f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
    )


def _shape_answer(sock: socket.socket) -> tuple[bytes, Any]:
    head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


def test_clients_that_send_part_of_their_head_hold_no_http_thread() -> None:
    # A thread that took a connection whose head had begun to come waited for the rest, up to
    # 10 s: a byte of a request line from as many clients as threads (slowloris) stopped every
    # HTTP request of the worker for as long as they went on.
    with gated_gateway(http_threads=2) as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        head = _octet_head("shape", len(PNG), b"Connection: close\r\n")
        for cut in (1, 20, len(head) - 2, len(head) - 1):
            slow.append(socket.create_connection(address, timeout=10))
            slow[-1].sendall(head[:cut])
        wait_for(lambda: gw.http.dispatcher.parked == 4, "all four wait in the selector")
        assert gw.http.requests.idle == 2
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        # The rest comes, in pieces: each served as if it had come whole.
        for sock, cut in zip(slow, (1, 20, len(head) - 2, len(head) - 1), strict=True):
            send_and_see_read(sock, head[cut:-1])
            sock.sendall(head[-1:] + PNG)
            status, answer = _shape_answer(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            assert answer["result"]["output"] == [128, 128, 3]
        assert gw.http.dispatcher.parked == 0


def test_a_kept_connection_whose_next_head_comes_in_part_holds_no_http_thread() -> None:
    # The thread that answered a request waits a moment for the client's next one (LINGER_MS),
    # and read any that began to come, whole or not; a pipelined request begun in the reader's
    # buffer went to a thread too.
    probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with gated_gateway(http_threads=2) as gw, closing_all() as kept:
        address = http_host_port(gw.http_url)
        kept += [socket.create_connection(address, timeout=10) for _ in range(2)]
        # One sends its next request's start after the answer, one pipelines it.
        kept[0].sendall(probe)
        assert first_answer(kept[0])[0] == 200
        kept[0].sendall(b"GET /heal")
        kept[1].sendall(probe + b"GET /heal")
        assert first_answer(kept[1])[0] == 200
        wait_for(lambda: gw.http.dispatcher.parked == 2, "both wait in the selector")
        wait_for(lambda: gw.http.requests.idle == 2, "no thread waits for them")
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        for sock in kept:
            sock.sendall(b"thz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _until_closed(sock).startswith(b"HTTP/1.1 200")


def test_a_head_over_the_peek_that_comes_in_pieces_is_read_whole() -> None:
    # Heads longer than what is peeked at (4 KiB) are gathered by the selector, all of them,
    # and read by the thread as they came, byte for byte.
    pad = b"X-Pad: " + b"p" * 9000 + b"\r\n"
    head = _octet_head("shape", len(PNG), b"X-Request-ID: pieces-1\r\n", pad)
    with gated_gateway() as gw, socket.create_connection(http_host_port(gw.http_url)) as sock:
        pieces = [head[i : i + 1000] for i in range(0, len(head), 1000)]
        for piece in pieces[:-1]:
            send_and_see_read(sock, piece)
            assert gw.http.dispatcher.parked == 1
        sock.sendall(pieces[-1] + PNG)
        status, headers, answer = first_answer(sock)
        assert status == 200, answer
        assert headers["X-Request-ID"] == "pieces-1"
        assert answer["result"]["output"] == [128, 128, 3]


def test_a_head_cut_short_by_a_bare_lf_is_answered_at_once() -> None:
    # A line ended by LF alone is refused as soon as it is read: not waited on as a head whose
    # end has not come.
    with gated_gateway() as gw, socket.create_connection(http_host_port(gw.http_url)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\nHost: x\n")
        head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), head
        assert json.loads(body)["error"]["code"] == "invalid_request"


def test_past_the_parked_connections_a_part_sent_head_makes_room_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch_module, "PARKED_MAX", 2)
    with gated_gateway() as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        for n in range(1, 4):
            slow.append(socket.create_connection(address, timeout=10))
            send_and_see_read(slow[-1], b"GET /hea")
            parked = min(n, 2)
            wait_for(lambda: gw.http.dispatcher.parked == parked, "it waits for the rest")  # noqa: B023
        # The one that had waited longest was ended, without an answer; the others wait on,
        # and are served once the rest of their head comes.
        assert _until_closed(slow[0]) == b""
        for sock in slow[1:]:
            assert not _readable(sock)
            sock.sendall(b"lthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _until_closed(sock).startswith(b"HTTP/1.1 200")


def test_a_head_begun_in_the_buffer_and_in_the_bytes_taken_early_is_judged_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pipelined head can begin in the reader's buffer and go on in the bytes the selector took
    # early, more of it waiting in the socket. Its start was judged from the buffer and the
    # socket alone, the bytes between left out: a CR LF ending the buffer and one starting the
    # socket made it look ended, and a thread took it and waited for the rest, up to the head
    # time. (The limit of what the selector takes is lowered, so that the socket keeps some.)
    limit = 16 << 10
    monkeypatch.setattr(dispatch_module, "MAX_HEADER_BYTES", limit)
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 8100
    # What the reader's buffer holds of the next head once the first is read: whole lines.
    kept = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    kept += b"X-A: " + b"a" * (8192 - len(first) - 4 - len(kept) - 7) + b"\r\n"
    # Then, taken early up to the limit, a line with no end yet; its end is left in the socket.
    taken = b"X-B: " + b"b" * (limit + 1 - len(first) - 4 - len(kept) - 5)
    with (
        gated_gateway(http_threads=1) as gw,
        socket.create_connection(http_host_port(gw.http_url), timeout=10) as sock,
    ):
        send_and_see_read(sock, first)
        sock.sendall(b"\r\n\r\n" + kept + taken + b"\r\nX-C: c")
        assert first_answer(sock)[0] == 200
        wait_for(lambda: gw.http.dispatcher.parked == 1, "the next head waits in the selector")
        # The thread that answered parks the connection itself, then goes back to the pool.
        wait_for(lambda: gw.http.requests.idle == 1, "no thread waits for the rest")
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        sock.sendall(b"\r\nConnection: close\r\n\r\n")
        assert _until_closed(sock).startswith(b"HTTP/1.1 200")


def test_a_head_out_of_time_is_answered_408_while_every_thread_is_busy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A head whose time ran out in the selector was queued for a thread, its input cut there:
    # while every thread was busy, the sweep of waiting connections took the cut for its client
    # leaving and recorded it as gone (499), unanswered, and heads that ran out together filled
    # the queue, those past it refused 503 overloaded. Its 408 needs no thread.
    monkeypatch.setattr(watchdog_module, "HEAD_SECONDS", 1.0)
    caplog.set_level(logging.INFO, logger="gateway.access")
    with gated_gateway(http_threads=1) as gw, closing_all() as slow, only_http_thread_held(gw):
        slow.append(socket.create_connection(http_host_port(gw.http_url), timeout=10))
        send_and_see_read(slow[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: late\r\n")
        status, headers, answer = first_answer(slow[0])
        assert status == 408, answer
        assert headers["X-Request-ID"] == "late"
        assert answer["error"]["code"] == "request_timeout"
        assert (
            answer["error"]["message"] == "the request line and headers did not arrive within 1 s"
        )
        assert gw.http.requests.qsize == 0
    assert [r["status"] for r in access_records(caplog) if r["request_id"] == "late"] == ["408"]


def test_a_head_out_of_time_is_recorded_with_the_time_its_head_took(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A head that comes in pieces is handed over once for each, and each hand-over stamped the
    # connection's arrival afresh: a 408 after the whole head time was recorded as taking a
    # millisecond, and a request's time counted from the last piece of its head.
    monkeypatch.setattr(watchdog_module, "HEAD_SECONDS", 1.0)
    caplog.set_level(logging.INFO, logger="gateway.access")
    with (
        gated_gateway() as gw,
        socket.create_connection(http_host_port(gw.http_url), timeout=10) as sock,
    ):
        send_and_see_read(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow\r\n")
        send_and_see_read(sock, b"X-A: a\r\n")
        assert first_answer(sock)[0] == 408
    [record] = [r for r in access_records(caplog) if r["request_id"] == "slow"]
    assert record["status"] == "408"
    assert record["duration_ms"] >= 1000


def _noise_png(side: int) -> bytes:
    """A PNG of noise, which compresses to hardly less than its pixels (196 KB at 256)."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def test_clients_that_trickle_a_body_hold_no_http_thread() -> None:
    # A thread read a body as it came, waiting for each piece: as many slow uploads as threads
    # (a byte a second each was enough) stopped every HTTP request of the worker for up to the
    # request timeout.
    with gated_gateway(http_threads=2) as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        head = _octet_head("shape", len(PNG), b"Connection: close\r\n")
        cuts = (0, 1, len(PNG) // 2, len(PNG) - 1)
        for cut in cuts:
            slow.append(socket.create_connection(address, timeout=10))
            send_and_see_read(slow[-1], head + PNG[:cut])
        wait_for(lambda: gw.http.dispatcher.parked == 4, "all four wait in the selector")
        wait_for(
            lambda: gw.http.dispatcher.held == 4 * len(head) + sum(cuts),
            "the selector holds what came of each",
        )
        assert gw.http.requests.idle == 2
        wait_for(
            lambda: (
                arriving(gw.http_url)
                == ({"request": 0, "head": 0, "body": 4}, 4 * len(head) + sum(cuts))
            ),
            "the metrics show them",
        )
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        # The rest comes, a piece at a time: each served as if it had come whole.
        for sock, cut in zip(slow, cuts, strict=True):
            for piece in range(cut, len(PNG) - 1, 20_000):
                send_and_see_read(sock, PNG[piece : min(piece + 20_000, len(PNG) - 1)])
            sock.sendall(PNG[-1:])
            status, answer = _shape_answer(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            assert answer["result"]["output"] == [128, 128, 3]
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)


def test_the_sampled_gauges_of_two_gateways_in_one_process_add_up() -> None:
    # Each server's sweep set the process's gauge outright, so one gateway's sample overwrote
    # another's: a test's gateway read 0 requests waiting whenever a second one (the session's)
    # had swept last. Each now moves the gauge by its own change, and takes its part out as it
    # stops.
    head = b"POST /v1/models/shape/infer HTTP/1.1\r\nHost: x\r\n"
    first = start(Settings(http_port=0, grpc_port=0))
    try:
        with closing_all() as slow:
            second = start(Settings(http_port=0, grpc_port=0, shutdown_grace=1.0))
            try:
                with closing_all() as slow_second:
                    for gw, held, count in ((first, slow, 1), (second, slow_second, 2)):
                        for _ in range(count):
                            held.append(socket.create_connection(http_host_port(gw.http_url)))
                            send_and_see_read(held[-1], head)
                    wait_for(
                        lambda: arriving(first.http_url)[0].get("head") == 3, "the heads, summed"
                    )
                    for _ in range(4):  # past both servers' next sweeps
                        time.sleep(0.3)
                        assert arriving(second.http_url)[0].get("head") == 3
            finally:
                second.stop()
            wait_for(lambda: arriving(first.http_url)[0].get("head") == 1, "the first's head alone")
    finally:
        first.stop()


def test_clients_that_trickle_a_chunked_body_hold_no_http_thread() -> None:
    # Its end is known only from its chunks: a thread reading it waited for each, so chunked
    # uploads were the way to hold every thread once bodies of known length were awaited.
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (PNG[:5000], PNG[5000:]))
    chunked += b"0\r\nX-Trailer: t\r\n\r\n"
    head = (
        b"POST /v1/models/shape/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    # Cut inside the first chunk's size line, inside its data, inside the last chunk's line,
    # and before the trailer's end.
    cuts = (1, 100, 5012, len(chunked) - 3)
    with gated_gateway(http_threads=2) as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        for cut in cuts:
            slow.append(socket.create_connection(address, timeout=10))
            send_and_see_read(slow[-1], head + chunked[:cut])
        wait_for(lambda: gw.http.dispatcher.parked == 4, "all four wait in the selector")
        assert gw.http.requests.idle == 2
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        for sock, cut in zip(slow, cuts, strict=True):
            send_and_see_read(sock, chunked[cut:-1])
            sock.sendall(chunked[-1:])
            status, answer = _shape_answer(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            assert answer["result"]["output"] == [128, 128, 3]
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)


def test_a_kept_connection_whose_next_body_comes_in_part_holds_no_http_thread() -> None:
    # The next request on a kept connection, sent after the answer or pipelined behind the
    # request before it, was read by the thread that answered that one, which then waited for
    # the rest of its body.
    request = _octet_head("shape", len(PNG)) + PNG
    with gated_gateway(http_threads=1) as gw, closing_all() as kept:
        address = http_host_port(gw.http_url)
        kept += [socket.create_connection(address, timeout=10) for _ in range(2)]
        kept[0].sendall(request)
        assert first_answer(kept[0])[0] == 200
        kept[0].sendall(request[:-100])
        kept[1].sendall(request + request[:-100])
        assert first_answer(kept[1])[0] == 200
        wait_for(lambda: gw.http.dispatcher.parked == 2, "both wait in the selector")
        wait_for(lambda: gw.http.requests.idle == 1, "no thread waits for them")
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        for sock in kept:
            sock.sendall(request[-100:])
            status, _, answer = first_answer(sock)
            assert status == 200, answer
            assert answer["result"]["output"] == [128, 128, 3]


def test_a_body_out_of_time_is_answered_408_with_what_came_of_it_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    with (
        gated_gateway(request_timeout=1.0) as gw,
        socket.create_connection(http_host_port(gw.http_url), timeout=10) as sock,
    ):
        head = _octet_head("shape", len(PNG), b"X-Request-ID: late-body\r\n")
        send_and_see_read(sock, head + PNG[:1000])
        status, headers, answer = first_answer(sock)
        assert status == 408, answer
        assert headers["X-Request-ID"] == "late-body"
        assert headers["Connection"] == "close"
        assert answer["error"] == {
            "code": "request_timeout",
            "message": "the request body did not arrive within 1 s",
            "request_id": "late-body",
        }
        assert _until_closed(sock) == b""
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)
        still_serving(gw)
    [record] = [r for r in access_records(caplog) if r["request_id"] == "late-body"]
    assert (record["status"], record["error"], record["bytes_in"]) == (
        "408",
        "request_timeout",
        1000,
    )
    assert record["duration_ms"] >= 1000


def test_a_slow_body_past_the_bytes_a_worker_holds_is_read_by_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the selector holds of bodies still arriving is bounded: past it, a body is read by a
    # thread as it comes, as every body was before.
    monkeypatch.setattr(dispatch_module, "AWAITED_BYTES_MAX", 100_000)
    noise = _noise_png(256)
    head = _octet_head("shape", len(noise), b"Connection: close\r\n")
    with gated_gateway(http_threads=2) as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        for _ in range(2):
            slow.append(socket.create_connection(address, timeout=10))
            slow[-1].sendall(head + noise[:60_000])
        wait_for(lambda: gw.http.requests.idle == 1, "a thread reads the rest of one")
        assert gw.http.dispatcher.parked == 1
        for sock in slow:
            sock.sendall(noise[60_000:])
            status, answer = _shape_answer(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            assert answer["result"]["output"] == [256, 256, 3]
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)


def test_a_large_body_goes_to_a_thread_once_the_part_awaited_has_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A body over what is awaited of one (8 MiB) waits in the selector until that much has
    # come: a client that sends so much is no slowloris, and the rest is read straight into
    # the request's buffer. Read by a thread from its first byte, such a body let a client
    # that announced a large one and sent a byte now and then hold the thread.
    monkeypatch.setattr(heads_module, "AWAITED_BODY_BYTES", 50_000)
    noise = _noise_png(256)
    head = _octet_head("shape", len(noise), b"Connection: close\r\n")
    with (
        gated_gateway(http_threads=2) as gw,
        socket.create_connection(http_host_port(gw.http_url), timeout=10) as sock,
    ):
        send_and_see_read(sock, head + noise[:30_000])
        wait_for(lambda: gw.http.dispatcher.parked == 1, "it waits in the selector")
        assert gw.http.requests.idle == 2
        sock.sendall(noise[30_000:60_000])
        wait_for(lambda: gw.http.requests.idle == 1, "a thread reads the rest")
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)
        sock.sendall(noise[60_000:])
        status, answer = _shape_answer(sock)
        assert status == b"HTTP/1.1 200 OK", answer
        assert answer["result"]["output"] == [256, 256, 3]


def body_reading_threads(http_url: str) -> float:
    text = requests.get(f"{http_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_http_body_reading_threads":
                return float(sample.value)
    return -1.0


def test_expect_is_refused_while_all_http_threads_but_one_read_arriving_bodies() -> None:
    # A body sent only once the client is told to (Expect: 100-continue) is read by a thread as
    # it comes: as many clients as threads, each trickling its body once told, held every HTTP
    # thread of the worker for up to the request timeout. Past all threads but one, such a
    # client is refused before it sends its body, so nothing of it is lost.
    expect = _octet_head("shape", len(PNG), b"Expect: 100-continue\r\n")
    with gated_gateway(http_threads=2) as gw, closing_all() as clients:
        address = http_host_port(gw.http_url)
        clients += [socket.create_connection(address, timeout=10) for _ in range(3)]
        trickling, refused, later = clients
        trickling.sendall(expect)
        assert first_answer(trickling)[0] == 100
        send_and_see_read(trickling, PNG[:1000])

        refused.sendall(expect)
        status, headers, answer = first_answer(refused)
        assert status == 503, answer
        assert answer["error"]["code"] == "overloaded"
        assert "1 of this worker's 2 HTTP threads" in answer["error"]["message"]
        assert (headers["Retry-After"], headers["Connection"]) == ("1", "close")
        assert _until_closed(refused) == b""

        # A request that has come whole still has its thread.
        assert post_octet(gw.http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
        wait_for(lambda: body_reading_threads(gw.http_url) == 1, "the metrics show the one")

        trickling.sendall(PNG[1000:])
        status, _, answer = first_answer(trickling)
        assert status == 200, answer
        assert answer["result"]["output"] == [128, 128, 3]

        later.sendall(expect)
        assert first_answer(later)[0] == 100
        later.sendall(PNG)
        status, _, answer = first_answer(later)
        assert status == 200, answer
        assert gw.http.body_readers.count == 0


def test_threads_reading_arriving_bodies_are_counted_until_their_request_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Counted too long, the threads would refuse clients waiting for 100 Continue for ever.
    # (The selector holds nothing of bodies here: every one is read by a thread.)
    monkeypatch.setattr(dispatch_module, "AWAITED_BYTES_MAX", 0)
    expect = _octet_head("shape", len(PNG), b"Expect: 100-continue\r\n")
    chunked = (
        b"POST /v1/models/shape/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with gated_gateway(http_threads=2, request_timeout=1.0) as gw, closing_all() as clients:
        address = http_host_port(gw.http_url)
        readers = gw.http.body_readers
        # A body that has all come is not counted.
        assert post_octet(gw.http_url, "shape", PNG).status_code == 200
        assert readers.count == 0
        # A client that leaves inside its body.
        clients.append(socket.create_connection(address, timeout=10))
        clients[-1].sendall(expect)
        assert first_answer(clients[-1])[0] == 100
        assert readers.count == 1
        send_and_see_read(clients[-1], PNG[:1000])
        clients[-1].close()
        wait_for(lambda: readers.count == 0, "the one that left is no longer counted")
        # One whose body is cut off at the request timeout.
        clients.append(socket.create_connection(address, timeout=10))
        clients[-1].sendall(expect)
        assert first_answer(clients[-1])[0] == 100
        send_and_see_read(clients[-1], PNG[:1000])
        status, _, answer = first_answer(clients[-1])
        assert status == 408, answer
        wait_for(lambda: readers.count == 0, "the one cut off is no longer counted")
        # A chunked body is counted while its thread waits for it, and no longer once it ends.
        clients.append(socket.create_connection(address, timeout=10))
        send_and_see_read(clients[-1], chunked + b"%x\r\n" % len(PNG) + PNG[:1000])
        wait_for(lambda: readers.count == 1, "the thread waiting for the chunk is counted")
        clients[-1].sendall(PNG[1000:] + b"\r\n0\r\n\r\n")
        status, _, answer = first_answer(clients[-1])
        assert status == 200, answer
        assert readers.count == 0


@pytest.mark.parametrize("ending", ["retire", "stop"])
def test_a_body_arriving_when_a_worker_ends_is_read_whole_and_answered(
    monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    # A body awaited in the selector holds no thread, and the worker's end waited only for
    # threads: a reload closed the connection after its short wait for idle connections, a
    # stop at once, and the client, still sending, saw a reset. Read by a thread, as before,
    # it was answered: served by a retiring worker, refused (`shutting_down`) by a stopping one.
    monkeypatch.setattr(serve_module, "LEAVE_WAIT", 0.0)  # a retiring worker waits for no idle one
    gw = start(Settings(http_port=0, grpc_port=0, model=("shape",), shutdown_grace=30.0))
    ended = threading.Thread(
        target=gw.retire if ending == "retire" else lambda _: gw.stop(),
        args=(time.monotonic() + 30,),
    )
    try:
        with socket.create_connection(http_host_port(gw.http_url), timeout=10) as sock:
            send_and_see_read(sock, _octet_head("shape", len(PNG)) + PNG[:1000])
            wait_for(lambda: gw.http.requests_arriving() == 1, "its body is awaited")
            ended.start()
            wait_for(lambda: gw.http.leaving or gw.dataplane.admission.draining, "it ends")
            time.sleep(0.5)  # the sweeps that closed it come first; not a timing assert
            sock.sendall(PNG[1000:])
            status, _, answer = first_answer(sock)
        if ending == "retire":
            assert status == 200, answer
            assert answer["result"]["output"] == [128, 128, 3]
        else:
            assert status == 503, answer
            assert answer["error"]["code"] == "shutting_down"
        ended.join(30)
        assert not ended.is_alive()
    finally:
        if not ended.is_alive():
            gw.stop()


def test_bodies_taken_in_and_waiting_for_a_thread_stay_within_what_the_selector_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A body the selector had taken in went to the threads' queue with what it held, no longer
    # counted: while every thread was busy, clients whose bodies came in pieces held up to
    # 8 MiB each in the queue, 60 of them 470 MB of a worker, where 64 MiB were meant.
    monkeypatch.setattr(dispatch_module, "AWAITED_BYTES_MAX", 60_000)
    noise = _noise_png(128)
    head = _octet_head("shape", len(noise), b"Connection: close\r\n")
    with gated_gateway(http_threads=1) as gw, closing_all() as slow:
        address = http_host_port(gw.http_url)
        with only_http_thread_held(gw):
            for count in range(1, 7):
                slow.append(socket.create_connection(address, timeout=10))
                if count == 1:
                    # Taken in whole before the next comes: more of it arriving once the others
                    # had filled what the selector holds would send it to the threads' queue.
                    send_and_see_read(slow[-1], head + noise[:40_000])
                else:
                    slow[-1].sendall(head + noise[:40_000])
                wait_for(
                    lambda: gw.http.dispatcher.parked + gw.http.requests.qsize == count,  # noqa: B023
                    "parked, or waiting for the thread",
                )
            assert gw.http.dispatcher.parked == 1
            wait_for(lambda: not any(tcp_queues(sock)[0] for sock in slow), "all acknowledged")
            sent = len(head) + 40_000

            def taken() -> int:
                return sum(sent - (tcp_queues(sock)[1] or 0) for sock in slow)

            # The selector may still be taking in what has come of the parked one.
            wait_for(lambda: gw.http.dispatcher.held == taken(), "what is held is counted")
            assert taken() <= 60_000
            for sock in slow:
                sock.sendall(noise[40_000:])
        for sock in slow:
            status, answer = _shape_answer(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            assert answer["result"]["output"] == [128, 128, 3]
        assert (gw.http.dispatcher.parked, gw.http.dispatcher.held) == (0, 0)


def test_a_body_awaited_in_the_selector_stays_where_it_was_taken_as_more_comes() -> None:
    # Each time more of an awaited body came, the dispatcher's look at the request's start
    # (peek) filled the reader's buffer from the bytes taken early, and taking in the new
    # bytes put those back in front of the rest: all the body held was moved for each piece,
    # 330 us of the selector's time (and the GIL's) a byte with 8 MB held. What is looked at
    # must be left where it is.
    served, client = _tcp_pair()
    head = _octet_head("shape", 3_000_000)
    with served, client:
        reader = SocketReader(served)
        raw: Any = reader.raw

        def taken(count: int) -> None:
            wanted = len(head) + 3_000_000
            wait_for(lambda: reader.gather(wanted) or reader.unread == count, "bytes taken")

        client.sendall(head + bytes(1_000_000))
        taken(len(head) + 1_000_000)
        for sent in range(1, 4):
            client.sendall(b"x")
            taken(len(head) + 1_000_000 + sent)
            assert reader.peek(4096)[: len(head)] == head
            early = len(raw.early)
            assert early == reader.unread, "what was taken early went into the buffer"
        assert reader.read(len(head)) == head
        assert reader.read(1_000_003) == bytes(1_000_000) + b"xxx"


def arriving(http_url: str) -> tuple[dict[str, float], float]:
    """What /metrics says of the HTTP connections waiting for their request to arrive: how
    many wait for what, and the bytes held of their bodies."""
    text = requests.get(f"{http_url}/metrics", timeout=5).text
    waiting: dict[str, float] = {}
    held = -1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_http_arriving_connections":
                waiting[sample.labels["waiting_for"]] = sample.value
            elif sample.name == "gateway_http_arriving_body_bytes":
                held = sample.value
    return waiting, held


def waiting_for_thread(http_url: str, protocol: str) -> float:
    text = requests.get(f"{http_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name, sample.labels.get("protocol")) == (
                "gateway_waiting_for_thread_requests",
                protocol,
            ):
                return float(sample.value)
    return -1.0


def _answer_to(sock: socket.socket, end: bytes) -> bytes:
    """Bytes from `sock` until they hold `end`; fails if the connection closes first."""
    answers = b""
    while end not in answers:
        data = sock.recv(65536)
        assert data, f"closed before {end!r} came: {answers[:300]!r}"
        answers += data
    return answers


def test_probes_are_answered_while_every_http_thread_is_busy() -> None:
    # cheroot gave a /healthz the next thread of its one pool: while the HTTP threads held slow
    # requests, liveness probes, readiness probes and metric scrapes waited behind them.
    with gated_gateway(http_threads=1) as gw:
        address = http_host_port(gw.http_url)
        with ThreadPoolExecutor(2) as pool, requests.Session() as session:
            held = pool.submit(post_octet, gw.http_url, "gated", PNG)
            wait_for(lambda: gw.dataplane.admission.active == 1, "the only HTTP thread is held")
            # A probe thread answers one request: a request pipelined behind the probe, on the
            # same connection, waits for the HTTP threads like any other.
            pipelined = socket.create_connection(address, timeout=10)
            pipelined.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + raw_post("shape", PNG))
            answers = _answer_to(pipelined, b'{"status":"ok"}')
            queued = pool.submit(post_octet, gw.http_url, "shape", PNG)
            wait_for(lambda: gw.http.requests.qsize == 2, "two requests wait for the thread")
            # Probes, on new and kept-alive connections, with requests waiting for the thread.
            for path in ("/healthz", "/readyz", "/metrics", "/healthz?verbose=1"):
                response = session.get(gw.http_url + path, timeout=5)
                assert response.status_code == 200, (path, response.text)
                response = requests.get(gw.http_url + path, timeout=5)
                assert response.status_code == 200, (path, response.text)
            assert session.get(gw.http_url + "/readyz", timeout=5).json()["status"] == "ready"
            wait_for(
                lambda: waiting_for_thread(gw.http_url, "http") == 2,
                "the metrics show the two requests waiting",
            )
            # Only the probe routes: another GET waits for the thread.
            with socket.create_connection(address, timeout=0.5) as other:
                other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                with pytest.raises(TimeoutError):
                    other.recv(65536)
            pipelined.settimeout(0.5)
            with pytest.raises(TimeoutError):
                pipelined.recv(65536)
            assert not queued.done()
            GATE.set()
            assert held.result().status_code == 200
            assert queued.result().json()["result"]["output"] == [128, 128, 3]
            pipelined.settimeout(10)
            answers += _answer_to(pipelined, b'"output":[128,128,3]')
            assert answers.count(b"HTTP/1.1 200") == 2
            pipelined.close()
        still_serving(gw)


def test_slow_clients_cannot_hold_the_probe_threads() -> None:
    # A probe thread took any connection starting "GET /healthz ", then read the rest of its
    # head and body, and wrote its answer, with the 10 s timeouts of any request: two clients
    # trickling their headers, or never reading their answers, held both probe threads.
    with gated_gateway(http_threads=1) as gw:
        address = http_host_port(gw.http_url)
        with closing_all() as slow, only_http_thread_held(gw):
            for head in (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ",  # its head never ends
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",  # no body
            ):
                for _ in range(2):
                    s = socket.create_connection(address, timeout=10)
                    s.sendall(head)
                    slow.append(s)
            # Many answers asked for, none read: each answer's send waited up to 10 s, and then
            # the next pipelined one.
            slow += [metrics_asker(address, 600) for _ in range(20)]
            for _ in range(10):
                time.sleep(0.5)
                assert requests.get(gw.http_url + "/healthz", timeout=4).status_code == 200
        still_serving(gw)


def _whole_answers(received: bytes) -> list[bytes]:
    """The bodies of the 200 answers in `received`, each whole, but for a last one cut short."""
    bodies = []
    while received:
        head, sep, rest = received.partition(b"\r\n\r\n")
        if not sep:
            break  # cut short in its head
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"content-length"])
        if len(rest) < length:
            break  # cut short in its body
        bodies.append(rest[:length])
        received = rest[length:]
    return bodies


def test_a_client_that_takes_no_answers_gets_no_more_from_the_probe_threads() -> None:
    # A probe thread sent each answer itself, waiting up to 0.2 s for the client to take any of
    # it and 1 s for all, and answered every probe a connection pipelined: forty connections
    # asking for /metrics 600 times each and reading none had it made about 85 times each within
    # two seconds, with 290 KB left unsent on each, and other probes waited behind them.
    with probe_flood(40) as (gw, flood):
        for _ in range(5):
            assert requests.get(gw.http_url + "/healthz", timeout=2).status_code == 200
        # No more answers are made for a connection that leaves 64 KiB of them untaken; the
        # ones made still reach their client (the last may be cut short, if the client took
        # nothing for a second), then the end of the connection.
        for s in flood:
            s.settimeout(10)
            bodies = _whole_answers(_until_closed(s))
            assert 1 <= len(bodies) <= 40, len(bodies)
            assert all(b"gateway_requests_total" in body for body in bodies)


def test_pipelined_probes_cut_by_the_read_buffer_still_go_to_the_probe_threads() -> None:
    # The reader's buffer (8 KiB) ended inside one of the pipelined heads: that probe was not
    # recognised as one, and waited behind the slow request holding the only HTTP thread.
    probe = b"GET /healthz HTTP/1.1\r\nHost: xyz\r\n\r\n"  # 37 bytes: no power of two ends a head
    count = 400  # about 15 KB: past the first buffer's end
    with gated_gateway(http_threads=1) as gw:
        address = http_host_port(gw.http_url)
        with only_http_thread_held(gw), socket.create_connection(address, timeout=10) as s:
            s.sendall(probe * count)
            answers = b""
            while answers.count(b"HTTP/1.1 200 ") < count:
                data = s.recv(65536)
                assert data, f"closed after {answers.count(b'HTTP/1.1 200 ')} answers"
                answers += data
        still_serving(gw)


def test_with_no_room_to_linger_probe_answers_are_sent_by_the_probe_threads_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lingering thread takes at most MAX_LINGERING connections; past that a probe thread
    # sends the rest of an answer itself, waiting PROBE_SEND_TIMEOUT for the client to take any
    # of it. Clients that take nothing then cost each probe thread that long, not forever.
    # (With no backlog bound, the answers fill the socket's send buffer and reach that path.)
    monkeypatch.setattr(linger_module, "MAX_LINGERING", 0)
    monkeypatch.setattr(dispatch_module, "PROBE_BACKLOG", 1 << 30)
    with probe_flood(6) as (gw, flood):
        for _ in range(3):
            assert requests.get(gw.http_url + "/healthz", timeout=10).status_code == 200
        # Each ends once its client leaves an answer untaken for PROBE_SEND_TIMEOUT: with its
        # requests unread, by a reset that drops the answers on their way.
        for s in flood:
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                _until_closed(s)
        # A client that reads its answers gets them whole, from the probe threads.
        with socket.create_connection(http_host_port(gw.http_url), timeout=10) as reader:
            reader.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert len(_whole_answers(_until_closed(reader))) == 1


def test_with_no_room_to_linger_a_refused_body_still_ends_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Refused with its body unread, a connection goes to the lingering thread to be read out;
    # with no room there it is closed at once (the client may see a reset), never kept.
    monkeypatch.setattr(linger_module, "MAX_LINGERING", 0)
    gw = start(Settings(http_port=0, grpc_port=0, max_request_bytes=100_000))
    try:
        body = b"\0" * 200_000
        head = (
            "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for _ in range(3):
            with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
                s.sendall(head + body[:1000])
                answer = b""
                with contextlib.suppress(ConnectionResetError):
                    answer = _until_closed(s)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        still_serving(gw)
    finally:
        gw.stop()


def test_kernel_timeouts_end_stalled_reads_and_writes() -> None:
    served, peer = socket.socketpair()
    with served, peer:
        served.settimeout(0.2)
        move_timeout_to_kernel(served)
        assert served.gettimeout() is None  # blocking: no poll before each recv and send
        with pytest.raises(TimeoutError):
            SocketReader(served).readline()  # the peer sends nothing
        writer = SocketWriter(served)
        with pytest.raises(TimeoutError):
            for _ in range(100):  # the peer reads nothing: its buffer fills, then a send waits
                writer.write(b"x" * 65536)  # type: ignore[no-untyped-call]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection's two ends (a reset needs TCP; a socketpair has none)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    return served, client


def test_a_probe_client_that_resets_its_connection_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with gated_gateway(http_threads=1) as gw:
        address = http_host_port(gw.http_url)
        with only_http_thread_held(gw):
            for _ in range(20):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.connect(address)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
                s.close()  # a reset, with the answers on their way
            for _ in range(3):
                assert requests.get(gw.http_url + "/healthz", timeout=5).status_code == 200
        still_serving(gw)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures[0].getMessage()


def test_the_lingering_thread_sends_the_rest_of_an_answer_then_ends_the_connection() -> None:
    lingerer = Lingerer()
    answer = bytes(range(256)) * (16 << 10)  # 4 MiB: more than a socket takes at once
    try:
        served, client = _tcp_pair()
        with client:
            sent = send_now(served, answer)
            assert 0 < sent < len(answer)
            assert lingerer.add(served, answer[sent:], within=10)
            # Requests the client sends on meanwhile are read out, not left to reset the
            # connection when it closes.
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
            client.settimeout(10)
            assert _until_closed(client) == answer
        wait_for(lambda: lingerer.unsent == 0, "the answer's rest sent")
        # A client that takes nothing: the connection ends when its time is up.
        served, client = _tcp_pair()
        with client:
            sent = send_now(served, answer)
            assert lingerer.add(served, answer[sent:], within=0.2)
            wait_for(lambda: lingerer.unsent == 0, "the answer's rest given up")
            client.settimeout(10)
            received = _until_closed(client)
            assert sent <= len(received) < len(answer)
            assert answer.startswith(received)
    finally:
        lingerer.stop()
    # Connections it was given just before the server stopped are ended too, not left open.
    stopping = Lingerer()
    served, client = _tcp_pair()
    with client:
        assert stopping.add(served, b"the rest of an answer", within=10)
        stopping.stop()
        with socket.socket() as other:
            assert not stopping.add(other, b"more", within=10)
        client.settimeout(10)
        assert b"the rest of an answer".startswith(_until_closed(client))


def test_a_cut_read_times_out_and_the_answer_still_reaches_the_client() -> None:
    served, client = _tcp_pair()
    with served, client:
        reader = SocketReader(served)
        failed: list[BaseException] = []

        def read() -> None:
            try:
                reader.read(10)  # blocks: the client sends nothing yet
            except BaseException as exc:
                failed.append(exc)

        blocked = threading.Thread(target=read)
        blocked.start()
        time.sleep(0.2)  # let the read block; what is checked does not depend on it
        reader.cut()
        blocked.join(timeout=5)
        assert not blocked.is_alive() and isinstance(failed[0], TimeoutError)
        # The client goes on sending after the cut; the server answers and closes. Closed with
        # those bytes unread, the socket would reset and the client's kernel drop the answer.
        client.sendall(b"more of the body")
        wait_for(lambda: bool(select.select([served], [], [], 0)[0]), "the bytes arrive")
        served.sendall(b"the answer")
        reader.drop_arrived()
        served.close()
        client.settimeout(5)
        assert _until_closed(client) == b"the answer"


def test_sigterm_under_load_finishes_accepted_requests(tmp_path: Path) -> None:
    served = launch(
        tmp_path,
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--model",
        "tests.models:slow",
        "--max-concurrency",
        "16",
        "--shutdown-grace",
        "10",
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:

        def http_call() -> int:
            return requests.post(
                f"{served.http_url}/v1/infer",
                data=PNG,
                params={"seconds": "1"},
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            ).status_code

        channel = grpc.insecure_channel(served.grpc_target)
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        request = pb.InferRequest(image=pb.Image(data=PNG))
        request.parameters.update({"seconds": 1})

        def grpc_call() -> str:
            return stub.Infer(request, timeout=30).result.WhichOneof("outcome") or ""

        with ThreadPoolExecutor(12) as pool:
            http_futures = [pool.submit(http_call) for _ in range(6)]
            grpc_futures = [pool.submit(grpc_call) for _ in range(6)]
            wait_for(
                lambda: "gateway_in_flight_requests 12.0" in _metrics(served.http_url),
                "all twelve are in the model",
            )
            served.proc.send_signal(signal.SIGTERM)
            assert [f.result() for f in http_futures] == [200] * 6
            assert [f.result() for f in grpc_futures] == ["output"] * 6
        assert served.proc.wait(timeout=30) == 0
        channel.close()
        log = served.log.read_text()
        assert "received SIGTERM" in log and "stopped" in log
        # After the exit, nothing listens: new calls are refused, not hung.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{served.http_url}/v1/models", timeout=5)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _answers_healthz(http_url: str) -> bool:
    try:
        return requests.get(f"{http_url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_out_of_file_descriptors_the_http_listener_waits_instead_of_spinning(
    tmp_path: Path,
) -> None:
    # cheroot let accept()'s EMFILE out of its selector loop, which logged it with a traceback
    # and went straight back to the listener, still readable: a core at 100% and a flood of
    # tracebacks for as long as the descriptors stayed taken.
    limit = 64
    served = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "1", nofile=limit
    )  # fmt: skip
    pid = served.proc.pid
    try:
        with closing_all() as idle:
            # More connections than the server has descriptors left: the rest wait in its
            # listen queue.
            address = http_host_port(served.http_url)
            idle += [socket.create_connection(address, timeout=5) for _ in range(limit + 16)]
            wait_for(lambda: _open_files(pid) >= limit, "every descriptor of the server is taken")
            cpu = _cpu_seconds(pid)
            time.sleep(2)
            assert _cpu_seconds(pid) - cpu < 1.0
            assert served.log.read_text().count("Too many open files") == 1
        # Once those clients have gone, what waits in the listen queue is accepted, and served.
        wait_for(lambda: _answers_healthz(served.http_url), "the server answers again")
        assert "accepting HTTP connections again" in served.log.read_text()
        assert "Traceback" not in served.log.read_text()
    finally:
        served.proc.kill()
        served.proc.wait()


def _soft_open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


def test_workers_hold_more_connections_than_their_soft_open_files_limit(tmp_path: Path) -> None:
    # systemd starts a service at 1024 open files (soft), 524288 (hard), and asks programs that
    # never use select() to raise the soft limit themselves. At its soft limit a worker stopped
    # accepting, and the connections past it waited in the listen queue, unanswered.
    soft = 128
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 4 * soft, f"this test needs a hard limit of {4 * soft} open files or more"
    served = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "2", soft_nofile=soft
    )  # fmt: skip
    try:
        processes = [served.proc.pid, *spawned(served.proc.pid)]
        assert len(processes) == 3
        assert {_soft_open_files_limit(pid) for pid in processes} == {hard}
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        with closing_all() as held:
            # More than either worker could hold at the soft limit, however they are spread.
            for _ in range(2 * soft + 64):
                conn = socket.create_connection(http_host_port(served.http_url), timeout=10)
                held.append(conn)
                conn.sendall(request)
                assert first_answer(conn)[0] == 200
        assert "Too many open files" not in served.log.read_text()
    finally:
        served.proc.terminate()
        assert served.proc.wait(timeout=30) == 0, served.log.read_text()


def _established(sock: socket.socket) -> bool:
    """Whether a non-blocking connect has completed: the kernel took the connection."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0)) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_a_burst_of_connections_waits_in_the_listen_queue(tmp_path: Path) -> None:
    # The HTTP listen queue held 128 connections. Past that the kernel drops a connecting
    # client's SYN, and the client tries again only after 1 s (then 3, 7, ...): of 1000 clients
    # connecting at once, 831 waited over a second for a /healthz, and 2000 connections opened
    # and closed one after another took 12 s, against 0.1 s over gRPC.
    burst = 300
    if int(Path("/proc/sys/net/core/somaxconn").read_text()) < burst:
        pytest.skip("the kernel caps listen queues below the burst")
    served = launch(tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "1")
    try:
        address = http_host_port(served.http_url)
        with closing_all() as burst_of:
            # Stopped, the server accepts nothing: only its listen queue holds the burst.
            served.proc.send_signal(signal.SIGSTOP)
            try:
                for _ in range(burst):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(address)
                    burst_of.append(s)
                wait_for(lambda: all(_established(s) for s in burst_of), "the kernel took them all")
            finally:
                served.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: _answers_healthz(served.http_url), "the server answers")
    finally:
        served.proc.kill()
        served.proc.wait()


def test_draining_refuses_new_requests_and_finishes_busy_ones() -> None:
    gw = start(Settings(http_port=0, grpc_port=0, model=("tests.models:slow",), shutdown_grace=5.0))
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post_octet, gw.http_url, "slow", PNG, params={"seconds": "1"})
            wait_for(lambda: gw.dataplane.admission.active == 1, "the busy request is in the model")
            # The first step of a shutdown, on its own so that the servers still listen.
            gw.dataplane.admission.drain()
            late = post_octet(gw.http_url, "slow", PNG, params={"seconds": "0"})
            assert (late.status_code, late.json()["error"]["code"]) == (503, "shutting_down")
            assert late.headers["Retry-After"] == "1"
            with grpc.insecure_channel(gw.grpc_target) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.ImageGatewayServiceStub(ch).Infer(
                        pb.InferRequest(image=pb.Image(data=PNG)), timeout=10
                    )
                assert grpc_code(info.value) == (grpc.StatusCode.UNAVAILABLE, "shutting_down")
            assert busy.result().status_code == 200
    finally:
        gw.stop()


def stream_end(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """How a stream that has no more answers ends: its status, error code and request id."""
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    trailing = dict(info.value.trailing_metadata() or ())
    return info.value.code(), trailing.get("error-code", ""), trailing.get("x-request-id", "")


def test_a_drain_ends_open_streams_with_shutting_down(caplog: pytest.LogCaptureFixture) -> None:
    # Open streams ended a second after the drain with grpc's own UNAVAILABLE "Cancelling all
    # calls", with no error-code or x-request-id; until then the messages they sent were each
    # answered shutting_down, and the stream went on.
    caplog.set_level(logging.INFO, logger="gateway.access")
    settings = Settings(
        http_port=0, grpc_port=0, model=("shape", "tests.models:gated"), shutdown_grace=60.0
    )
    gw = start(settings)
    GATE.clear()
    quiet = threading.Event()
    one = pb.InferStreamRequest(image=pb.Image(data=PNG))
    gated = pb.InferStreamRequest(model="gated", image=pb.Image(data=PNG))

    def then_quiet(*messages: pb.InferStreamRequest) -> Iterator[pb.InferStreamRequest]:
        yield from messages
        quiet.wait(60)

    shutting_down = (grpc.StatusCode.UNAVAILABLE, "shutting_down")
    try:
        with grpc.insecure_channel(gw.grpc_target) as channel, ThreadPoolExecutor(1) as pool:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            idle = stub.InferStream(
                then_quiet(one), metadata=[("x-request-id", "idle-stream")], timeout=60
            )
            assert grpc_result(next(idle).result)["output"] == [128, 128, 3]
            busy = stub.InferStream(
                then_quiet(gated, one), metadata=[("x-request-id", "busy-stream")], timeout=60
            )
            wait_for(lambda: gw.dataplane.admission.active == 1, "a message is in the model")
            stopping = pool.submit(gw.stop)
            # The stream waiting for its client ends at once; the drain waits for the other.
            assert stream_end(idle) == (*shutting_down, "idle-stream")
            # A stream opened during the drain is refused so.
            late = stub.InferStream(
                iter([one]), metadata=[("x-request-id", "late-stream")], timeout=10
            )
            assert stream_end(late) == (*shutting_down, "late-stream")
            assert not stopping.done()
            GATE.set()
            # The message at work is answered; the one sent after it is not taken.
            assert grpc_result(next(busy).result)["output"] == [128, 128, 3]
            assert stream_end(busy) == (*shutting_down, "busy-stream")
            stopping.result(timeout=60)
    finally:
        GATE.set()
        quiet.set()
    records = {r["request_id"]: r for r in access_records(caplog)}
    for stream in ("idle-stream", "busy-stream", "late-stream"):
        record = records[stream]
        assert (record["method"], record["status"], record["error"]) == (
            "InferStream",
            "UNAVAILABLE",
            "shutting_down",
        )
    assert "busy-stream-1" not in records


def test_requests_waiting_for_a_thread_when_the_server_stops_get_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The only thread holds an upload (not in the core, so the drain ends at once); requests
    # wait for it. Moved to the refusal thread as the server stopped, they were never answered:
    # the client saw a reset. (Nothing of a body is awaited in the selector here: the thread
    # reads it as it comes.)
    monkeypatch.setattr(dispatch_module, "AWAITED_BYTES_MAX", 0)
    gw = start(
        Settings(
            http_port=0,
            grpc_port=0,
            http_threads=1,
            request_timeout=1.0,
            shutdown_grace=4.0,
        )
    )
    address = http_host_port(gw.http_url)
    uploading = socket.create_connection(address, timeout=10)
    waiting: list[socket.socket] = []
    try:
        uploading.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + PNG[:100]
        )
        time.sleep(0.2)  # the thread reads the body
        for _ in range(3):
            s = socket.create_connection(address, timeout=10)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            waiting.append(s)
        wait_for(lambda: gw.http.requests.qsize == 3, "three requests wait for the thread")
        stopping = threading.Thread(target=gw.stop)
        stopping.start()
        for s in waiting:
            answer = _until_closed(s)
            assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 ")), answer[:100]
        stopping.join(30)
    finally:
        uploading.close()
        for s in waiting:
            s.close()
        gw.stop()


def test_requests_arriving_in_the_selector_when_the_server_stops_get_an_answer() -> None:
    # A body awaited in the selector (or a head) when the server stopped was closed with the
    # selector's connections, unanswered, where a thread reading the body had answered it 503.
    gw = start(Settings(http_port=0, grpc_port=0, shutdown_grace=4.0))
    address = http_host_port(gw.http_url)
    try:
        with closing_all() as arriving:
            for sent in (
                _octet_head("shape", len(PNG)) + PNG[:1000],
                b"POST /v1/models/shape/infer HTTP/1.1\r\nHost: x\r\n",
            ):
                arriving.append(socket.create_connection(address, timeout=10))
                send_and_see_read(arriving[-1], sent)
            wait_for(lambda: gw.http.dispatcher.parked == 2, "both wait in the selector")
            stopping = threading.Thread(target=gw.stop)
            stopping.start()
            for sock in arriving:
                head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503 "), head
                assert json.loads(body)["error"]["code"] == "shutting_down"
            stopping.join(30)
            assert gw.http.dispatcher.held == 0
    finally:
        gw.stop()


def test_grpc_connections_that_never_send_their_preface_are_closed_within_the_head_time() -> None:
    # grpcio kept a connection that sent nothing, or not its SETTINGS, for 60 s, six times what
    # the HTTP side gives a request's head: each held a file descriptor all that time.
    gw = start(Settings(http_port=0, grpc_port=0, model=("shape",), request_timeout=1.0))
    try:
        host, port = gw.grpc_target.rsplit(":", 1)
        with closing_all() as held, grpc_channels(gw, 1) as (channel,):
            states: list[grpc.ChannelConnectivity] = []
            channel.subscribe(states.append)
            held += [socket.create_connection((host, int(port)), timeout=20) for _ in range(2)]
            held[1].sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the preface, no SETTINGS
            for s in held:
                _until_closed(s)  # the server's own SETTINGS, then the end
            # A channel that sent both in time is not ended: it stays connected throughout.
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            assert set(states) == {grpc.ChannelConnectivity.READY}
    finally:
        gw.stop()


def test_grpc_calls_whose_message_never_comes_are_ended_and_free_their_threads() -> None:
    # Each call sends its headers and never its one request message (a client's request
    # iterator that never yields). grpcio gives each a thread that waits for the message with
    # no limit: as many as the pool has threads stopped every call, health checks included.
    settings = Settings(
        http_port=0, grpc_port=0, request_timeout=1.5, grpc_threads=2, max_streams=2
    )
    gw = start(settings)
    never = threading.Event()
    before = request_counts(gw.http_url)

    def nothing() -> Iterator[bytes]:
        never.wait(60)
        yield b""

    try:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            silent = channel.stream_unary("/imagegateway.v1.ImageGatewayService/Infer")
            calls = [silent.future(nothing(), timeout=30) for _ in range(6)]
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            timed_out = 0
            for call in calls:
                with pytest.raises(grpc.RpcError) as ended:
                    call.result()
                code = grpc_code(ended.value)
                # Those that got a thread waited for their message; the others may be answered
                # while they still wait for a thread, at the same deadline.
                if code == (grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout"):
                    timed_out += 1
                    assert "did not arrive within 1.5 s" in (ended.value.details() or "")
                else:
                    assert code == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded")
                    assert "waited for a server thread" in (ended.value.details() or "")
            assert timed_out >= 2
            # Their threads serve again, well before the silent calls' own 30 s deadline. (A
            # call sent with them would have waited for a thread past the 1.5 s timeout.)
            reply = stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=20)
            assert grpc_result(reply.result)["output"] == [128, 128, 3]
        # Recorded, as any other answer: no handler ran for them (each just after its answer is
        # sent, so the last may still be on its way).
        route = ("grpc", "Infer", "", "DEADLINE_EXCEEDED")
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[route] == 6,
            "the six are recorded",
        )
        still_serving(gw)
    finally:
        never.set()
        gw.stop()


def test_grpc_calls_hold_no_thread_while_their_message_arrives() -> None:
    # grpcio gave a call its thread when its headers came, and the thread then waited for the
    # message: as many slow or silent uploads as threads stopped every other unary call. Now
    # a call takes one of --grpc-calls places while its message arrives, and a thread after.
    settings = Settings(http_port=0, grpc_port=0, grpc_threads=1, grpc_calls=3)
    gw = start(settings)
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait(60)
        yield b""

    plain = pb.InferRequest(image=pb.Image(data=PNG))
    try:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            silent = channel.stream_unary("/imagegateway.v1.ImageGatewayService/Infer")
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            uploads = [silent.future(nothing(), timeout=60) for _ in range(2)]
            # The only thread is free while two messages are awaited.
            reply = stub.Infer(plain, timeout=10)
            assert grpc_result(reply.result)["output"] == [128, 128, 3]
            uploads.append(silent.future(nothing(), timeout=60))
            # Every place is taken: this call waits, unread, for one.
            queued = stub.Infer.future(plain, timeout=30)
            wait_for(lambda: waiting_for_thread(gw.http_url, "grpc") == 1, "the call waits")
            assert not queued.done()
            uploads[0].cancel()
            assert grpc_result(queued.result().result)["output"] == [128, 128, 3]
            for upload in uploads[1:]:
                upload.cancel()
        still_serving(gw)
    finally:
        never.set()
        gw.stop()


def test_a_call_ended_for_want_of_its_message_is_recorded_so_while_it_waits_for_a_thread() -> None:
    # Its message is read without a thread; ended for want of it while the only thread is
    # busy, it waits for a thread only to be recorded, and was recorded as cancelled by its
    # client (which it was not) when the sweep of waiting calls came to it first.
    with (
        gated_gateway(grpc_threads=1, request_timeout=1.5) as gw,
        grpc_channels(gw, 1) as (channel,),
    ):
        before = request_counts(gw.http_url)
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        held = stub.Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=30
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the only gRPC thread is held")
        never = threading.Event()

        def nothing() -> Iterator[bytes]:
            never.wait(60)
            yield b""

        silent = channel.stream_unary("/imagegateway.v1.ImageGatewayService/Infer")
        try:
            with pytest.raises(grpc.RpcError) as ended:
                silent.future(nothing(), timeout=30).result()
        finally:
            never.set()
        assert grpc_code(ended.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout")
        route = ("grpc", "Infer", "")
        wait_for(
            lambda: delta(request_counts(gw.http_url), before)[(*route, "DEADLINE_EXCEEDED")] == 1,
            "the ended call is recorded",
        )
        assert delta(request_counts(gw.http_url), before)[(*route, "CANCELLED")] == 0
        assert not held.done()


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def test_health_checks_whose_message_never_comes_hold_no_probe_thread() -> None:
    # A health check's message was read on one of the two probe threads: two checks that sent
    # their headers and never their message held both until --request-timeout, and every other
    # check, and the overloaded refusals answered on the same threads, waited behind them.
    with (
        gated_gateway(grpc_threads=1, request_timeout=8.0) as gw,
        grpc_channels(gw, 4) as channels,
        silent_calls(channels[0], HEALTH_CHECK, 2) as silent,
    ):
        health = health_pb2_grpc.HealthStub(channels[0])
        for _ in range(3):
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        # The only unary thread held and THREAD_QUEUE calls waiting for it: the next is refused
        # at once, not once the silent checks end.
        stubs = [pb_grpc.ImageGatewayServiceStub(ch) for ch in channels]
        held = stubs[0].Infer.future(
            pb.InferRequest(model="gated", image=pb.Image(data=PNG)), timeout=60
        )
        wait_for(lambda: gw.dataplane.admission.active == 1, "the only gRPC thread is held")
        plain = pb.InferRequest(image=pb.Image(data=PNG))
        calls = [stubs[i % 4].Infer.future(plain, timeout=3) for i in range(THREAD_QUEUE + 1)]
        wait_for(lambda: any(f.done() for f in calls), "a call is answered")
        refused = [f.exception() for f in calls if f.done()]
        assert [grpc_code(e) for e in refused] == [(grpc.StatusCode.UNAVAILABLE, "overloaded")]
        GATE.set()
        assert grpc_result(held.result().result)["output"] == [128, 128, 3]
        for future in calls:
            with contextlib.suppress(grpc.RpcError):  # served, or past its own deadline
                future.result()
        # The silent checks still end at --request-timeout, as any call whose message never
        # comes.
        for call in silent:
            with pytest.raises(grpc.RpcError) as ended:
                call.result()
            assert grpc_code(ended.value) == (grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout")
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def test_a_health_check_past_the_reading_places_ends_the_oldest_silent_one() -> None:
    # Health messages are read rpc_pool.PROBE_READS at once (each may be up to --max-request-bytes).
    # When silent checks hold every place, a new check takes the oldest one's.
    gw = start(Settings(http_port=0, grpc_port=0))
    try:
        with (
            grpc_channels(gw, 1) as (channel,),
            silent_calls(channel, HEALTH_CHECK, rpc_pool.PROBE_READS) as silent,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            wait_for(lambda: any(c.done() for c in silent), "a silent check is ended")
            ended = [c.exception() for c in silent if c.done()]
            assert [grpc_code(e) for e in ended] == [(grpc.StatusCode.UNAVAILABLE, "overloaded")]
            assert "newer health checks" in ended[0].details()
            # The others wait on, for their message or --request-timeout; the place the check
            # gave back serves the next one (a Watch, read the same way).
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert sum(c.done() for c in silent) == 1
    finally:
        gw.stop()


def test_a_call_ended_for_want_of_its_message_carries_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its trailer had only error-code, though every failed call carries x-request-id, and its
    # access record got an id made for it later, different from any the client could see.
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = start(Settings(http_port=0, grpc_port=0, request_timeout=1.5))
    infer = "/imagegateway.v1.ImageGatewayService/Infer"
    try:
        with (
            grpc_channels(gw, 1) as (channel,),
            silent_calls(channel, infer, 1, metadata=(("x-request-id", "silent-named"),)) as named,
            silent_calls(channel, infer, 1) as unnamed,
            silent_calls(
                channel, HEALTH_CHECK, 1, metadata=(("x-request-id", "silent-check"),)
            ) as check,
        ):
            ids = []
            for call in (*named, *unnamed, *check):
                with pytest.raises(grpc.RpcError) as ended:
                    call.result()
                code = grpc_code(ended.value)
                assert code == (grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout")
                ids.append(dict(ended.value.trailing_metadata())["x-request-id"])
        assert ids[0] == "silent-named" and ids[2] == "silent-check"

        # The same ids in the access log, one record each (health checks have none).
        def records() -> list[tuple[str, str, str, str]]:
            return sorted(
                (r["request_id"], r["method"], r["status"], r["error"])
                for r in access_records(caplog)
                if r["request_id"] in ids
            )

        wait_for(lambda: len(records()) >= 2, "the two Infer calls are recorded")
        assert records() == sorted(
            (request_id, "Infer", "DEADLINE_EXCEEDED", "request_timeout") for request_id in ids[:2]
        )
    finally:
        gw.stop()


def test_idle_reflection_streams_take_stream_slots_and_cannot_starve_the_pool() -> None:
    # A reflection stream holds a thread as long as its client keeps it open. Uncounted, a few
    # idle ones held every thread of the pool, health checks included.
    gw = start(Settings(http_port=0, grpc_port=0, grpc_threads=2, max_streams=2))
    never = threading.Event()
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    def one_then_nothing() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield ask
        never.wait(60)

    try:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            idle = [stub.ServerReflectionInfo(one_then_nothing(), timeout=30) for _ in range(2)]
            for call in idle:  # answered: each holds its slot, and then waits
                assert next(call).list_services_response.service
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.ServerReflectionInfo(one_then_nothing(), timeout=10))
            assert grpc_code(refused.value) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            for call in idle:
                call.cancel()
        still_serving(gw)
    finally:
        never.set()
        gw.stop()


def test_a_refused_reflection_stream_carries_its_clients_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A reflection stream past --max-streams was refused under a fresh id, in its trailer and
    # its access record, where a refused InferStream carries the one its client sent.
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = start(Settings(http_port=0, grpc_port=0, max_streams=1))
    never = threading.Event()
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    def one_then_nothing() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield ask
        never.wait(60)

    try:
        with grpc_channels(gw, 1) as (channel,):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            idle = stub.ServerReflectionInfo(one_then_nothing(), timeout=30)
            assert next(idle).list_services_response.service  # it holds the only stream slot
            refused = stub.ServerReflectionInfo(
                one_then_nothing(), timeout=10, metadata=(("x-request-id", "reflection-7"),)
            )
            with pytest.raises(grpc.RpcError) as info:
                next(refused)
            assert grpc_code(info.value) == (grpc.StatusCode.UNAVAILABLE, "overloaded")
            assert dict(info.value.trailing_metadata())["x-request-id"] == "reflection-7"
            idle.cancel()

        def recorded() -> list[tuple[str, str]]:
            return [
                (r["method"], r["error"])
                for r in access_records(caplog)
                if r["request_id"] == "reflection-7"
            ]

        wait_for(lambda: recorded() != [], "the refused stream is recorded")
        assert recorded() == [("ServerReflectionInfo", "overloaded")]
    finally:
        never.set()
        gw.stop()


# A client that opens a stream, has its first answer, says so, and then waits with the stream
# open: stopped (SIGSTOP), it is a client whose host died or whose network was cut.
_STREAM_HOLDER = """
import sys, threading, grpc
from clients.pb.imagegateway.v1 import gateway_pb2 as pb, gateway_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
never = threading.Event()
def messages():
    yield pb.InferRequest(image=pb.Image(data=open(sys.argv[2], "rb").read()))
    never.wait()
answers = pb_grpc.ImageGatewayServiceStub(channel).InferStream(messages())
next(answers)
print("answered", flush=True)
never.wait()
"""


def test_a_stream_whose_client_vanished_gives_its_slot_back() -> None:
    gw = start(Settings(http_port=0, grpc_port=0, max_streams=1, grpc_keepalive=1.0))
    holder = subprocess.Popen(
        [sys.executable, "-c", _STREAM_HOLDER, gw.grpc_target, str(PNG_PATH)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "answered\n"
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)

            def one_stream() -> grpc.StatusCode:
                try:
                    list(stub.InferStream(iter([pb.InferRequest(image=pb.Image(data=PNG))])))
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            # The holder has the worker's one stream slot.
            assert one_stream() == grpc.StatusCode.UNAVAILABLE
            holder.send_signal(signal.SIGSTOP)
            # Its connection goes unanswered at the next ping: its stream ends, and the slot
            # is free again (it had been held for grpc's default of two hours).
            wait_for(lambda: one_stream() == grpc.StatusCode.OK, "the slot given back", 30)
    finally:
        holder.kill()
        holder.wait()
        gw.stop()


def test_a_body_announced_and_not_sent_costs_no_memory(tmp_path: Path) -> None:
    # The body's buffer, the size its Content-Length announces, was zeroed as it was made:
    # four clients announcing 60 MB each and sending nothing held 240 MB of the worker.
    served = launch(tmp_path, "--workers", "1", "--http-port", "0", "--grpc-port", "0")
    host, port = http_host_port(served.http_url)
    clients: list[socket.socket] = []
    try:
        before = _rss_mb(served.proc.pid)
        for _ in range(4):
            client = socket.create_connection((host, port), timeout=10)
            clients.append(client)
            client.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: 60000000\r\nExpect: 100-continue\r\n\r\n"
            )
            # Sent once the app reads the body: its buffer is made by then.
            assert client.recv(100).startswith(b"HTTP/1.1 100 Continue")
        assert _rss_mb(served.proc.pid) - before < 60
    finally:
        for client in clients:
            client.close()
        served.proc.terminate()
        assert served.proc.wait(timeout=30) == 0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")

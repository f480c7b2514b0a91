"""A serving process: builds the core and serves it over HTTP and gRPC until SIGINT or SIGTERM,
as the one process (`run_alone`) or as one worker of several (`run_worker`, started by
gateway.supervisor). gateway.command chooses which."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

import grpc

from gateway import (
    allocator,
    config,
    inflight,
    logs,
    metrics,
    model_threads,
    native_output,
    signals,
    workers,
)
from gateway.config import Settings, url_host
from gateway.core.activity import Activity
from gateway.core.admission import Admission
from gateway.core.dataplane import DataPlane
from gateway.core.tokens import Tokens
from gateway.models.registry import ModelRegistry
from gateway.rest.app import create_app
from gateway.rest.balance import Place
from gateway.rest.server import HttpServer, build_http_server
from gateway.rpc.server import GatewayHealth, build_grpc_server
from gateway.rpc.servicer import ImageGatewayServicer

log = logging.getLogger("gateway")


# Seconds the answers of finished gRPC calls have to leave once a drain has no request at work.
ANSWER_TAIL = 1.0
# Seconds a worker stopped by a signal waits for the word that the whole gateway stops, before
# it takes the stop for its own (see run_worker); it serves on meanwhile.
ALONE_WAIT = 0.2
# Seconds a retiring worker (see Gateway.retire) waits for the next request of HTTP connections
# it has open, before it closes those still idle.
LEAVE_WAIT = 1.0
# A model call still running this many times --request-timeout after it began can answer
# nobody (every request's deadline is within one timeout of its arrival): the worker is hung.
HUNG_AFTER_TIMEOUTS = 4
# Seconds between two looks at the model calls under way, and between two asks of the
# supervisor to replace a worker that stays hung.
HUNG_LOOK = 1.0
HUNG_ASK_AGAIN = 60.0
# Seconds between the main thread's looks for a reload's word to retire, while it waits for a
# stop.
SIGNAL_LOOK = 0.5


@dataclass
class Gateway:
    """Both servers, bound and running."""

    settings: Settings
    dataplane: DataPlane
    http: HttpServer
    grpc: grpc.Server
    health: GatewayHealth
    servicer: ImageGatewayServicer
    http_port: int
    grpc_port: int
    _http_thread: threading.Thread

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.settings.host)}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{url_host(self.settings.host)}:{self.grpc_port}"

    def stop(self) -> None:
        """Drain, then close, within the grace period."""
        deadline = time.monotonic() + self.settings.shutdown_grace
        self.drain(deadline)
        self.close(deadline)

    def drain(self, deadline: float) -> None:
        """Report not ready and refuse new requests at once, while still answering health
        checks; return once no request is at work any more, or at the deadline."""
        self.dataplane.admission.drain()  # /readyz answers 503 from here on
        self.health.enter_graceful_shutdown()  # grpc.health.v1: NOT_SERVING
        # Open streams waiting for their client's next message end with shutting_down now,
        # the others once they have answered the message at work.
        self.servicer.end_streams()
        admission = self.dataplane.admission
        # Waiting requests too: they were admitted before the drain, and take a slot next. And
        # requests whose head or body is still arriving, awaited without a thread: the stop
        # closes them, and their clients, still sending, saw a reset; come whole, they are
        # answered (`shutting_down`), as when a thread read them.
        while (
            admission.active or admission.waiting or self.http.requests_arriving()
        ) and time.monotonic() < deadline:
            time.sleep(0.05)

    def retire(self, deadline: float) -> None:
        """Leave the serving to the other workers (a reload): stop taking connections on both
        ports at once, answer the requests under way and those clients send on connections
        already open (each answer then closes its connection), then close."""
        # gRPC: the listener closes, and clients are told (GOAWAY) to take their next calls
        # elsewhere; calls under way go on, until close() shortens their grace.
        self.grpc.stop(max(0.0, deadline - time.monotonic()))
        # Open streams end as at a drain (their clients open them again, on another worker).
        self.servicer.end_streams()
        self.http.leave(LEAVE_WAIT)
        idle_until = time.monotonic() + LEAVE_WAIT
        admission = self.dataplane.admission
        while time.monotonic() < deadline and (
            admission.active
            or admission.waiting
            # Requests under way whose head or body is still arriving, awaited without a
            # thread: closed at once, a reload cut a slow upload off mid-body.
            or self.http.requests_arriving()
            or (self.http.connections_open() and time.monotonic() < idle_until)
        ):
            time.sleep(0.05)
        self.close(deadline)

    def close(self, deadline: float) -> None:
        """Stop both servers, giving what is still running until the deadline."""
        remaining = max(0.0, deadline - time.monotonic())
        # gRPC refuses new calls at once and cancels what is left after its grace. No request
        # is at work any more: what is left are answers on their way out, and streams that
        # would hold the stop for the whole grace while they wait for their client (a health
        # Watch, as grpc's client-side health checking keeps open; an idle InferStream).
        # A second stop with a shorter grace shortens the first one's. The Watch calls end
        # first, with shutting_down, rather than as grpc cancels them.
        self.health.end_watches()
        grpc_done = self.grpc.stop(min(remaining, ANSWER_TAIL))
        # cheroot closes its listener, then waits up to shutdown_timeout for busy threads, and
        # then, having closed their connections, for as long as they run: a thread inside a
        # model call held the stop (and the process) until the call returned.
        stopper = threading.Thread(target=self.http.stop, name="http-stop", daemon=True)
        stopper.start()
        stopper.join(remaining + 1)
        self._http_thread.join(remaining)
        grpc_done.wait(remaining)
        self.dataplane.close()


def start(
    settings: Settings,
    registry: ModelRegistry | None = None,
    reuse_port: bool = False,
    balance: Place | None = None,
    activity: Activity | None = None,
) -> Gateway:
    """Start both servers on their ports (0 picks free ones) and return once they accept; a
    worker of several gets its `balance` place (gateway.rest.balance), and the `activity` its
    request threads write what they do to (gateway.inflight)."""
    dataplane = DataPlane(
        registry or ModelRegistry.from_specs(list(settings.model)),
        config.core_limits(settings),
        Admission(settings.max_concurrency, settings.max_queue, settings.max_request_pixels),
        batching=config.batch_policies(settings),
        activity=activity,
    )
    # One for both fronts: a worker reads the file, and logs what it found, once.
    tokens = Tokens(settings.auth_token_file) if settings.auth_token_file else None
    grpc_server, grpc_port, health_servicer, servicer = build_grpc_server(
        settings, dataplane, reuse_port, tokens
    )
    http_server, http_port = build_http_server(
        create_app(settings, dataplane, tokens),
        settings.host,
        settings.http_port,
        settings.http_threads,
        settings.request_timeout,
        settings.shutdown_grace,
        settings.max_request_bytes,
        settings.max_image_bytes,
        tokens is not None,
        reuse_port,
        lambda: dataplane.admission.draining,
        settings.cors_origin,
        balance,
    )
    grpc_server.start()
    thread = threading.Thread(target=http_server.serve, name="http-server", daemon=True)
    thread.start()
    return Gateway(
        settings,
        dataplane,
        http_server,
        grpc_server,
        health_servicer,
        servicer,
        http_port,
        grpc_port,
        thread,
    )


def _serve_until_signal(
    settings: Settings,
    reuse_port: bool,
    on_ready: Callable[[Gateway], None],
    parent: int | None = None,
    drained: Callable[[float], None] | None = None,
    retire: threading.Event | None = None,
    hung: Callable[[], None] | None = None,
    alone: Callable[[], bool] | None = None,
    beat: Callable[[], None] | None = None,
    balance: Place | None = None,
    activity: Activity | None = None,
) -> int:
    stopping = threading.Event()
    serving = threading.Event()

    def _stop(why: str) -> None:
        if serving.is_set():
            stopping.set()
            return
        # Nothing is served yet, and a model still loading never reads `stopping`: the process
        # stayed for the whole load, and a worker orphaned by a SIGKILL of its supervisor
        # with it. Nothing is in flight, so there is nothing to drain.
        log.info("%s before serving; %s", why, "exiting" if parent else "image-gateway stopped")
        logging.shutdown()  # that line written (for a moment at most), as os._exit writes nothing
        os._exit(0)

    if parent is not None:
        # A worker whose supervisor is gone (killed with SIGKILL, say) drains and exits rather
        # than holding the ports for ever.
        def _watch_parent() -> None:
            while not stopping.wait(1.0):
                if os.getppid() != parent:
                    if serving.is_set():
                        log.warning("the supervisor is gone; shutting down")
                    _stop("the supervisor is gone")

        threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            return  # a stop signal to the process group comes again from the supervisor
        if serving.is_set():
            log.info("received %s, shutting down", name)
        _stop(f"received {name}")

    actions: dict[int, Callable[[int], None]] = dict.fromkeys(workers.STOP_SIGNALS, _on_signal)
    if retire is None:
        # Its default ends the process at once.
        actions[workers.RELOAD_SIGNAL] = _refuse_reload
    signals.handle(actions)
    allocator.tune()
    # Before the models load: a library a model imports reads its thread count as it loads.
    model_threads.limit(settings.model_threads)
    try:
        gateway = start(settings, reuse_port=reuse_port, balance=balance, activity=activity)
    except (OSError, RuntimeError, ValueError, TypeError, ImportError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    serving.set()
    on_ready(gateway)
    limit = HUNG_AFTER_TIMEOUTS * settings.request_timeout
    threading.Thread(
        target=_watch_model_calls,
        args=(gateway, limit, stopping, hung, beat),
        name="model-call-watch",
        daemon=True,
    ).start()
    while not stopping.wait(SIGNAL_LOOK):
        if retire is not None and retire.is_set():
            break
    deadline = time.monotonic() + settings.shutdown_grace
    signals.ignore(workers.STOP_SIGNALS)
    # Before the supervisor hears this worker leaves (and gives its place to another): from
    # here on it hands no connection over and publishes no count.
    gateway.http.stop_balancing()
    if retire is not None and retire.is_set():
        log.info("replaced by a new worker; finishing the requests under way")
        gateway.retire(deadline)
    elif alone is not None and alone():
        # A drain would answer 503 shutting_down to what reaches this worker while the others
        # serve on: it leaves as a reload's old worker does, and another takes its place.
        log.info("stopped alone; finishing the requests under way while the other workers serve")
        gateway.retire(deadline)
    else:
        gateway.drain(deadline)
        if drained is not None:
            drained(deadline)
        gateway.close(deadline)
    left = gateway.dataplane.admission.active
    if left:
        # Their threads are inside a model or a decode, which cannot be interrupted; exiting
        # normally would wait for them (threads are joined at exit), however long past the
        # grace they run.
        log.error(
            "%d requests still running after the %g s shutdown grace; exiting without them",
            left,
            settings.shutdown_grace,
        )
        logging.shutdown()  # the access records written so far
        os._exit(1)
    return 0


def _watch_model_calls(
    gateway: Gateway,
    limit: float,
    stopping: threading.Event,
    hung: Callable[[], None] | None,
    beat: Callable[[], None] | None,
) -> None:
    """Find a model call that has run past `limit`. A worker of several asks the supervisor
    (`hung`) to replace it, as a reload would: its other requests finish, and the hung call is
    left behind when it exits. One process cannot replace itself: its /healthz answers 503, and
    its gRPC health NOT_SERVING, until the call ends, for the orchestrator to restart it.

    Each look also tells the supervisor the worker's threads run (`beat`), and so on once the
    worker stops, until it exits: one whose threads cannot (stopped, or a call that holds the
    GIL) says nothing, not even that it hangs."""
    dataplane = gateway.dataplane
    asked_at: float | None = None
    while not stopping.wait(HUNG_LOOK):
        if beat is not None:
            beat()
        longest = dataplane.model_calls.longest()
        if longest is None or longest[1] < limit:
            if asked_at is not None:
                log.warning("the model call that had hung has ended")
                asked_at = None
                if hung is None:
                    dataplane.unhealthy = None
                    gateway.health.serving(True)
            continue
        model, seconds = longest
        if asked_at is not None and time.monotonic() - asked_at < HUNG_ASK_AGAIN:
            continue
        what = (
            f"model {model!r} has run one call for {seconds:.0f} s, over {HUNG_AFTER_TIMEOUTS} x "
            f"--request-timeout ({limit:g} s), and can answer no one"
        )
        asked_at = time.monotonic()
        if hung is not None:
            log.error("%s; asking for this worker to be replaced", what)
            hung()
        else:
            log.error("%s; /healthz answers 503, and gRPC health NOT_SERVING, until it ends", what)
            dataplane.unhealthy = what
            gateway.health.serving(False)
    # A worker that drains or leaves is still watched while it finishes its requests: one
    # stopped then would otherwise keep its listeners, and their new connections, for its
    # whole grace and more.
    while beat is not None:
        beat()
        time.sleep(HUNG_LOOK)


def _refuse_reload(signum: int) -> None:
    log.warning(
        "received %s: a reload replaces worker processes, and this gateway is one process "
        "(--workers 1); ignored",
        signal.Signals(signum).name,
    )


class _SupervisorLink:
    """What the supervisor tells a serving worker over its pipe, read on a thread of its own:
    to retire (a reload has started its replacement), or, after a drain, to close."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.retire = threading.Event()
        self.closed = threading.Event()
        self._sending = threading.Lock()  # a Connection's sends from two threads interleave

    def send(self, message: str) -> None:
        with self._sending, contextlib.suppress(OSError):  # the supervisor is gone
            self.pipe.send(message)

    def start(self) -> None:
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, EOFError):  # the supervisor is gone: close now
            while (message := self.pipe.recv()) != workers.CLOSE:
                if message == workers.RETIRE:
                    self.retire.set()
                    # To a worker that has drained (a stop came as a reload replaced it) it
                    # says what CLOSE does: the supervisor, which no longer counts it among
                    # the workers it closes together, sends it no CLOSE of its own.
                    self.closed.set()
        self.closed.set()


def run_worker(
    settings: Settings,
    supervisor: Connection,
    parent: int,
    gateway_stopping: EventType,
    heard_at: ctypes.c_double,
    replacing: str = "",
    balance: Place | None = None,
    requests_table: inflight.Table | None = None,
) -> int:
    """One worker process of several (see gateway.supervisor); `gateway_stopping` is set once
    the whole gateway stops, and the worker writes `heard_at` (time.monotonic()) every
    HUNG_LOOK seconds while its threads run. `replacing` is why the worker whose place it
    takes went, if it takes one; `balance` is its place among the workers that spread HTTP
    connections evenly; its request threads write what they decode and run for which request
    into `requests_table`, for the supervisor to name them should the worker die."""
    logs.configure(settings, relay_native=True)
    # The supervisor's reload signal, sent to the whole process group, is not the worker's.
    signal.signal(workers.RELOAD_SIGNAL, signal.SIG_IGN)
    link = _SupervisorLink(supervisor)

    def _ready(_gateway: Gateway) -> None:
        metrics.worker_started(replacing)
        link.send(workers.READY)
        link.start()

    def _drained(deadline: float) -> None:
        # The workers close their listeners together, once all have drained: one that closed
        # first reset the connections the kernel had just queued for it, health checks among
        # them, while its siblings still answered.
        link.send(workers.DRAINED)
        link.closed.wait(max(0.0, deadline - time.monotonic()) + workers.CLOSE_SLACK)

    def _alone() -> bool:
        # Stopped on a signal of its own, with the gateway serving on: the supervisor, which
        # gets a stop signal of the process group in the same instant, has not set
        # gateway_stopping within ALONE_WAIT. One whose supervisor is gone drains.
        if gateway_stopping.wait(ALONE_WAIT) or os.getppid() != parent:
            return False
        link.send(workers.LEAVING)
        return True

    try:
        return _serve_until_signal(
            settings,
            reuse_port=True,
            on_ready=_ready,
            parent=parent,
            drained=_drained,
            retire=link.retire,
            hung=lambda: link.send(workers.HUNG),
            alone=_alone,
            beat=lambda: setattr(heard_at, "value", time.monotonic()),
            balance=balance,
            activity=None if requests_table is None else inflight.Recorder(requests_table),
        )
    finally:
        native_output.finish()


def run_alone(settings: Settings) -> int:
    """Serve as one process, without a supervisor (--workers 1), until a stop signal; the exit
    code. gateway.command has set up the log and checked the host."""

    def _ready(gateway: Gateway) -> None:
        workers.log_ready(settings, gateway.http_port, gateway.grpc_port, 1)

    try:
        code = _serve_until_signal(settings, reuse_port=False, on_ready=_ready)
    finally:
        native_output.finish()  # its last lines written before the process exits
    if code == 0:
        log.info("image-gateway stopped")
    return code

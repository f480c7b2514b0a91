"""The gRPC server's thread pools, which also end calls whose request message never comes.

grpcio's threaded server runs every call, health checks included, on the one pool it is given.
Unary calls could then take every thread, the ones meant for streams among them, and a health
check waited behind inference: 16 slow Infer calls on a worker made a 1 s liveness probe fail.
So the pool given to grpcio hands each call to one of three: unary calls to `--grpc-threads`
threads, calls that stream requests (InferStream, reflection) to `--max-streams` threads and
two more (which refuse the streams past the servicer's slots at once), and health checks to two
threads of their own. A unary call that finds THREAD_QUEUE others waiting for a thread is
refused at once with `overloaded`, as the HTTP server refuses connections past the same number;
grpcio's own bound (`maximum_concurrent_rpcs`) answers RESOURCE_EXHAUSTED, which means "too
large" here.

grpcio's threaded server gives a call a thread of its pool as soon as the call's headers arrive,
and the thread then waits for the request message without any time limit. Sixteen calls that
never sent theirs held every thread of a worker, health checks included, for as long as their
client kept the connection open. This pool watches the calls that take one request message
(Infer, InferBatch, GetModel, health checks, ...) while they wait for it, and ends those still
waiting after `limit` seconds with DEADLINE_EXCEEDED and the `request_timeout` code, as the HTTP
side answers a body that stops arriving. Streams of requests are not watched: an InferStream
may rightly wait for its client's next message (`--max-streams` bounds those).

grpcio has no hook for this. The pool recognises grpcio's own request reader among what the
server submits to it, and ends a call the way grpcio's own aborts do, through grpc._server's call
state; tests/test_faults.py checks it against the installed grpcio.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from grpc import _common as grpc_common  # private: see the module's docstring
from grpc import _server as grpc_server
from grpc_health.v1 import health

from gateway import metrics
from gateway.core.access import log_access, started_at
from gateway.core.admission import THREAD_QUEUE, waiting_verdict
from gateway.core.dataplane import new_request_id
from gateway.core.errors import ErrorCode
from gateway.rpc.arrival import arrived, run_arrived
from gateway.rpc.servicer import ERROR_CODE_KEY, REQUEST_ID_KEY

log = logging.getLogger(__name__)

# Seconds before a call's deadline within which its client's cancel is taken for the deadline.
_DEADLINE_SLACK = 0.25
# Seconds between two looks at the calls waiting for their message.
WATCH_INTERVAL = 0.5
# The name grpcio gives the function that waits for a call's one request message.
_REQUEST_READER = "unary_request"
# Health checks answer from the servicer's own state, at once: two threads never wait long.
PROBE_THREADS = 2
# Stream threads past the servicer's slots: a stream over them is refused on one of these.
STREAM_SPARE = 2


class WatchedPool(ThreadPoolExecutor):
    """The pool of unary calls (`unary_threads`), with those of streams and health checks."""

    def __init__(
        self,
        unary_threads: int,
        stream_slots: int,
        limit: float,
        thread_name_prefix: str = "",
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(max_workers=unary_threads, thread_name_prefix=thread_name_prefix)
        self._streams = ThreadPoolExecutor(
            stream_slots + STREAM_SPARE, thread_name_prefix=f"{thread_name_prefix}-stream"
        )
        self._probes = ThreadPoolExecutor(
            PROBE_THREADS, thread_name_prefix=f"{thread_name_prefix}-health"
        )
        self.limit = limit
        self.draining = draining
        # Unary calls waiting for a thread, oldest first: key -> (arrival, what to run).
        self._queued: dict[
            int, tuple[float, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ] = {}
        self._keys = itertools.count()
        # id(call state) -> (when it gives up, the call's event, its state, its handler's name)
        self._waiting: dict[int, tuple[float, Any, Any, str]] = {}
        self._stopped = threading.Event()
        # The watcher holds the pool weakly: a pool nobody uses any more is collected, and its
        # threads end, as a plain ThreadPoolExecutor's do.
        threading.Thread(
            target=_watch, args=(weakref.ref(self),), name="grpc-request-watch", daemon=True
        ).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        # grpcio submits (context.run, handler-in-pool, rpc_event, state, behaviour,
        # request reader, ...); the reader of a one-message request is the function to watch.
        if len(args) > 4 and getattr(args[4], "__name__", "") == _REQUEST_READER:
            probe = _is_health(args[3])
            if not probe and len(self._queued) >= THREAD_QUEUE:
                # Refused on a probe thread: it only sends the status, reading nothing.
                refuse = _refusal(args[1], args[2], args[3])
                return self._probes.submit(fn, *args[:4], refuse, *args[5:], **kwargs)
            watched = self._watched(args[4], args[1], args[2], args[3])
            args = (*args[:4], watched, *args[5:])
            if probe:
                return self._probes.submit(fn, *args, **kwargs)
            key = next(self._keys)
            self._queued[key] = (time.monotonic(), fn, args, kwargs)
            # The call itself stays in _queued: one the sweep answers leaves only its key
            # in the executor's queue, until a thread comes to it.
            return super().submit(self._run_queued, key)
        if len(args) > 1:  # a call whose requests stream
            return self._streams.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    def _run_queued(self, key: int) -> Any:
        # Whoever takes the call from the queue answers it: this thread, or the sweep.
        queued = self._queued.pop(key, None)
        if queued is None:
            return None
        at, fn, args, kwargs = queued
        return run_arrived(at, fn, *args, **kwargs)

    def _sweep_queued(self) -> None:
        """Answer at once the unary calls waiting for a thread that will not be served: those
        past `--request-timeout` from arrival (`deadline_exceeded`), and while draining all
        (`shutting_down`). They waited for a thread to be told so, as long as it took."""
        draining = self.draining()
        for key, (at, fn, args, kwargs) in list(self._queued.items()):
            # Ended by its client (a cancel, its deadline): its place is given up now, not when
            # a thread or the server's deadline comes (hundreds of them took every place).
            gone = args[2].client is grpc_server._CANCELLED
            verdict = waiting_verdict(at, gone=gone, draining=draining, timeout=self.limit)
            if verdict is None or self._queued.pop(key, None) is None:
                continue  # waits on, or a thread took it meanwhile
            if gone:
                _record_unserved(args[1], args[2], args[3], ended=False, arrived_at=at)
                continue
            refuse = _refusal(args[1], args[2], args[3], verdict.error, verdict.message, at)
            self._probes.submit(fn, *args[:4], refuse, *args[5:], **kwargs)
        metrics.WAITING_FOR_THREAD.labels("grpc").set(len(self._queued))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._stopped.set()
        for pool in (self._streams, self._probes):
            pool.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)

    def _watched(
        self, read: Callable[[], Any], event: Any, state: Any, behaviour: Any
    ) -> Callable[[], Any]:
        name = _name(behaviour)

        def unary_request() -> Any:
            key = id(state)
            self._waiting[key] = (time.monotonic() + self.limit, event, state, name)
            try:
                request = read()
            finally:
                # Gone from the watch already: the watcher took it to end it.
                ended = self._waiting.pop(key, None) is None
            if request is not None and state.client is not grpc_server._CANCELLED:
                return request
            # A message that came as the call was ended: the client has had its answer. No
            # handler runs, so the call is recorded here, as HTTP records a client that left
            # (health checks, which the servicer does not record either, excepted).
            if not _is_health(behaviour):
                _record_unserved(event, state, behaviour, ended)
            return None

        return unary_request

    def _ended_waits(self) -> None:
        now = time.monotonic()
        for key, (gives_up, event, state, name) in list(self._waiting.items()):
            if now > gives_up and self._waiting.pop(key, None) is not None:
                try:
                    _end(event, state, self.limit, name)
                except Exception:  # a grpcio whose internals moved: leave the call be
                    log.exception("could not end a gRPC call waiting for its message")


def _watch(pool_ref: weakref.ReferenceType[WatchedPool]) -> None:
    while (pool := pool_ref()) is not None and not pool._stopped.is_set():
        pool._ended_waits()
        try:
            pool._sweep_queued()
        except Exception:  # a grpcio whose internals moved: leave the calls to their threads
            log.exception("could not answer gRPC calls waiting for a thread")
        stopped = pool._stopped
        del pool
        stopped.wait(WATCH_INTERVAL)


_BUSY = (
    f"every gRPC thread of this worker is busy and {THREAD_QUEUE} calls wait for one; retry later"
)


def _refusal(
    event: Any,
    state: Any,
    behaviour: Any,
    error: ErrorCode = ErrorCode.OVERLOADED,
    message: str = _BUSY,
    arrived_at: float | None = None,
) -> Callable[[], None]:
    """A request reader that answers the call `error` instead, and reads nothing: grpcio then
    runs no handler. Counted and logged like any other answer."""
    started = started_at(arrived_at)

    def unary_request() -> None:
        request_id = _request_id(event)
        with state.condition:
            gone = state.client is not grpc_server._OPEN or state.statused
            if not gone:
                _abort_unread(event, state, error, message, request_id)
        if gone:  # its deadline passed or its client cancelled it meanwhile
            _record_unserved(event, state, behaviour, ended=False, arrived_at=arrived_at)
            return None
        log_access(
            request_id=request_id,
            protocol="grpc",
            method=_method(behaviour),
            model="",
            images=0,
            status=error.grpc_status,
            bytes_in=0,
            bytes_out=0,
            started=started,
            error=error.code,
        )
        return None

    return unary_request


def _record_unserved(
    event: Any, state: Any, behaviour: Any, ended: bool, arrived_at: float | None = None
) -> None:
    """Count and log a call that ended before its handler could run: ended here for want of its
    message, past its client's deadline or cancelled by its client while it waited for a thread
    or its message, or closed by its client without a message (grpcio answers UNIMPLEMENTED)."""
    if ended:
        status, error = ErrorCode.REQUEST_TIMEOUT.grpc_status, ErrorCode.REQUEST_TIMEOUT.code
    elif state.client is grpc_server._CANCELLED:
        deadline = getattr(event.call_details, "deadline", None)
        # A client's deadline reaches the server as a cancel, a moment before the server's own
        # copy of it (counted from the call's arrival) passes.
        late = deadline is not None and time.time() >= deadline - _DEADLINE_SLACK
        gone = ErrorCode.DEADLINE_EXCEEDED if late else ErrorCode.CANCELLED
        status, error = gone.grpc_status, gone.code
    else:
        status, error = "UNIMPLEMENTED", ""  # grpcio's own answer, not one of the table
    log_access(
        request_id=_request_id(event),
        protocol="grpc",
        method=_method(behaviour),
        model="",
        images=0,
        status=status,
        bytes_in=0,
        bytes_out=0,
        started=started_at(arrived_at or arrived()),
        error=error,
    )


def _request_id(event: Any) -> str:
    # The message is not read: only the metadata can name the call's id.
    given = dict(event.invocation_metadata or ()).get(REQUEST_ID_KEY)
    return new_request_id(given if isinstance(given, str) else None)


def _method(behaviour: Any) -> str:
    # The label the servicer gives the same method (its name), for the same series.
    return str(getattr(behaviour, "__name__", "") or "-")


def _abort_unread(
    event: Any, state: Any, error: ErrorCode, message: str, request_id: str | None = None
) -> None:
    """End a call whose message is not read with `error`, the way grpcio's own aborts do; the
    caller holds state.condition. Its request reader then returns without a request, and grpcio
    sends no second status."""
    metadata: tuple[tuple[str, str], ...] = ((ERROR_CODE_KEY, error.code),)
    if request_id is not None:
        metadata += ((REQUEST_ID_KEY, request_id),)
    state.trailing_metadata = metadata
    grpc_server._abort(state, event.call, _status(error), message.encode())
    state.client = grpc_server._CANCELLED
    state.condition.notify_all()


def _status(error: ErrorCode) -> Any:
    # The table names the status; grpcio's own mapping gives its core's code for it.
    return grpc_common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[grpc.StatusCode[error.grpc_status]]


def _is_health(behaviour: Any) -> bool:
    # The handler, not the method's name: grpcio leaves call_details.method empty for
    # registered methods.
    return isinstance(getattr(behaviour, "__self__", None), health.HealthServicer)


def _name(behaviour: Any) -> str:
    # grpcio leaves call_details.method empty for registered methods; the handler names it.
    return str(getattr(behaviour, "__qualname__", "") or "a method")


def _end(event: Any, state: Any, limit: float, name: str) -> None:
    with state.condition:
        if state.request is not None or state.client is not grpc_server._OPEN or state.statused:
            return  # it came, or the call ended, meanwhile
        message = f"the request message did not arrive within {limit:g} s"
        _abort_unread(event, state, ErrorCode.REQUEST_TIMEOUT, message)
    log.warning(
        "ended a gRPC call to %s whose request message did not arrive within %g s", name, limit
    )

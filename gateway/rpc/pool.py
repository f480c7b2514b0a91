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
large" here. With --auth-token-file, a unary call without a token in force is refused the same
way, from its metadata (`unauthenticated`), before it takes a place or its message is read.

grpcio's threaded server gives a call a thread of its pool as soon as the call's headers arrive,
and the thread then waits for the request message without any time limit. Sixteen calls that
never sent theirs held every thread of a worker, health checks included, for as long as their
client kept the connection open; as many slow uploads as threads stopped every other unary call.
So this pool reads the message of a call that takes one (Infer, InferBatch, GetModel, ...)
before giving it a thread: the call takes one of `calls` places (`--grpc-calls`, which bound the
memory its messages can hold) from the start of its message to its answer, and a thread only once
the message is in. Calls past the places wait unread, in the same queue as calls waiting for a
thread. A call whose message is still missing after `limit` seconds is ended with
DEADLINE_EXCEEDED and the `request_timeout` code, as the HTTP side answers a body that stops
arriving. A health check's message is read the same way, without a thread, on one of
PROBE_READS places of its own, and watched the same; the check then takes one of the two probe
threads, which therefore never wait for a client: health answers and the refusals that share
those threads come at once. (Read on the probe threads themselves, two checks that never sent
their message held both, and every other check and refusal waited behind them until
`--request-timeout`.) A check arriving when every one of those places is held by a check whose
message has not come ends the oldest such check (`overloaded`): a check's message comes with
its headers, so only silent ones hold a place for long, and however many of them there are,
they neither stop the other checks nor hold more than PROBE_READS messages. Streams of requests
are not watched: an InferStream may rightly wait for its client's next message (`--max-streams`
bounds those).

grpcio has no hook for this. The pool recognises grpcio's own request reader among what the
server submits to it, starts the read with grpcio's own message callback, and ends a call the way
grpcio's own aborts do, through grpc._server's call state; tests/test_faults.py checks it against
the installed grpcio.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from grpc import _server as grpc_server
from grpc_health.v1 import health

from gateway import metrics
from gateway.core.access import log_access, started_at
from gateway.core.admission import THREAD_QUEUE, waiting_verdict
from gateway.core.dataplane import new_request_id
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.tokens import Tokens
from gateway.rpc.arrival import arrived, run_arrived
from gateway.rpc.ending import end_call
from gateway.rpc.servicer import ERROR_CODE_KEY, REQUEST_ID_KEY, authorization

log = logging.getLogger(__name__)

# Seconds before a call's deadline within which its client's cancel is taken for the deadline.
_DEADLINE_SLACK = 0.25
# Seconds between two looks at the calls waiting for their message.
WATCH_INTERVAL = 0.5
# The name grpcio gives the function that waits for a call's one request message.
_REQUEST_READER = "unary_request"
# Health checks answer from the servicer's own state, at once: two threads never wait long.
PROBE_THREADS = 2
# Health checks whose message is read at once (each may hold `--max-request-bytes` meanwhile).
PROBE_READS = 4
# Stream threads past the servicer's slots: a stream over them is refused on one of these.
STREAM_SPARE = 2


class _Call:
    """A unary call grpcio handed to the pool, from its arrival until its handler has run."""

    __slots__ = (
        "_request_id",
        "admitted",
        "args",
        "arrived",
        "done",
        "ended",
        "fn",
        "kwargs",
        "probe",
        "unreceived",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        probe: bool = False,
    ) -> None:
        self.arrived = time.monotonic()
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        # What grpcio counts the call by: done once the call no longer needs the pool.
        self.done: Future[None] = Future()
        # Whether it holds one of the `calls` places (from the start of its receive).
        self.admitted = False
        # Whether the watch ended it for want of its message.
        self.ended = False
        # Whether the read of its message failed: the call ended under it, cancelled, past its
        # deadline, or refused by grpc (a message over the size limit; grpc says no more).
        self.unreceived = False
        # A health check: read on places of its own, run on a probe thread, and not recorded
        # (health checks have no access record, answered or not).
        self.probe = probe
        self._request_id: str | None = None

    @property
    def event(self) -> Any:
        return self.args[1]

    @property
    def state(self) -> Any:
        return self.args[2]

    @property
    def behaviour(self) -> Any:
        return self.args[3]

    @property
    def request_id(self) -> str:
        """The id the call's trailer and its record both carry: its client's `x-request-id`
        metadata when usable, else a fresh one, made once (the message is not read)."""
        if self._request_id is None:
            self._request_id = _request_id(self.event)
        return self._request_id

    def args_with(self, reader: Callable[[], Any]) -> tuple[Any, ...]:
        """grpcio's arguments, with `reader` for its request reader."""
        return (*self.args[:4], reader, *self.args[5:])

    def record_unserved(self) -> None:
        if self.probe:
            return
        _record_unserved(
            self.event,
            self.state,
            self.behaviour,
            self.request_id,
            self.ended,
            self.arrived,
            self.unreceived,
        )


class WatchedPool(ThreadPoolExecutor):
    """The pool of unary calls (`unary_threads`), with those of streams and health checks."""

    def __init__(
        self,
        unary_threads: int,
        stream_slots: int,
        limit: float,
        thread_name_prefix: str = "",
        draining: Callable[[], bool] = lambda: False,
        calls: int | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        super().__init__(max_workers=unary_threads, thread_name_prefix=thread_name_prefix)
        # The tokens a unary call needs, checked from its metadata before its message is read.
        self.tokens = tokens
        self._streams = ThreadPoolExecutor(
            stream_slots + STREAM_SPARE, thread_name_prefix=f"{thread_name_prefix}-stream"
        )
        self._probes = ThreadPoolExecutor(
            PROBE_THREADS, thread_name_prefix=f"{thread_name_prefix}-health"
        )
        self.limit = limit
        self.draining = draining
        # Unary calls a worker holds at once, from the start of their message to their answer.
        self.calls = max(calls or unary_threads, unary_threads)
        self._lock = threading.Lock()
        self._admitted = 0
        # Unary calls waiting for a place (not yet reading) or, read, for a thread: key -> call.
        self._queued: dict[int, _Call] = {}
        # Keys of the calls waiting for a place, oldest first.
        self._pending: collections.deque[int] = collections.deque()
        self._keys = itertools.count()
        # id(call state) -> the call, while its message is awaited (unary calls and health
        # checks); it gives up `limit` seconds after its arrival.
        self._waiting: dict[int, _Call] = {}
        # id(call state) -> the health check, while its message is read, oldest first.
        self._probe_reads: dict[int, _Call] = {}
        self._stopped = threading.Event()
        self._waiting_share = metrics.SampledShare(metrics.WAITING_FOR_THREAD.labels("grpc"))
        # Its part of the gauge goes with the pool: at its shutdown, or once it is collected
        # without one (a server built and dropped).
        self._clear_share = weakref.finalize(self, self._waiting_share.clear)
        # The watcher holds the pool weakly: a pool nobody uses any more is collected, and its
        # threads end, as a plain ThreadPoolExecutor's do.
        threading.Thread(
            target=_watch, args=(weakref.ref(self),), name="grpc-request-watch", daemon=True
        ).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        # grpcio submits (context.run, handler-in-pool, rpc_event, state, behaviour,
        # request reader, request deserializer, ...); the reader of a one-message request is
        # the one to replace.
        if len(args) > 5 and getattr(args[4], "__name__", "") == _REQUEST_READER:
            if _is_health(args[3]):
                check = _Call(fn, args, kwargs, probe=True)
                self._read_probe(check)
                return check.done
            refusal = self._unauthenticated(args[1], args[2], args[3])
            if refusal is None and len(self._queued) >= THREAD_QUEUE:
                refusal = _refusal(args[1], args[2], args[3])
            if refusal is not None:
                # Refused on a probe thread: it only sends the status, reading nothing.
                return self._probes.submit(fn, *args[:4], refusal, *args[5:], **kwargs)
            call = _Call(fn, args, kwargs)
            with self._lock:
                call.admitted = self._admitted < self.calls
                if call.admitted:
                    self._admitted += 1
                else:
                    key = next(self._keys)
                    self._queued[key] = call
                    self._pending.append(key)
            if call.admitted:
                self._receive(call)
            return call.done
        if len(args) > 1:  # a call whose requests stream
            return self._streams.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    def _unauthenticated(self, event: Any, state: Any, behaviour: Any) -> Callable[[], None] | None:
        """The refusal of a unary call without a token in force, when tokens are required;
        None for any other. Checked before the call takes a place or its message is read: the
        servicer's own check came after grpc had received the whole message (up to
        --max-request-bytes) and it had been parsed, and calls without a token that never sent
        it held every place until --request-timeout, stopping every other unary call."""
        if self.tokens is None:
            return None
        try:
            self.tokens.check(authorization(event.invocation_metadata or ()))
        except GatewayError as exc:
            return _refusal(event, state, behaviour, exc.error, exc.message)
        return None

    def _read_probe(self, call: _Call) -> None:
        """Start reading a health check's message on one of PROBE_READS places; when every
        place is held by a check whose message has not come, the oldest of them is ended."""
        with self._lock:
            oldest = None
            if len(self._probe_reads) >= PROBE_READS:
                oldest = self._probe_reads.pop(next(iter(self._probe_reads)))
            self._probe_reads[id(call.state)] = call
        if oldest is not None and self._waiting.pop(id(oldest.state), None) is not None:
            message = (
                f"its request message had not arrived when {PROBE_READS} newer health checks "
                "needed their places; retry later"
            )
            try:
                if _end(oldest, ErrorCode.OVERLOADED, message):
                    log.warning("ended a gRPC health check whose request message had not come")
            except Exception:  # a grpcio whose internals moved: leave the call be
                log.exception("could not end a gRPC health check waiting for its message")
        self._receive(call)

    def _receive(self, call: _Call) -> None:
        """Start reading the call's message now; it gets a thread once the message is in. A
        thread that waited for the message could wait as long as its client took to send it."""
        event, state = call.event, call.state
        # From arrival, as the rest of the call's time: a call that waited for a place has
        # that much less left for its message.
        self._waiting[id(state)] = call
        with state.condition:
            active = grpc_server._is_rpc_state_active(state)
            if active:
                received = grpc_server._receive_message(state, event.call, call.args[5])

                def on_message(message_event: Any) -> Any:
                    call.unreceived = not message_event.success
                    outcome = received(message_event)
                    call.ended = self._waiting.pop(id(state), None) is None
                    self._ready(call)
                    return outcome

                event.call.start_server_batch(
                    (grpc_server.cygrpc.ReceiveMessageOperation(grpc_server._EMPTY_FLAGS),),
                    on_message,
                )
                state.due.add(grpc_server._RECEIVE_MESSAGE_TOKEN)
        if not active:
            self._waiting.pop(id(state), None)
            self._ready(call)

    def _ready(self, call: _Call) -> None:
        """Queue a call whose message is in (or will not come) for a thread."""
        if call.probe:
            with self._lock:
                self._probe_reads.pop(id(call.state), None)
            try:
                self._probes.submit(self._run, call)
            except RuntimeError:  # the pool is shut down: the server stops, and cancels its calls
                self._finish(call)
            return
        key = next(self._keys)
        # The call itself stays in _queued: one the sweep answers leaves only its key in the
        # executor's queue, until a thread comes to it.
        self._queued[key] = call
        try:
            super().submit(self._run_queued, key)
        except RuntimeError:  # the pool is shut down: the server stops, and cancels its calls
            if self._queued.pop(key, None) is not None:
                call.record_unserved()
                self._finish(call)

    def _run_queued(self, key: int) -> Any:
        # Whoever takes the call from the queue answers it: this thread, or the sweep.
        call = self._queued.pop(key, None)
        if call is None:
            return None
        return self._run(call)

    def _run(self, call: _Call) -> Any:
        try:
            return run_arrived(
                call.arrived, call.fn, *call.args_with(self._taken(call)), **call.kwargs
            )
        finally:
            self._finish(call)

    def _taken(self, call: _Call) -> Callable[[], Any]:
        """The request reader for a call whose message was read before it had a thread."""
        event, state = call.event, call.state

        def unary_request() -> Any:
            with state.condition:
                request, state.request = state.request, None
                closed = state.client is grpc_server._CLOSED and not call.unreceived
                if request is None and closed and not state.statused:
                    # What grpcio's own reader answers a call closed without its message.
                    details = f'"{event.call_details.method}" requires exactly one request message.'
                    grpc_server._abort(
                        state,
                        event.call,
                        grpc_server.cygrpc.StatusCode.unimplemented,
                        details.encode(),
                    )
            if request is not None and state.client is not grpc_server._CANCELLED:
                return request
            call.record_unserved()
            return None

        return unary_request

    def _finish(self, call: _Call) -> None:
        """The call no longer needs the pool: its place goes to the oldest call waiting."""
        call.done.set_result(None)
        if not call.admitted:
            return
        following: _Call | None = None
        with self._lock:
            while self._pending and following is None:
                # Gone from the queue: the sweep answered it meanwhile.
                following = self._queued.pop(self._pending.popleft(), None)
            if following is None:
                self._admitted -= 1
            else:
                following.admitted = True
        if following is not None:
            self._receive(following)

    def _sweep_queued(self) -> None:
        """Answer at once the unary calls waiting that will not be served: those past
        `--request-timeout` from arrival (`deadline_exceeded`), and while draining all
        (`shutting_down`). They waited for a thread to be told so, as long as it took."""
        draining = self.draining()
        for key, call in list(self._queued.items()):
            # Ended by its client (a cancel, its deadline): its place is given up now, not when
            # a thread or the server's deadline comes (hundreds of them took every place).
            gone = call.state.client is grpc_server._CANCELLED
            verdict = waiting_verdict(
                call.arrived, gone=gone, draining=draining, timeout=self.limit
            )
            if verdict is None or self._queued.pop(key, None) is None:
                continue  # waits on, or a thread took it meanwhile
            if gone:
                # Ended here for want of its message (call.ended), or by its client.
                call.record_unserved()
                self._finish(call)
                continue
            refuse = _refusal(
                call.event,
                call.state,
                call.behaviour,
                verdict.error,
                verdict.message,
                call.arrived,
                call.request_id,
            )
            answered = self._probes.submit(call.fn, *call.args_with(refuse), **call.kwargs)
            answered.add_done_callback(functools.partial(self._after_refusal, call))
        self._waiting_share.set(len(self._queued))

    def _after_refusal(self, call: _Call, _answered: Future[Any]) -> None:
        self._finish(call)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._stopped.set()
        self._clear_share()
        for pool in (self._streams, self._probes):
            pool.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)

    def _ended_waits(self) -> None:
        now = time.monotonic()
        message = f"the request message did not arrive within {self.limit:g} s"
        for key, call in list(self._waiting.items()):
            if now > call.arrived + self.limit and self._waiting.pop(key, None) is not None:
                try:
                    if _end(call, ErrorCode.REQUEST_TIMEOUT, message):
                        log.warning(
                            "ended a gRPC call to %s whose request message did not arrive "
                            "within %g s",
                            _name(call.behaviour),
                            self.limit,
                        )
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
    request_id: str | None = None,
) -> Callable[[], None]:
    """A request reader that answers the call `error` instead, and reads nothing: grpcio then
    runs no handler. Counted and logged like any other answer, under `request_id` (by default
    the client's, else a fresh one)."""
    started = started_at(arrived_at)

    def unary_request() -> None:
        call_id = request_id or _request_id(event)
        with state.condition:
            gone = state.client is not grpc_server._OPEN or state.statused
            if not gone:
                _abort_unread(event, state, error, message, call_id)
        if gone:  # its deadline passed or its client cancelled it meanwhile
            _record_unserved(event, state, behaviour, call_id, ended=False, arrived_at=arrived_at)
            return None
        log_access(
            request_id=call_id,
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
    event: Any,
    state: Any,
    behaviour: Any,
    request_id: str,
    ended: bool,
    arrived_at: float | None = None,
    unreceived: bool = False,
) -> None:
    """Count and log a call that ended before its handler could run: ended here for want of its
    message, past its client's deadline or cancelled by its client while it waited for a thread
    or its message, or closed by its client without a message (grpcio answers UNIMPLEMENTED).
    A call whose message grpc refused (over the size limit) looks cancelled: grpc gives no sign
    of why the read failed, and the call may not yet show as cancelled when this runs."""
    deadline = getattr(event.call_details, "deadline", None)
    # A client's deadline reaches the server as a cancel, a moment before the server's own copy
    # of it (counted from the call's arrival) passes.
    late = deadline is not None and time.time() >= deadline - _DEADLINE_SLACK
    if ended:
        status, error = ErrorCode.REQUEST_TIMEOUT.grpc_status, ErrorCode.REQUEST_TIMEOUT.code
    elif unreceived or late or state.client is grpc_server._CANCELLED:
        # Past its deadline, a call whose read failed before grpcio marked it cancelled was
        # recorded as grpcio's answer to a client that sent no message (UNIMPLEMENTED).
        gone = ErrorCode.DEADLINE_EXCEEDED if late else ErrorCode.CANCELLED
        status, error = gone.grpc_status, gone.code
    else:
        status, error = "UNIMPLEMENTED", ""  # grpcio's own answer, not one of the table
    log_access(
        request_id=request_id,
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


def _abort_unread(event: Any, state: Any, error: ErrorCode, message: str, request_id: str) -> None:
    """End a call whose message is not read with `error`, the way grpcio's own aborts do; the
    caller holds state.condition. Its request reader then returns without a request, and grpcio
    sends no second status."""
    trailing = ((ERROR_CODE_KEY, error.code), (REQUEST_ID_KEY, request_id))
    end_call(event.call, state, error, message, trailing)


def _is_health(behaviour: Any) -> bool:
    # The handler, not the method's name: grpcio leaves call_details.method empty for
    # registered methods.
    return isinstance(getattr(behaviour, "__self__", None), health.HealthServicer)


def _name(behaviour: Any) -> str:
    # grpcio leaves call_details.method empty for registered methods; the handler names it.
    return str(getattr(behaviour, "__qualname__", "") or "a method")


def _end(call: _Call, error: ErrorCode, message: str) -> bool:
    """End with `error` a call whose message has not come; False if it came, or the call
    ended, meanwhile."""
    state = call.state
    with state.condition:
        if state.request is not None or state.client is not grpc_server._OPEN or state.statused:
            return False
        _abort_unread(call.event, state, error, message, call.request_id)
    return True

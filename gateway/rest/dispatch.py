"""Which thread answers a connection whose request is due, without ever blocking the selector.

cheroot's selector thread hands every connection with a request to read to one pool of
`--http-threads` threads. Two things went wrong there while every thread was busy:

- A `/healthz` waited behind slow requests: a 1 s liveness probe failed on a worker that was only
  busy (Kubernetes would restart it), and Prometheus scrapes of `/metrics` timed out just when
  the numbers mattered. (gRPC health checks have threads of their own for the same reason.)
- With the pool's queue full, cheroot's selector waited up to 1 s for a place for each further
  connection, one after another, accepting and answering nothing else meanwhile: under a burst
  of 300 slow requests a probe took 35 s, and the 503s went out one a second.

So the dispatcher peeks at each connection's first bytes, without reading them (one recv). A
connection that has sent nothing yet, only part of its head, or only part of a body it
announced, is handed back to the selector until the rest has come (gateway.rest.heads; at most
PARKED_MAX at a time, past that the oldest is ended): given a thread, it held that thread until
its head or body timed out, so as many silent or slow clients as threads stopped every HTTP
request of the worker. One its client has closed is closed (cheroot would have queued it, then
answered it 503 for nobody). While the pool has no idle thread or a queue, a probe (`GET` of
one of PROBE_PATHS whose whole head has arrived, with no body) goes to PROBE_THREADS threads of
its own, which answer that one request without ever waiting for the client: the answer is made
in memory and sent as far as the socket takes it, the rest by the lingering thread
(gateway.rest.linger), and a connection that leaves PROBE_BACKLOG bytes of answers untaken gets
no more. Anything else goes to the pool's queue, or, when that is full, is answered 503
`overloaded` at once by cheroot's refusing thread, as gRPC refuses calls past the same number.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import socket
import threading
import time
from typing import Any

from gateway.core.errors import ErrorCode
from gateway.rest.heads import (
    AWAITED_BYTES_MAX,
    MAX_HEADER_BYTES,
    UNREADABLE,
    body_missing,
    fields,
    head_readable,
    request_start,
)
from gateway.rest.socketfile import (
    AnswerBuffer,
    SocketReader,
    send_now,
    send_within,
    set_send_timeout,
    unsent_bytes,
)

log = logging.getLogger(__name__)

PROBE_THREADS = 2
PROBE_PATHS = (b"/healthz", b"/readyz", b"/metrics")
# Seconds a client has to take all of a probe's answer; the part it does not take at once is
# sent by the lingering thread, so that a client that reads slowly, or pipelines many /metrics
# and reads none, holds no probe thread. (The watchdog ends a probe's connection after as long,
# should reading its whole head ever wait.)
PROBE_ANSWER_SECONDS = 1.0
# Seconds a probe thread waits for a client to take any of an answer, when the lingering thread
# has no room for it (MAX_LINGERING connections, or MAX_UNSENT bytes) and it is sent from here.
PROBE_SEND_TIMEOUT = 0.2
# The largest answer a probe is given (/metrics is some kilobytes).
PROBE_ANSWER_MAX = 4 << 20
# Bytes of answers a connection may leave unacknowledged by its client's kernel and still have
# its next probe answered: a client that reads none of its answers fills its own receive buffer,
# then this. Such a client, pipelining /metrics, had the probe threads make hundreds of answers
# for it, as many as the kernel would buffer (290 KB and more a connection).
PROBE_BACKLOG = 64 << 10
# New connections with nothing sent yet, handed back to the selector at once (which closes
# those idle for its timeout, 10 s). Past this many, the one parked longest is ended to make
# room for the new one. (Such connections went to the pool's queue, where each held a thread
# while it sent nothing: 130 idle connections made probes on new connections wait 5 s and more.)
PARKED_MAX = 1024
_PREFIXES = tuple(b"GET " + path + end for path in PROBE_PATHS for end in (b" ", b"?"))
_BODY_HEADERS = (b"transfer-encoding", b"expect")
_STOP = object()


def _end(sock: socket.socket) -> None:
    # Both ways: a send waiting on a full window fails at once.
    sock.shutdown(socket.SHUT_RDWR)


def is_probe(start: bytes) -> bool:
    """Whether `start` holds a whole probe request: a GET of a probe path, its head complete,
    without a body. Anything a thread would have to wait for is not one."""
    if not start.startswith(_PREFIXES):
        return False
    found, ended = fields(start)
    return ended and not any(
        name in _BODY_HEADERS or (name == b"content-length" and value != b"0")
        for name, value in found
    )


def header_value(start: bytes, name: bytes) -> str | None:
    """The value of header field `name` (lower case) in the head that `start` begins, if the
    field is there whole; for a request that is answered without being read."""
    for key, value in fields(start)[0]:
        if key == name:
            return value.decode("latin-1")
    return None


class Dispatcher:
    def __init__(self, server: Any) -> None:
        self._server = server
        self._probes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Connections parked before their first request, oldest first (see `_park`).
        self._parked: dict[int, Any] = {}
        # Bytes of bodies the parked connections hold (each its `held`).
        self._held = 0
        for i in range(PROBE_THREADS):
            threading.Thread(
                target=self._answer_probes, name=f"http-probe-{i}", daemon=True
            ).start()

    def dispatch(self, conn: Any) -> None:
        if conn.parked:
            self.unpark(conn)
        if conn.evicted:
            conn.close()
            return
        if conn.late is not None:
            # Its head's or body's time ran out in the selector: answered 408 at once by
            # cheroot's refusing thread, unread, as a refusal. Queued for a thread instead,
            # heads that ran out together (500 slow clients that began at once) filled the
            # queue, and those past it were refused 503 overloaded.
            self._server._unservicable_conns.put((conn, ErrorCode.REQUEST_TIMEOUT, conn.late))
            return
        threads = self._server.requests
        busy = bool(threads.qsize or not threads.idle)
        # Every connection is looked at, whatever the load: one handed to an idle thread before
        # its client had sent anything, or all of its head, held that thread until the head
        # timed out, 10 s, so as many silent or slow clients as threads stopped every HTTP
        # request of the worker for that long.
        start = request_start(conn)
        if start is None and self._server.ready:
            self._park(conn)
            return
        if start == b"":
            conn.close()
            return
        if start and start != UNREADABLE and not head_readable(start) and self._server.ready:
            reader = conn.rfile
            if isinstance(reader, SocketReader) and not reader.gather_head(MAX_HEADER_BYTES + 1):
                if conn.due is None:
                    conn.due = time.time() + self._server.watchdog.head_limit
                    conn.awaiting = "head"
                self._park(conn)
                return
            start = request_start(conn)
        if conn.awaiting == "head":
            conn.due = conn.awaiting = None
        if start and start != UNREADABLE and self._await_body(conn, start):
            return
        conn.due = conn.awaiting = None
        conn.body_in = 0
        if busy and start and is_probe(start):
            conn.probe_only = True
            self._probes.put(conn)
            return
        self._queue(conn)

    def _await_body(self, conn: Any, start: bytes) -> bool:
        """Whether the connection waits in the selector for the rest of its request's body,
        taking in what has come of it (gateway.rest.heads): a thread given it now would wait
        for the rest, as long as the client takes to send it."""
        reader = conn.rfile
        if not isinstance(reader, SocketReader) or not self._server.ready:
            return False
        # The common case, all of it here already, is read by a thread straight off the socket.
        lengths = body_missing(conn, start)
        if lengths is None:
            self._hold(conn, reader.unread if conn.held else 0)
            return False
        # Taken no further than the bodies held may go; the rest stays in the socket, for a
        # thread to read as it comes.
        with self._lock:
            room = AWAITED_BYTES_MAX - self._held + conn.held
        # Looked at again once taken in: a chunked body's end is found in what was taken.
        if (
            reader.gather(min(sum(lengths), max(room, reader.unread)))
            or body_missing(conn, start) is None
        ):
            self._hold(conn, reader.unread)
            return False
        conn.body_in = reader.unread - lengths[0]
        if conn.due is None:
            # The request's time counts from its first byte, as the core's deadline does.
            waited = time.monotonic() - (conn.queued_at or time.monotonic())
            conn.due = time.time() + self._server.request_timeout - waited
            conn.awaiting = "body"
        if self._park(conn, held=reader.unread):
            return True
        self._hold(conn, reader.unread)
        return False

    def _hold(self, conn: Any, held: int) -> None:
        """Count `held` bytes taken in of a connection's request as its, until a thread takes
        the connection (`release`). A connection that goes to the threads' queue takes what
        the selector took of its body with it: uncounted there, clients whose bodies came in
        pieces while every thread was busy held 8 MiB each in the queue, 60 of them 470 MB of
        a worker, and the queue takes 256."""
        with self._lock:
            self._held += held - conn.held
            conn.held = held

    def release(self, conn: Any) -> None:
        """A thread has taken the connection, or it has closed: what it held is no longer the
        selector's to count."""
        if conn.held:
            self._hold(conn, 0)

    def _queue(self, conn: Any) -> None:
        try:
            self._server.requests._queue.put_nowait(conn)
        except queue.Full:
            self._server._unservicable_conns.put(conn)  # answered 503 overloaded, then closed

    @property
    def parked(self) -> int:
        """Connections waiting in the selector for their request, or the rest of its head."""
        return len(self._parked)

    def arriving(self) -> int:
        """Parked connections whose request has begun to come: each a request under way."""
        with self._lock:
            return sum(conn.awaiting is not None for conn in self._parked.values())

    def waiting_for(self) -> dict[str, int]:
        """How many parked connections wait for what: "request" (none of it has come), "head"
        or "body" (the rest of it)."""
        with self._lock:
            waiting = collections.Counter(
                conn.awaiting or "request" for conn in self._parked.values()
            )
        return {what: waiting[what] for what in ("request", "head", "body")}

    @property
    def held(self) -> int:
        """Bytes of bodies taken in by the selector, held while the rest of each comes or
        while their connections wait for a thread."""
        return self._held

    def unpark(self, conn: Any) -> None:
        # What it holds stays counted: it goes to a thread with it, or parks again.
        with self._lock:
            if conn.parked:
                conn.parked = False
                del self._parked[id(conn)]

    def stop(self) -> None:
        for _ in range(PROBE_THREADS):
            self._probes.put(_STOP)

    def _send(self, conn: Any, answer: bytes) -> bool:
        """Send a probe's answer without waiting for its client; whether the connection can
        take its next request. What a client does not take at once (it reads slowly, or not at
        all) goes to the lingering thread, which gives it PROBE_ANSWER_SECONDS and then ends
        the connection: a probe thread never waits for a client. Only when that thread has no
        room is the rest sent from here, as before it could take answers: waiting at most
        PROBE_SEND_TIMEOUT for the client to take any of it, PROBE_ANSWER_SECONDS in all."""
        sock = conn.socket
        try:
            sent = send_now(sock, answer)
            if sent == len(answer):
                return True
            if self._server.lingerer.add(sock, answer[sent:], PROBE_ANSWER_SECONDS):
                conn.linger = True  # the socket is the lingering thread's now
                return False
            set_send_timeout(sock, PROBE_SEND_TIMEOUT)
            try:
                send_within(sock, answer[sent:], PROBE_ANSWER_SECONDS)
            finally:
                set_send_timeout(sock, self._server.timeout)
        except OSError:  # the client has gone, or did not take the answer in time
            return False
        return True

    def _let_go(self, conn: Any) -> None:
        """End a connection whose client does not take the answers it asks for: no more are
        made for it. Those already sent still reach it, then the end of the connection; the
        requests it sent on are read and dropped by the lingering thread (closing with them
        unread would reset the connection, and the client would lose the answers)."""
        conn.probe_only = False
        try:
            conn.socket.shutdown(socket.SHUT_WR)
            if self._server.lingerer.add(conn.socket):
                conn.linger = True
        except OSError:  # gone
            pass
        with contextlib.suppress(Exception):
            conn.close()

    def _park(self, conn: Any, held: int = 0) -> bool:
        """Hand a connection whose request has not come, or not its whole head or body, back
        to the selector, which hands it over again once more comes, or ends it when idle too
        long (a head or body whose rest does not come in time is answered 408:
        gateway.rest.listening); whether it is parked. It is not when the `held` bytes of body
        it has taken in would take the bodies held past AWAITED_BYTES_MAX.

        With PARKED_MAX parked, the one parked longest is ended to make room. Refusing the
        newcomer instead (503) refused real clients whose request had not come yet when they
        were accepted, /healthz probes among them, for as long as a flood of silent
        connections lasted."""
        with self._lock:
            if held and self._held - conn.held + held > AWAITED_BYTES_MAX:
                return False
            oldest = None
            if len(self._parked) >= PARKED_MAX:
                oldest = self._parked.pop(next(iter(self._parked)))
                oldest.parked = False
                oldest.evicted = True
                self._held -= oldest.held
                oldest.held = 0
            self._parked[id(conn)] = conn
            conn.parked = True
            self._held += held - conn.held
            conn.held = held
        if oldest is not None:
            # Not closed here: the selector still holds it. Shut, it reads as ended, and the
            # selector hands it over to be closed like any connection whose client has gone.
            with contextlib.suppress(OSError):
                oldest.socket.shutdown(socket.SHUT_RDWR)
        self._server._connections.put(conn)
        return True

    def _answer_probes(self) -> None:
        while (conn := self._probes.get()) is not _STOP:
            if unsent_bytes(conn.socket) > PROBE_BACKLOG:
                self._let_go(conn)
                continue
            keep = False
            watchdog = self._server.watchdog
            key = watchdog.watch(functools.partial(_end, conn.socket), PROBE_ANSWER_SECONDS)
            writer, conn.wfile = conn.wfile, AnswerBuffer(PROBE_ANSWER_MAX)
            answer: bytes | None = None
            try:
                keep = conn.communicate()
                answer = b"".join(conn.wfile.parts)
            except Exception:
                # These threads must outlive any one connection, as cheroot's own do.
                log.exception("answering a probe failed")
            finally:
                conn.wfile = writer
                # Released before the answer is sent: the socket may be the lingering
                # thread's then, which the watch must not end.
                watchdog.release(key)
            try:
                conn.probe_only = False
                if answer is not None and not self._send(conn, answer):
                    keep = False
                if keep:
                    # Its next request is dispatched afresh (a pipelined one at once).
                    self._server.put_conn(conn)
                else:
                    conn.close()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()

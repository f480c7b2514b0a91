"""Which thread answers a connection whose request is due, without ever blocking the selector.

cheroot's selector thread hands every connection with a request to read to one pool of
`--http-threads` threads. Two things went wrong there while every thread was busy:

- A `/healthz` waited behind slow requests: a 1 s liveness probe failed on a worker that was only
  busy (Kubernetes would restart it), and Prometheus scrapes of `/metrics` timed out just when
  the numbers mattered. (gRPC health checks have threads of their own for the same reason.)
- With the pool's queue full, cheroot's selector waited up to 1 s for a place for each further
  connection, one after another, accepting and answering nothing else meanwhile: under a burst
  of 300 slow requests a probe took 35 s, and the 503s went out one a second.

So while the pool has no idle thread or a queue, the dispatcher peeks at a connection's first
bytes, without reading them (at a new connection's whatever the load: see below). A probe (`GET`
of one of PROBE_PATHS whose whole head has arrived, with no body) goes to PROBE_THREADS threads
of its own, which answer that one request without ever waiting for the client: the answer is
made in memory and sent as far as the socket takes it, the rest by the lingering thread
(gateway.rest.linger), and a connection that leaves PROBE_BACKLOG bytes of answers untaken gets
no more. A new connection that has sent nothing yet is handed back to the selector until it has
(at most PARKED_MAX at a time; past that the oldest is ended), and one its client has closed is
closed (cheroot would have queued it, then answered it 503 for nobody). Anything else goes to
the pool's queue, or, when that is full, is answered 503 `overloaded` at once by cheroot's
refusing thread, as gRPC refuses calls past the same number. While the pool has an idle thread
and no queue, only a connection just accepted is peeked at (one recv, and the selector's turn if
its request has not come yet): cheroot hands a connection over as soon as it is accepted, and
one given a thread before its client sent anything held it until its head timed out. A
keep-alive connection's next request costs what it did.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import socket
import threading
from typing import Any

from gateway.rest.socketfile import (
    AnswerBuffer,
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
# A probe's request line and headers fit in this; a longer head is not taken for one.
_PEEK_BYTES = 4096
_PREFIXES = tuple(b"GET " + path + end for path in PROBE_PATHS for end in (b" ", b"?"))
_BODY_HEADERS = (b"transfer-encoding", b"expect")
_STOP = object()


# What request_start answers for a connection it cannot peek at (TLS): no request starts so.
UNREADABLE = b"\0"


def request_start(conn: Any) -> bytes | None:
    """The first bytes of the request due on `conn`, left unread for whichever thread answers
    it; None when none have come yet (cheroot hands a connection over as soon as it is
    accepted), b"" for a connection its client has closed."""
    reader = conn.rfile
    has_data = getattr(reader, "has_data", None)
    try:
        if has_data is not None and has_data():
            # A pipelined request already in the reader's buffer: peek returns it unread. The
            # buffer may end inside its head, the rest waiting in the socket: without that
            # rest, a pipelined probe cut so was queued behind slow requests.
            buffered = bytes(reader.peek(_PEEK_BYTES)[:_PEEK_BYTES])
            if len(buffered) < _PEEK_BYTES and b"\r\n\r\n" not in buffered:
                with contextlib.suppress(BlockingIOError, ValueError):  # nothing more; TLS
                    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
                    buffered += conn.socket.recv(_PEEK_BYTES - len(buffered), flags)
            return buffered
        # The socket is blocking with its timeouts kept by the kernel (socketfile), so
        # MSG_DONTWAIT is all it takes not to wait; a Python timeout would poll first.
        start: bytes = conn.socket.recv(_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return start
    except BlockingIOError:
        return None
    except OSError:  # reset: as good as closed
        return b""
    except ValueError:  # a TLS socket takes no flags
        return UNREADABLE


def _end(sock: socket.socket) -> None:
    # Both ways: a send waiting on a full window fails at once.
    sock.shutdown(socket.SHUT_RDWR)


def _fields(start: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The header fields (lower-case name, value) whole in the head that `start` begins, and
    whether the head has ended there."""
    head, ended, _ = start.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    if not ended:
        lines = lines[:-1]  # the last line may be cut short
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name.strip().lower(), value.strip()))
    return fields, bool(ended)


def is_probe(start: bytes) -> bool:
    """Whether `start` holds a whole probe request: a GET of a probe path, its head complete,
    without a body. Anything a thread would have to wait for is not one."""
    if not start.startswith(_PREFIXES):
        return False
    fields, ended = _fields(start)
    return ended and not any(
        name in _BODY_HEADERS or (name == b"content-length" and value != b"0")
        for name, value in fields
    )


def header_value(start: bytes, name: bytes) -> str | None:
    """The value of header field `name` (lower case) in the head that `start` begins, if the
    field is there whole; for a request that is answered without being read."""
    for key, value in _fields(start)[0]:
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
        for i in range(PROBE_THREADS):
            threading.Thread(
                target=self._answer_probes, name=f"http-probe-{i}", daemon=True
            ).start()

    def dispatch(self, conn: Any) -> None:
        if conn.parked:
            self.unpark(conn)
        threads = self._server.requests
        busy = bool(threads.qsize or not threads.idle)
        # A connection just accepted (cheroot sets last_used once one enters its selector) is
        # looked at whatever the load: handed to an idle thread before its client had sent
        # anything, it held that thread until its head timed out, 10 s, so as many silent
        # connections as threads stopped every HTTP request of the worker for that long.
        if busy or conn.last_used is None:
            start = request_start(conn)
            if start is None and self._server.ready:
                self._park(conn)
                return
            if start == b"":
                conn.close()
                return
            if busy and start and is_probe(start):
                conn.probe_only = True
                self._probes.put(conn)
                return
        try:
            threads._queue.put_nowait(conn)
        except queue.Full:
            self._server._unservicable_conns.put(conn)  # answered 503 overloaded, then closed

    @property
    def parked(self) -> int:
        """Connections waiting in the selector for their first request."""
        return len(self._parked)

    def unpark(self, conn: Any) -> None:
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

    def _park(self, conn: Any) -> None:
        """Hand a connection whose request has not come back to the selector, which hands it
        over again once it comes, or closes it when idle too long. With PARKED_MAX parked, the
        one silent longest is ended to make room. Refusing the newcomer instead (503) refused
        real clients whose request had not come yet when they were accepted, /healthz probes
        among them, for as long as a flood of silent connections lasted."""
        with self._lock:
            oldest = None
            if len(self._parked) >= PARKED_MAX:
                oldest = self._parked.pop(next(iter(self._parked)))
                oldest.parked = False
            self._parked[id(conn)] = conn
            conn.parked = True
        if oldest is not None:
            # Not closed here: the selector still holds it. Shut, it reads as ended, and the
            # selector hands it over to be closed like any connection whose client has gone.
            with contextlib.suppress(OSError):
                oldest.socket.shutdown(socket.SHUT_RDWR)
        self._server._connections.put(conn)

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

"""The production WSGI server (cheroot, CherryPy's thread-pool server) for the Flask app: its
parts are the upload watchdog (gateway.rest.watchdog), each request's reading and cheroot's own
answers (gateway.rest.exchange), the selector loop and connections (gateway.rest.listening), and
which thread answers a connection (gateway.rest.dispatch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

from cheroot import server, wsgi
from flask import Flask

from gateway import metrics
from gateway.core.admission import THREAD_QUEUE, waiting_verdict
from gateway.core.errors import ErrorCode
from gateway.rest.balance import Balancer, Place
from gateway.rest.dispatch import Dispatcher
from gateway.rest.exchange import BodyReaders, GatewayRequest, gateway_with, record_gone
from gateway.rest.heads import MAX_HEADER_BYTES
from gateway.rest.linger import Lingerer
from gateway.rest.listening import Handed, HttpConnection, Listening
from gateway.rest.socketfile import SocketReader, peer_closed, set_send_timeout
from gateway.rest.watchdog import Watchdog

log = logging.getLogger(__name__)

KEEP_ALIVE_CONNECTIONS = 256
# Seconds the refusal thread waits for a client to take a refusal's few hundred bytes.
REFUSAL_SEND_TIMEOUT = 0.2


class HttpServer(wsgi.Server):
    """cheroot's WSGI server, with the upload watchdog that lives and stops with it, reading
    its sockets through C io (gateway.rest.socketfile)."""

    ConnectionClass = HttpConnection

    def __init__(
        self,
        *args: Any,
        request_timeout: float,
        max_body: int,
        max_image: int | None = None,
        token_needed: bool = False,
        draining: Callable[[], bool] = lambda: False,
        cors_origins: tuple[str, ...] = (),
        balance: Place | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # With other workers on the port: spreads the connections evenly over them.
        self.balancer = Balancer(balance) if balance is not None else None
        self.cors_origins = cors_origins
        # The largest body the app takes; an unread one up to this is read out (see
        # GatewayRequest.send_headers).
        self.max_body = max_body
        # The largest body awaited in the selector (gateway.rest.heads): the largest the app
        # takes, whose refusal of a larger one (413, from its head) must not wait for it.
        self.max_awaited_body = min(max_body, max_image or max_body)
        # Whether the app refuses a request without an Authorization field (401, from its head).
        self.token_needed = token_needed
        self.request_timeout = request_timeout
        self._draining = draining
        self.watchdog = Watchdog(request_timeout, self._sweep_waiting)
        self.gateway = gateway_with(self.watchdog)
        self.dispatcher = Dispatcher(self)
        self.lingerer = Lingerer()
        self.body_readers = BodyReaders(self.requests.min)
        # This server's parts of the gauges the sweep samples.
        self._shares = {
            "waiting": metrics.SampledShare(metrics.WAITING_FOR_THREAD.labels("http")),
            "held": metrics.SampledShare(metrics.HTTP_ARRIVING_BODY_BYTES),
            "body_readers": metrics.SampledShare(metrics.HTTP_BODY_READING_THREADS),
        } | {
            what: metrics.SampledShare(metrics.HTTP_ARRIVING.labels(what))
            for what in ("request", "head", "body")
        }

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        # cheroot writes these to stderr as they are; as log lines they have a time, a level
        # and the process.
        log.log(level, "%s", msg, exc_info=traceback)

    def prepare(self) -> None:
        super().prepare()
        # cheroot made its own connection manager, with nothing but the listener in it yet.
        plain, self._connections = self._connections, Listening(self)  # type: ignore[has-type]
        plain.close()

    @property
    def can_add_keepalive_connection(self) -> bool:
        # Leaving, every answer closes its connection (`Connection: close`): the client's next
        # request opens a new one, which reaches another worker.
        return not self.leaving and super().can_add_keepalive_connection

    leaving = False

    def leave(self, timeout: float) -> None:
        """Stop taking connections, and close each open one after its next answer; return once
        the listener is closed (or after `timeout`)."""
        self.leaving = True
        listening = self._connections
        if isinstance(listening, Listening):
            listening.leave()
            listening.left.wait(timeout)

    def requests_arriving(self) -> int:
        """Requests whose head or body is still arriving, awaited without a thread."""
        return self.dispatcher.arriving()

    def connections_open(self) -> int:
        listening = self._connections
        return listening.connections_open() if isinstance(listening, Listening) else 0

    def stop_balancing(self) -> None:
        """This worker is leaving: it neither hands connections over nor counts for those
        handed over any more."""
        if self.balancer is not None:
            self.balancer.stop()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.watchdog.stop()
            for share in self._shares.values():
                share.clear()
            self.dispatcher.stop()
            self.lingerer.stop()
            # Refusals put after the refusal thread's stop signal (a sweep that began as the
            # server stopped): closed, not left open.
            leftover = self._unservicable_conns  # type: ignore[attr-defined]
            while not leftover.empty():
                item = leftover.get_nowait()
                if item is server._STOPPING_FOR_INTERRUPT:  # type: ignore[attr-defined]
                    leftover.put(item)  # the refusal thread's, still to come to it
                    break
                conn = item[0] if isinstance(item, tuple) else item
                with contextlib.suppress(Exception):
                    conn.close()

    def process_conn(self, conn: Any) -> None:
        # A connection with a request to read, on the selector thread (or one handing back a
        # connection with a pipelined request). Never blocks: gateway.rest.dispatch.
        if isinstance(conn, Handed):
            self._connections.take_handed()
            return
        if conn.due is None:
            # A request that comes in pieces is handed over once for each: its time (its
            # record's duration, its deadline) counts from the first, as when a thread took it
            # at its first byte.
            conn.queued_at = time.monotonic()
        self.dispatcher.dispatch(conn)

    def _sweep_waiting(self) -> None:
        """Answer at once the requests waiting for a thread that will not be served: those past
        their deadline (`deadline_exceeded`), and while draining all (`shutting_down`). They
        waited for a thread to say so, after the deadline or past the shutdown grace."""
        if not self.ready:
            # Stopping: the threads take what waits ahead of cheroot's stop signals, as before;
            # the refusal thread is ending and would leave these unanswered.
            return
        draining = self._draining()
        waiting = self.requests._queue
        with waiting.mutex:
            # With each one's arrival, read once: a thread that takes the connection meanwhile
            # clears it.
            queued = [
                (c, arrived)
                for c in waiting.queue
                if (arrived := getattr(c, "queued_at", None)) is not None
            ]
        # Outside the lock: a poll each. A client gone gives its place up now, not when a
        # thread or its deadline comes (hundreds that had left took every place from live ones).
        out = []
        for conn, arrived in queued:
            gone = peer_closed(conn.socket)
            verdict = waiting_verdict(
                arrived, gone=gone, draining=draining, timeout=self.request_timeout
            )
            if verdict is not None:
                out.append((conn, verdict.error, verdict.message))
        with waiting.mutex:
            taken = []
            for item in out:
                with contextlib.suppress(ValueError):  # a thread took it meanwhile
                    waiting.queue.remove(item[0])
                    taken.append(item)
            if taken:
                waiting.not_full.notify(len(taken))
        self._shares["waiting"].set(self.requests.qsize)
        for what, count in self.dispatcher.waiting_for().items():
            self._shares[what].set(count)
        self._shares["held"].set(self.dispatcher.held)
        self._shares["body_readers"].set(self.body_readers.count)
        for item in taken:
            self._unservicable_conns.put(item)  # type: ignore[attr-defined]

    def _serve_unservicable(self) -> None:
        # cheroot's own loop, answering with GatewayRequest instead of its plain HTTPRequest:
        # cheroot's refusals (503 overloaded), and the sweep's, which name their error.
        # (Its type stubs leave out the private names.)
        while True:  # to cheroot's stop signal, so that nothing put before it is left
            item = self._unservicable_conns.get()  # type: ignore[attr-defined]
            if item is server._STOPPING_FOR_INTERRUPT:  # type: ignore[attr-defined]
                return
            conn, error, message = item if isinstance(item, tuple) else (item, None, "")
            self.refuse(conn, error, message)

    def refuse(self, conn: Any, error: ErrorCode | None, message: str) -> None:
        """Answer a connection's request unread (503 overloaded when `error` is None), then
        close the connection."""
        try:
            # The answer is a courtesy, and one thread answers every refusal: a client that
            # does not read does not hold it.
            set_send_timeout(conn.socket, REFUSAL_SEND_TIMEOUT)
            if error is ErrorCode.CANCELLED or peer_closed(conn.socket):
                # Nobody to answer: counted as a client that left (499), as when a thread finds
                # one gone.
                record_gone(conn)
            else:
                status = f"{error.http_status}" if error else "503 Service Unavailable"
                refusal = GatewayRequest(self, conn)
                refusal.unread = True
                # A head whose time ran out in the selector (gateway.rest.listening).
                refusal.head_cut = conn.awaiting == "head"
                refusal.simple_response(status, message, error)
        except OSError:
            pass  # the answer is a courtesy; the client may be gone
        except Exception:
            # The refusing thread answers every refused connection: it must outlive any of them.
            log.exception("answering a refused connection failed")
        # cheroot sets `linger` here, leaving the socket to the garbage collector: closed later
        # with the request unread in it, it sends a reset, which destroyed the answer before the
        # test's client read it. Closed now, with what has come of the request dropped first, it
        # ends with a FIN after the answer.
        if isinstance(conn.rfile, SocketReader):
            conn.rfile.body_left = True
        with contextlib.suppress(OSError):
            conn.close()


def build_http_server(
    app: Flask,
    host: str,
    port: int,
    threads: int,
    request_timeout: float,
    shutdown_grace: float,
    max_body: int,
    max_image: int | None = None,
    token_needed: bool = False,
    reuse_port: bool = False,
    draining: Callable[[], bool] = lambda: False,
    cors_origins: tuple[str, ...] = (),
    balance: Place | None = None,
) -> tuple[HttpServer, int]:
    """Bind (port 0 picks a free port) and return the server, not yet serving, and its port."""
    server = HttpServer(
        (host, port),
        app,
        request_timeout=request_timeout,
        max_body=max_body,
        max_image=max_image,
        token_needed=token_needed,
        draining=draining,
        cors_origins=cors_origins,
        balance=balance,
        numthreads=threads,
        server_name="image-gateway",
        # Connections the kernel has taken and the selector not yet accepted. Past this, a
        # connecting client's SYN is dropped and it tries again only 1 s later (then 3, 7, ...):
        # with 128, 831 of 1000 clients connecting at once waited over a second for a /healthz.
        # The kernel caps it at net.core.somaxconn (4096 since Linux 5.4), as grpcio's own.
        request_queue_size=socket.SOMAXCONN,
        # Seconds one socket read or write may block, and an idle keep-alive connection lives.
        timeout=10,
        shutdown_timeout=math.ceil(shutdown_grace),
        # Connections with a request waiting for a thread; past it, one is answered 503 at once
        # without being read (gateway.rest.dispatch).
        accepted_queue_size=THREAD_QUEUE,
        reuse_port=reuse_port,
    )
    # cheroot keeps at most 10 idle keep-alive connections and closes the rest after each
    # answer, so a client pool larger than that reconnects for every request. Idle connections
    # cost a selector entry, not a thread.
    server.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS
    server.max_request_header_size = MAX_HEADER_BYTES
    server.prepare()
    return server, int(server.bind_addr[1])

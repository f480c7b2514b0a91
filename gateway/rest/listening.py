"""Where the HTTP server's connections come from: the selector loop's accepts (paused while the
process has no descriptor left), connections handed over between workers, and each connection
counted among those its worker holds (gateway.rest.balance).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import selectors
import socket
import threading
import time
from typing import Any

from cheroot import connections

from gateway import metrics
from gateway.core.admission import SHUTTING_DOWN
from gateway.core.errors import ErrorCode
from gateway.rest.balance import MOVE_MARGIN, Balancer
from gateway.rest.exchange import GatewayRequest
from gateway.rest.socketfile import Connection

log = logging.getLogger(__name__)

# What accept() fails with when the process (or the system) has no descriptor or buffer left for
# a new connection: nothing about that client, and the listener stays readable.
_ACCEPT_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Seconds at least between two accepts tried while they fail so.
ACCEPT_PAUSE = 0.5


class HttpConnection(Connection):
    RequestHandlerClass = GatewayRequest
    # Counted among the connections this worker holds (gateway.rest.balance) until closed.
    _counted = False
    # Handed to another worker between two requests: closing it only lets go of the descriptor.
    _moved = False

    def __init__(self, srv: Any, *args: Any) -> None:
        super().__init__(srv, *args)
        balancer: Balancer | None = srv.balancer
        if balancer is not None:
            balancer.opened()
            self._counted = True

    def close(self) -> None:
        if self._moved:
            # Served by another worker now: only this process's descriptor closes, with no
            # shutdown, lingering or reading out.
            self.rfile.close()
            self.wfile.close()
            self.socket.close()
            return
        if self._counted:
            self._counted = False
            self.server.balancer.closed()
        super().close()

    def moved(self) -> bool:
        balancer: Balancer | None = self.server.balancer
        if (
            balancer is None
            or not self._counted
            or self.probe_only
            or self.rfile.has_data()  # a pipelined request read into this process
            or not balancer.hand_over(self.socket, MOVE_MARGIN, close=False)
        ):
            return False
        metrics.HTTP_CONNECTIONS_HANDED.inc()
        self._moved = True
        self._counted = False
        balancer.closed()
        return True


class _Balanced:
    """The listener as the selector loop accepts from it, handing a connection just accepted
    to another worker when that one holds fewer (gateway.rest.balance)."""

    def __init__(self, listener: socket.socket, balancer: Balancer) -> None:
        self._listener = listener
        self._balancer = balancer

    def accept(self) -> tuple[socket.socket, Any]:
        sock, address = self._listener.accept()
        if self._balancer.hand_over(sock):
            metrics.HTTP_CONNECTIONS_HANDED.inc()
            # What cheroot takes for "nothing to accept after all".
            raise BlockingIOError(errno.EAGAIN, "handed to another worker")
        return sock, address


class _Received:
    """A connection another worker accepted and handed to this one, as the selector loop
    accepts it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return self._sock, self._sock.getpeername()
        except OSError:  # its client has reset it already
            self._sock.close()
            # What cheroot takes for "nothing to accept after all".
            raise BlockingIOError(errno.EAGAIN, "gone before it was taken") from None


class Handed:
    """The selector's entry for the Unix socket other workers hand connections over on."""

    # Never idle long enough for the selector's sweep to close it.
    last_used = math.inf

    def close(self) -> None:
        pass  # the socket is the balancer's


class Listening(connections.ConnectionManager):
    """cheroot's selector loop, which stops accepting for a moment when accept() fails for want
    of a file descriptor (EMFILE: the process's limit reached, say by idle connections).

    cheroot let that error out of its loop, which logged it with a traceback and went straight
    back to a listener that was still readable: with `--nofile` 256 and the descriptors taken,
    a worker spun at 98% of a core and wrote some 100,000 traceback lines a second for as long
    as they stayed taken. Here the listener leaves the selector instead, and comes back at the
    loop's next expiry sweep at least ACCEPT_PAUSE later (cheroot sweeps every 0.5 s): one
    accept tried a second or two, one error line when they start failing and one when they
    succeed again. Connections already accepted are served meanwhile; new ones wait in the
    listen queue, as grpcio's own listener leaves them (it tries again every second)."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self._resume_at: float | None = None
        self._starved_since: float | None = None
        self._leave = False
        self.left = threading.Event()
        self.handed = Handed()
        balancer: Balancer | None = server.balancer
        if balancer is not None:
            self._selector.register(  # type: ignore[attr-defined]
                balancer.receiver.fileno(), selectors.EVENT_READ, data=self.handed
            )
            balancer.publish()

    def leave(self) -> None:
        """Stop taking connections (the selector thread closes the listener at its next sweep,
        within a second); those already open go on being served."""
        self._leave = True

    def connections_open(self) -> int:
        """Connections waiting in the selector: idle keep-alive ones and new ones that have not
        sent their request yet."""
        held = self._selector.connections  # type: ignore[attr-defined]
        return len(
            [conn for _, conn in held if conn is not self.server and conn is not self.handed]
        )

    def take_handed(self) -> None:
        """Serve the connections other workers handed over (on the selector thread, which has
        taken the Unix socket out of the selector to call this)."""
        balancer: Balancer = self.server.balancer
        for sock in balancer.take():
            conn = self._from_server_socket(_Received(sock))
            if conn is not None:
                self.server.process_conn(conn)
        if not self.left.is_set():
            self._selector.register(  # type: ignore[attr-defined]
                balancer.receiver.fileno(), selectors.EVENT_READ, data=self.handed
            )

    def _close_listener(self) -> None:
        # Connections the kernel has queued for this listener are taken first: closing a
        # listener resets them, while the other workers' listeners (SO_REUSEPORT) would have
        # served them. One completing between the last accept and the close is lost; the window
        # is that of a system call.
        listener = self.server.socket
        with contextlib.suppress(KeyError, ValueError):  # paused (EMFILE): not registered
            self._selector.unregister(listener.fileno())  # type: ignore[attr-defined]
        self._resume_at = None
        listener.setblocking(False)
        while (conn := self._from_server_socket(listener)) is not None:
            self.server.process_conn(conn)
        listener.close()
        balancer: Balancer | None = self.server.balancer
        if balancer is not None:
            # What was handed over and not yet taken waits for this worker's replacement,
            # which takes the same socket, or goes to another worker (Handover.vacate).
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(balancer.receiver.fileno())  # type: ignore[attr-defined]
        self.server.socket = None  # cheroot's stop closes it otherwise
        self.left.set()

    def _from_server_socket(self, server_socket: Any) -> Any:
        balancer: Balancer | None = self.server.balancer
        if balancer is not None and server_socket is self.server.socket:
            server_socket = _Balanced(server_socket, balancer)
        try:
            conn = super()._from_server_socket(server_socket)  # type: ignore[misc]
        except OSError as exc:
            if exc.errno not in _ACCEPT_STARVED:
                raise
            self._pause(exc)
            return None
        if conn is not None and self._starved_since is not None:
            log.warning(
                "accepting HTTP connections again, after %.1f s without",
                time.monotonic() - self._starved_since,
            )
            self._starved_since = None
        return conn

    def _pause(self, exc: OSError) -> None:
        now = time.monotonic()
        with contextlib.suppress(KeyError, ValueError):  # leaving: unregistered already
            self._selector.unregister(self.server.socket.fileno())  # type: ignore[attr-defined]
        self._resume_at = now + ACCEPT_PAUSE
        if self._starved_since is None:
            self._starved_since = now
            log.error(
                "cannot accept HTTP connections: %s; trying again every %g s or so, serving "
                "the connections already open meanwhile",
                exc.strerror or exc,
                ACCEPT_PAUSE,
            )

    def put(self, conn: Any) -> None:
        if conn.due is None or not conn.parked:
            super().put(conn)
            return
        # Waiting for the rest of its head or body, whose start is in its reader already:
        # cheroot's put would hand it straight back for those bytes. The sweep ends its wait at
        # `due`.
        conn.last_used = time.time()
        self._selector.register(  # type: ignore[attr-defined]
            conn.socket.fileno(), selectors.EVENT_READ, data=conn
        )

    def _end_late_waits(self) -> None:
        """Hand over the connections whose head's or body's time has run out while its rest
        was awaited in the selector, or whose client has sent nothing for the read timeout (as
        a thread reading it would have waited), to be answered 408 without being read
        (gateway.rest.dispatch). (The sweep after this one would close them without an
        answer.)"""
        now = time.time()
        server = self.server
        idle_since = now - server.timeout
        held = self._selector.connections  # type: ignore[attr-defined]
        late = [
            (fd, conn)
            for fd, conn in held
            if getattr(conn, "due", None) is not None
            and (conn.due <= now or conn.last_used <= idle_since)
        ]
        for fd, conn in late:
            self._selector.unregister(fd)  # type: ignore[attr-defined]
            if conn.awaiting == "body" and conn.due <= now:
                conn.late = f"the request body did not arrive within {server.request_timeout:g} s"
            else:
                # A head out of time, or a body of which nothing came for the read timeout: the
                # refusal's own message says which (GatewayRequest.simple_response).
                conn.late = ""
            server.process_conn(conn)

    def close(self) -> None:
        # The server stops. A connection whose request has begun to come, its head or body
        # awaited here, is answered 503 shutting_down, unread, as the requests waiting for a
        # thread are: closed unanswered with the rest, an upload under way when the gateway
        # stopped saw its connection end, where a thread reading its body had answered it.
        server = self.server
        held = self._selector.connections  # type: ignore[attr-defined]
        for fd, conn in [(fd, conn) for fd, conn in held if getattr(conn, "due", None)]:
            self._selector.unregister(fd)  # type: ignore[attr-defined]
            server.dispatcher.unpark(conn)
            server.refuse(conn, ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN)
        super().close()

    def _expire(self, threshold: float) -> None:
        # The loop calls this every 0.5 s or so whatever else happens, listener or not.
        self._end_late_waits()
        super()._expire(threshold)  # type: ignore[misc]
        if self.server.balancer is not None:
            # A worker this one replaced may have written its own count over this one's.
            self.server.balancer.publish()
        if self._leave and not self.left.is_set():
            self._close_listener()
        if self._resume_at is not None and time.monotonic() >= self._resume_at:
            self._resume_at = None
            self._selector.register(  # type: ignore[attr-defined]
                self.server.socket.fileno(), selectors.EVENT_READ, data=self.server
            )

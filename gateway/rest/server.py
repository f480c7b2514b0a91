"""The production WSGI server (cheroot, CherryPy's thread-pool server) for the Flask app.

cheroot's own timeout applies to each socket read, so a client that trickles its body a byte at
a time would hold a worker thread for ever. A watchdog closes the connection of any request still
uploading its body past `request_timeout` (plus a margin, so that a body arriving just in time
still gets its answer). Time spent after the upload is the core's to limit (504).

cheroot answers some requests itself, before the application sees them: a malformed request
line or header, headers over MAX_HEADER_BYTES, a request that stops arriving. Those answers come
in the same JSON error shape as every other, with a code from the one table (`GatewayRequest`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from cheroot import connections, errors, server, wsgi
from flask import Flask

from gateway import metrics
from gateway.core.access import log_access, started_at
from gateway.core.admission import THREAD_QUEUE, waiting_verdict
from gateway.core.dataplane import new_request_id
from gateway.core.errors import ErrorCode, GatewayError
from gateway.rest.balance import MOVE_MARGIN, Balancer, Place
from gateway.rest.dispatch import Dispatcher, header_value, request_start
from gateway.rest.framing import (
    ChunkedBody,
    StrictHeaderReader,
    expects_continue,
    request_line_error,
    unsupported_coding,
)
from gateway.rest.linger import Lingerer
from gateway.rest.responses import EXPOSED_HEADERS, SERVER_METHODS, error_headers, error_json
from gateway.rest.socketfile import (
    Connection,
    KnownLengthBody,
    SocketReader,
    peer_closed,
    set_send_timeout,
)

log = logging.getLogger(__name__)

KEEP_ALIVE_CONNECTIONS = 256
# The request line and headers together. cheroot's default is no limit: a client could make a
# worker buffer one endless header line. Real requests carry a few hundred bytes; nginx's default
# allows 4 x 8 KiB.
MAX_HEADER_BYTES = 64 * 1024
# cheroot's own error answers. Its 414 and 413 are for a request line or headers over the limit
# (its body limit is not used: Werkzeug refuses a body over --max-request-bytes).
_CHEROOT_ERRORS = {
    400: ErrorCode.INVALID_REQUEST,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.HEADERS_TOO_LARGE,
    414: ErrorCode.HEADERS_TOO_LARGE,
    500: ErrorCode.INTERNAL,
    501: ErrorCode.UNSUPPORTED_TRANSFER_CODING,
    # Every thread busy and THREAD_QUEUE connections waiting for one.
    503: ErrorCode.OVERLOADED,
    505: ErrorCode.UNSUPPORTED_HTTP_VERSION,
}
# The first byte of a TLS record carrying a handshake (a ClientHello, to a plain HTTP port).
_TLS_HANDSHAKE = b"\x16"
# Seconds (at most the request timeout) a request line and its headers may take to arrive, from
# when a thread starts reading them. cheroot's read timeout applies to each read, so a client
# sending a header byte every few seconds held a thread for ever: ten of them stopped a worker.
# Real clients send the whole head at once.
HEAD_SECONDS = 10.0
# Answers after which a body left unread closes the connection instead of being read out:
# cheroot closes after every 413; a 401 goes to a client without a token in force, which
# reading out its body (up to --max-request-bytes, at its own pace) let hold a thread, its
# answer waiting until it had sent the lot.
_NOT_READ_OUT = frozenset({401, 413})
# Seconds the refusal thread waits for a client to take a refusal's few hundred bytes.
REFUSAL_SEND_TIMEOUT = 0.2
# What accept() fails with when the process (or the system) has no descriptor or buffer left for
# a new connection: nothing about that client, and the listener stays readable.
_ACCEPT_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Seconds at least between two accepts tried while they fail so.
ACCEPT_PAUSE = 0.5
# The WSGI environ entry: a call answering whether the client has closed its connection.
CLIENT_GONE_KEY = "image_gateway.client_gone"
# The monotonic time cheroot queued the request's connection for a thread: the wait for one is
# the request's time too (its deadline, duration and "is the client still there" count from it).
QUEUED_KEY = "image_gateway.queued_at"


class Watchdog:
    def __init__(self, limit: float, tick: Callable[[], None] = lambda: None) -> None:
        # The core answers 504 at `limit`; the cut comes a little later, for requests stuck in
        # a read that only closing the socket can end.
        self.limit = limit + min(5.0, limit / 2)
        self.head_limit = min(HEAD_SECONDS, limit)
        self.interval = min(0.5, limit / 4)
        # Something else to do every interval (the server's sweep of waiting requests).
        self._tick = tick
        self._lock = threading.Lock()
        # key -> (when it expires, the request or callable, whether it watches a head)
        self._active: dict[int, tuple[float, Any, bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
        self._thread.start()

    def watch(self, req: Any, limit: float | None = None, head: bool = False) -> int:
        """Cut the request's body off if it is still arriving after `limit` seconds (the
        request timeout and its margin by default), or with `head`, its request line and
        headers; `req` may instead be a callable, called then."""
        key = id(req)
        with self._lock:
            self._active[key] = (time.monotonic() + (limit or self.limit), req, head)
        return key

    def release(self, key: int) -> None:
        with self._lock:
            self._active.pop(key, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                expired = [k for k, (deadline, *_) in self._active.items() if deadline < now]
                watches = [self._active.pop(k)[1:] for k in expired]
            for req, head in watches:
                if callable(req):
                    with contextlib.suppress(OSError):
                        req()
                    continue
                # A head's watch that expired as the head came in is no reason to cut the body
                # that follows it: the body has a watch (and a limit) of its own.
                if req.reading_head if head else _still_uploading(req):
                    req.head_cut = head
                    with contextlib.suppress(OSError):  # the client may have closed it already
                        _cut(req.conn)
            try:
                self._tick()
            except Exception:  # the watchdog must outlive anything it is given to do
                log.exception("the HTTP watchdog's sweep failed")


def _cut(conn: Any) -> None:
    """Stop a connection's upload; the request then fails as timed out (408), and is answered."""
    if isinstance(conn.rfile, SocketReader):
        conn.rfile.cut()
    else:  # a reader of cheroot's own: only closing both ways ends its read
        conn.socket.shutdown(socket.SHUT_RDWR)


def _still_uploading(req: Any) -> bool:
    rfile = req.rfile
    if isinstance(rfile, server.KnownLengthRFile):
        return bool(rfile.remaining > 0)
    if isinstance(rfile, ChunkedBody):
        return not rfile.finished
    return False


def _gateway_with(watchdog: Watchdog) -> type[wsgi.Gateway_10]:
    class WatchedGateway(wsgi.Gateway_10):
        # cheroot's stubs say get_environ returns None; it returns the environ.
        def get_environ(self) -> dict[str, Any]:  # type: ignore[override]
            req = self.req
            if type(req.rfile) is server.KnownLengthRFile:
                req.rfile = KnownLengthBody(req.rfile.rfile, req.rfile.remaining)
            elif type(req.rfile) is server.ChunkedRFile:
                req.rfile = ChunkedBody(req.rfile.rfile, req.server.max_body)
            if req.continue_owed:
                req.rfile.before_first_read = req.send_continue
            env: dict[str, Any] = super().get_environ()  # type: ignore[no-untyped-call]
            env[CLIENT_GONE_KEY] = functools.partial(peer_closed, req.conn.socket)
            # Once: a next request on the connection, read by the same thread, was not queued.
            queued = getattr(req.conn, "queued_at", None)
            if queued is not None:
                req.conn.queued_at = None
                env[QUEUED_KEY] = queued
            return env

        def respond(self) -> Any:
            key = watchdog.watch(self.req)
            try:
                return super().respond()
            finally:
                watchdog.release(key)

        def write(self, chunk: bytes) -> None:
            # cheroot sends the status line and headers, then each chunk, each with a send of
            # its own (its writer flushes every write): two packets for every answer, and the
            # client woken twice. The first chunk goes out with the headers in one send.
            req = self.req
            if not req.sent_headers and (b"Connection", b"close") in req.outheaders:
                # cheroot would otherwise read out the rest of an unread body first, however
                # long it takes to come.
                req.close_connection = True
            if req.sent_headers or not chunk:
                super().write(chunk)
                return
            wfile = req.conn.wfile
            parts: list[bytes] = []
            wfile.write = parts.append
            try:
                super().write(chunk)
            finally:
                del wfile.write
                if parts:
                    wfile.write(b"".join(parts))

    return WatchedGateway


class GatewayRequest(server.HTTPRequest):
    """cheroot's request, whose own error answers are JSON errors from the table, each with a
    request id, an access record and a count in the metrics. The connection ends with them.
    Its header fields are read strictly (gateway.rest.framing), and a body the app leaves
    unread is never read into memory (`send_headers`)."""

    _strict_headers = StrictHeaderReader()
    # The client asked to be told to send its body (Expect: 100-continue), and has not been yet.
    continue_owed = False
    # Set while the request line and headers are read, and once the watchdog has cut them off.
    reading_head = False
    head_cut = False

    def parse_request(self) -> None:
        watchdog = self.server.watchdog
        self.reading_head = True
        key = watchdog.watch(self, watchdog.head_limit, head=True)
        try:
            super().parse_request()
        finally:
            self.reading_head = False
            watchdog.release(key)

    def header_reader(self, rfile: Any, hdict: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """Strict headers, and Expect kept from cheroot, which answers 100 Continue as soon as
        it sees it: a request refused from its headers (a wrong route, model or type, a body
        over the limit) then had its body sent for nothing. The 100 goes out when the app first
        reads the body (`send_continue`), the option cheroot's own comments describe."""
        headers = self._strict_headers(rfile, hdict)
        expect = headers.pop(b"Expect", None)
        # RFC 9110 10.1.1: an HTTP/1.0 client's Expect is ignored.
        if expect is not None and expects_continue(expect):
            self.continue_owed = self.response_protocol == "HTTP/1.1"
        return headers

    def send_continue(self) -> None:
        if self.continue_owed:
            self.continue_owed = False
            self.conn.wfile.write(f"{self.server.protocol} 100 Continue\r\n\r\n".encode())

    def read_request_line(self) -> bool:
        if not self._read_request_line():
            return False
        # What cheroot takes leniently (gateway.rest.framing).
        error = request_line_error(self.method, self.uri, self.request_protocol)
        if error is not None:
            self.simple_response("400 Bad Request", error)
            return False
        return True

    def _read_request_line(self) -> bool:
        reader = self.conn.rfile
        if isinstance(reader, SocketReader):
            buffered = bytes(reader.peek(1))
            # A TLS client (an https:// URL for this plain HTTP port) opens with a handshake
            # record and then waits for the server's: no line end ever comes, and cheroot
            # waited for one until the read timeout (10 s) before answering a 408 the client
            # could not read. Closing at once lets the client fail at once, with its own error.
            if buffered[:1] == _TLS_HANDSHAKE:
                self.close_connection = True
                return False
            # The first line, past the one empty line cheroot skips; all of what has come if
            # the line is not whole yet.
            start = 2 if buffered.startswith(b"\r\n") else 0
            end = buffered.find(b"\n", start)
            if buffered.find(b"//", start, end if end >= 0 else len(buffered)) >= 0:
                return self._read_request_line_in_origin_form()
        return bool(super().read_request_line())  # type: ignore[no-untyped-call]

    def _read_request_line_in_origin_form(self) -> bool:
        """cheroot refused a request-target in absolute form (`http://host/path`), which RFC
        9112 3.2.2 says a server must accept, and one starting `//` (`//v1/infer`, from a base
        URL ending in "/" joined to a path), which it took for a host name. The target is made
        a plain path, runs of slashes in it merged into one, as nginx does."""
        rest = self.rfile
        lines = [rest.readline()]
        if lines[0] == b"\r\n":
            lines.append(rest.readline())
        self.rfile = _FirstLines([*lines[:-1], origin_form(lines[-1])], rest)
        try:
            return bool(super().read_request_line())  # type: ignore[no-untyped-call]
        finally:
            self.rfile = rest

    def read_request_headers(self) -> bool:
        # cheroot's stubs leave it unannotated; it returns whether to go on with the request.
        closing = self.close_connection
        if not super().read_request_headers():  # type: ignore[no-untyped-call]
            return False
        # cheroot compares the whole Connection value, case and all: "Close" or "keep-alive,
        # close" kept an HTTP/1.1 connection open, and an HTTP/1.0 "keep-alive" closed it.
        # RFC 9110 7.6.1: a comma-separated list of case-insensitive options.
        options = {o.strip().lower() for o in self.inheaders.get(b"Connection", b"").split(b",")}
        if b"close" in options:
            self.close_connection = True
        elif self.response_protocol != "HTTP/1.1" and b"keep-alive" in options:
            self.close_connection = closing
        if self.response_protocol == "HTTP/1.1" and b"Host" not in self.inheaders:
            # RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request without Host.
            self.simple_response("400 Bad Request", "an HTTP/1.1 request needs a Host header")
            return False
        if self.response_protocol != "HTTP/1.1" and b"Transfer-Encoding" in self.inheaders:
            # cheroot reads no Transfer-Encoding from HTTP/1.0 and frames the body as empty;
            # RFC 9112 6.1: such framing is faulty, and the connection must close.
            self.simple_response("400 Bad Request", "Transfer-Encoding in an HTTP/1.0 request")
            return False
        if unsupported_coding(self.inheaders):
            # cheroot refuses every coding but chunked (501), but takes an empty list of them
            # for no Transfer-Encoding at all (the body was read as the next request), and
            # `\x0bchunked` for chunked.
            self.simple_response("501 Not Implemented")
            return False
        return True

    def send_headers(self) -> None:
        """Settle a body the app has not read (a route that failed first, or one that never
        reads) before the answer goes out. cheroot read what was left of a body of known length
        in one piece, however large (a Content-Length of 10^12 on a 404 route was a
        MemoryError and no answer), and left a chunked one on the connection, where it was read
        as the next request. Now a body of known length up to the server's body limit is read
        and dropped a piece at a time, so the connection can carry the next request, unless
        the answer is a 401 or 413 (`_NOT_READ_OUT`); any other unread body closes the
        connection after the answer."""
        body = self.rfile
        if isinstance(body, ChunkedBody):
            unread = not body.finished
        else:
            unread = getattr(body, "remaining", 0) > 0
        if (
            unread
            # The client waits to be told to send it: it may never come.
            and not self.continue_owed
            # Answers that close anyway: cheroot closes after every 413.
            and not self.close_connection
            and int(self.status[:3]) not in _NOT_READ_OUT
            and isinstance(body, KnownLengthBody)
            and body.remaining <= self.server.max_body
        ):
            try:
                body.discard()
                unread = False
            except (OSError, GatewayError):  # a client gone or too slow: nothing left to keep
                pass
        reader = self.conn.rfile
        # A cancelled answer goes to a client that has left, or half-closed its connection,
        # which counts as leaving: such a client reads why, and a request it pipelined behind
        # is not answered on a connection judged gone (it was).
        cancelled = int(self.status[:3]) == ErrorCode.CANCELLED.http_status
        # The watchdog may cut a body that ends as it looks: nothing more can be read then.
        if unread or cancelled or (isinstance(reader, SocketReader) and reader.was_cut):
            self.close_connection = True
            if isinstance(reader, SocketReader):
                reader.body_left = True
        super().send_headers()

    # Set on a request answered without being read (refused): its head is still in the socket.
    unread = False

    def _client_header(self, field: bytes) -> str | None:
        """A header field the client sent (`field` in lower case), where its head can be had:
        read already, or still to be read (peeked at, not read) for a request refused unread or
        at its request line. None when it has not arrived."""
        for name, value in self.inheaders.items():
            if name.lower() == field:
                return bytes(value).decode("latin-1")
        if self.unread:
            start = request_start(self.conn)
        elif self.started_request and not self.inheaders:
            # Its request line is read: its header lines come next. A line in its place lets
            # them be read as any head's.
            start = b"-\r\n" + (request_start(self.conn) or b"")
        else:
            return None
        return header_value(start, field) if start else None

    def simple_response(self, status: Any, msg: Any = "", error: ErrorCode | None = None) -> None:
        started = _arrival(self.conn)
        if error is None:
            # Any status cheroot may add later is answered with a code and status of the table.
            error = _CHEROOT_ERRORS.get(int(str(status)[:3]), ErrorCode.INVALID_REQUEST)
        sent = error.http_status
        message = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)
        if error is ErrorCode.REQUEST_TIMEOUT and self.head_cut:
            message = (
                "the request line and headers did not arrive within "
                f"{self.server.watchdog.head_limit:g} s"
            )
        elif error is ErrorCode.REQUEST_TIMEOUT:
            message = f"the request stopped arriving: nothing came for {self.server.timeout} s"
        elif error is ErrorCode.HEADERS_TOO_LARGE:
            message = f"the request line and headers are over {MAX_HEADER_BYTES // 1024} KiB"
        elif error is ErrorCode.UNSUPPORTED_TRANSFER_CODING:
            message = "a Transfer-Encoding other than chunked; this server reads only chunked"
        elif error is ErrorCode.UNSUPPORTED_HTTP_VERSION:
            message = "an HTTP version this server does not speak; it serves HTTP/1.0 and 1.1"
        elif error is ErrorCode.METHOD_NOT_ALLOWED:
            # cheroot's one 405: CONNECT, which asks a proxy for a tunnel.
            message = (
                f"CONNECT is for proxies, and this server is not one; it serves {SERVER_METHODS}"
            )
        elif error is ErrorCode.OVERLOADED and not message:
            message = (
                f"every HTTP thread of this worker is busy and {THREAD_QUEUE} connections "
                "wait for one; retry later"
            )
        request_id = new_request_id(self._client_header(b"x-request-id"))
        error_body = error_json(error.code, message or HTTPStatus(sent).phrase, request_id)
        # As Flask writes JSON: compact, one line.
        body = json.dumps(error_body, separators=(",", ":")) + "\n"
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-Request-ID": request_id,
            **error_headers(sent),
            # A 405 says what is allowed (RFC 9110 15.5.6).
            **({"Allow": SERVER_METHODS} if sent == 405 else {}),
            # As the app's answers have them: else a page on an allowed origin gets a network
            # error instead of this answer (and a 503's Retry-After).
            **cors_headers(self._client_header(b"origin"), self.server.cors_origins),
            # Whatever the status: the request was not (wholly) read.
            "Connection": "close",
        }
        head = f"{self.server.protocol} {sent} {HTTPStatus(sent).phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.close_connection = True
        try:
            self.conn.wfile.write((head + "\r\n" + body).encode("latin-1"))
        except OSError as exc:
            if exc.args[0] not in errors.socket_errors_to_ignore:
                raise
        finally:
            # One method label for all: a client's own method token must not become a label.
            log_access(
                request_id=request_id,
                protocol="http",
                method="-",
                model="",
                images=0,
                status=str(sent),
                bytes_in=0,
                bytes_out=len(body),
                started=started,
                error=error.code,
            )


class _FirstLines:
    """A reader that gives `lines` to the first readlines, then reads from `rest`."""

    def __init__(self, lines: list[bytes], rest: Any) -> None:
        self._lines = lines
        self._rest = rest

    def readline(self, size: int = -1) -> bytes:
        return self._lines.pop(0) if self._lines else self._rest.readline(size)


_ABSOLUTE_FORM = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)
_SLASHES = re.compile(rb"//+")


def origin_form(line: bytes) -> bytes:
    """A request line with its target as a path: the scheme and host of an absolute-form
    target dropped, runs of slashes in the path merged. Anything that is not
    METHOD SP target SP version is left for cheroot to refuse."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return line
    method, target, version = parts
    if absolute := _ABSOLUTE_FORM.match(target):
        target = target[absolute.end() :]
        if not target.startswith(b"/"):
            target = b"/" + target
    path, question, query = target.partition(b"?")
    path = _SLASHES.sub(b"/", path)
    return b" ".join((method, path + question + query, version))


class HttpConnection(Connection):
    RequestHandlerClass = GatewayRequest
    # Counted among the connections this worker holds (gateway.rest.balance) until closed.
    _counted = False

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

    _moved = False

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


class _Handed:
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
        self.handed = _Handed()
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

    def _expire(self, threshold: float) -> None:
        # The loop calls this every 0.5 s or so whatever else happens, listener or not.
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


class HttpServer(wsgi.Server):
    """cheroot's WSGI server, with the upload watchdog that lives and stops with it, reading
    its sockets through C io (gateway.rest.socketfile)."""

    ConnectionClass = HttpConnection

    def __init__(
        self,
        *args: Any,
        request_timeout: float,
        max_body: int,
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
        self.request_timeout = request_timeout
        self._draining = draining
        self.watchdog = Watchdog(request_timeout, self._sweep_waiting)
        self.gateway = _gateway_with(self.watchdog)
        self.dispatcher = Dispatcher(self)
        self.lingerer = Lingerer()

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
        if isinstance(conn, _Handed):
            self._connections.take_handed()
            return
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
        metrics.WAITING_FOR_THREAD.labels("http").set(self.requests.qsize)
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
            try:
                # The answer is a courtesy, and this thread answers every refusal: a client
                # that does not read does not hold it.
                set_send_timeout(conn.socket, REFUSAL_SEND_TIMEOUT)
                if error is ErrorCode.CANCELLED or peer_closed(conn.socket):
                    # Nobody to answer: counted as a client that left (499), as when a thread
                    # finds one gone.
                    _record_gone(conn)
                else:
                    status = f"{error.http_status}" if error else "503 Service Unavailable"
                    refusal = GatewayRequest(self, conn)
                    refusal.unread = True
                    refusal.simple_response(status, message, error)
            except OSError:
                pass  # the answer is a courtesy; the client may be gone
            except Exception:
                # This one thread answers every refused connection: it must outlive any of them.
                log.exception("answering a refused connection failed")
            # cheroot sets `linger` here, leaving the socket to the garbage collector: closed
            # later with the request unread in it, it sends a reset, which destroyed the answer
            # before the test's client read it. Closed now, with what has come of the request
            # dropped first, it ends with a FIN after the answer.
            if isinstance(conn.rfile, SocketReader):
                conn.rfile.body_left = True
            with contextlib.suppress(OSError):
                conn.close()


def _record_gone(conn: Any) -> None:
    log_access(
        request_id=new_request_id(),
        protocol="http",
        method="-",
        model="",
        images=0,
        status=str(ErrorCode.CANCELLED.http_status),
        bytes_in=0,
        bytes_out=0,
        started=_arrival(conn),
        error=ErrorCode.CANCELLED.code,
    )


def _arrival(conn: Any) -> float:
    # When the connection's request came, if the server stamped it (a request answered without
    # a thread: its recorded duration is its wait).
    return started_at(getattr(conn, "queued_at", None))


def build_http_server(
    app: Flask,
    host: str,
    port: int,
    threads: int,
    request_timeout: float,
    shutdown_grace: float,
    max_body: int,
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


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers flask-cors gives the app's answers (gateway.rest.app), for the answers
    the server makes itself: the origin echoed when allowed, X-Request-ID and Retry-After
    readable."""
    if not origin or not allowed:
        return {}
    headers = {} if "*" in allowed else {"Vary": "Origin"}
    if "*" in allowed or origin.casefold() in {o.casefold() for o in allowed}:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSED_HEADERS)
    return headers

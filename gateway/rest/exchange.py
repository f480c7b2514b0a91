"""One request and its answer on a connection, as cheroot reads and writes them.

cheroot answers some requests itself, before the application sees them: a malformed request
line or header, headers over MAX_HEADER_BYTES, a request that stops arriving. Those answers come
in the same JSON error shape as every other, with a code from the one table (`GatewayRequest`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from http import HTTPStatus
from typing import Any

from cheroot import errors, server, wsgi

from gateway.core.access import log_access, started_at
from gateway.core.admission import THREAD_QUEUE
from gateway.core.dataplane import new_request_id
from gateway.core.errors import ErrorCode, GatewayError
from gateway.rest.dispatch import header_value
from gateway.rest.framing import (
    ChunkedBody,
    StrictHeaderReader,
    expects_continue,
    request_line_error,
    unsupported_coding,
)
from gateway.rest.heads import MAX_HEADER_BYTES, TLS_HANDSHAKE, request_start, socket_holds
from gateway.rest.responses import EXPOSED_HEADERS, SERVER_METHODS, error_headers, error_json
from gateway.rest.socketfile import KnownLengthBody, SocketReader, peer_closed
from gateway.rest.watchdog import Watchdog

log = logging.getLogger(__name__)

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
# Answers after which a body left unread closes the connection instead of being read out:
# cheroot closes after every 413; a 401 goes to a client without a token in force, which
# reading out its body (up to --max-request-bytes, at its own pace) let hold a thread, its
# answer waiting until it had sent the lot.
_NOT_READ_OUT = frozenset({401, 413})
# The WSGI environ entry: a call answering whether the client has closed its connection.
CLIENT_GONE_KEY = "image_gateway.client_gone"
# The monotonic time cheroot queued the request's connection for a thread: the wait for one is
# the request's time too (its deadline, duration and "is the client still there" count from it).
QUEUED_KEY = "image_gateway.queued_at"


def gateway_with(watchdog: Watchdog) -> type[wsgi.Gateway_10]:
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
            req.rfile.after_last_read = req.body_read
            if isinstance(req.conn.rfile, SocketReader):
                req.conn.rfile.before_waiting(req.body_awaited)
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


class BodyReaders:
    """The HTTP threads of a server reading a request body that had not all come when they
    took the request: one sent only once the client is told to (Expect: 100-continue), or one
    arriving past what the selector holds (gateway.rest.heads). Each holds
    its thread for as long as its client takes to send the body, up to the request timeout, so
    clients that trickle such bodies could take every thread. A client that waits to be told
    to send its body costs nothing yet, and is refused (`overloaded`) instead of told, once
    `most` threads read bodies so: the rest are left to requests that have come whole."""

    def __init__(self, threads: int) -> None:
        # One thread at least: with one in all, none can be left free, and every client that
        # asks first (curl does, for large bodies) would be refused.
        self.most = max(threads - 1, 1)
        self.threads = threads
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def take(self, refusable: bool = False) -> bool:
        """Count one more; with `refusable`, not past `most`: whether it is counted."""
        with self._lock:
            if refusable and self._count >= self.most:
                return False
            self._count += 1
            return True

    def drop(self) -> None:
        with self._lock:
            self._count -= 1


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
    # Counted among the server's BodyReaders: its body is read as it arrives.
    awaiting_body = False

    def respond(self) -> None:
        try:
            super().respond()
        finally:
            # Whatever ended the request (an answer, an error, the client gone, the watchdog's
            # cut), and before its thread takes the connection's next request or hands it on.
            self.body_read()

    def body_awaited(self) -> None:
        """The thread is about to wait for more of the body (from the reader, once)."""
        if not self.awaiting_body:
            self.server.body_readers.take()
            self.awaiting_body = True

    def body_read(self) -> None:
        """The body has all been read, or the request has ended."""
        reader = self.conn.rfile
        if isinstance(reader, SocketReader):
            reader.before_waiting(None)
        if self.awaiting_body:
            self.awaiting_body = False
            self.server.body_readers.drop()

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
        if not self.continue_owed:
            return
        reader = self.conn.rfile
        # A client that has begun its body without waiting to be told (curl waits 1 s) is read
        # as any other, and counted once its thread has to wait for the rest.
        waits = not isinstance(reader, SocketReader) or not (
            reader.unread or socket_holds(self.conn.socket)
        )
        if waits and not self.awaiting_body:
            readers = self.server.body_readers
            if not readers.take(refusable=True):
                # The client has not sent its body: refused now, it never does, and the
                # connection closes after the answer (send_headers) with nothing to read out.
                raise GatewayError(
                    ErrorCode.OVERLOADED,
                    f"{readers.count} of this worker's {readers.threads} HTTP threads are "
                    "reading request bodies as they arrive, as many as it lets; retry later",
                )
            self.awaiting_body = True
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
        """cheroot refused a request-target in absolute form (`http://host/path`), which RFC
        9112 3.2.2 says a server must accept, and one starting `//` (`//v1/infer`, from a base
        URL ending in "/" joined to a path), which it took for a host name. The target is made
        a plain path, runs of slashes in it merged into one, as nginx does.

        Decided on the whole line, read through cheroot's size check (a line over the limit is
        its 414): deciding from the bytes buffered when the request was first looked at made
        the same line, cut in two by the network or by the end of the read buffer, a 400 or a
        404 where whole it was a 200."""
        reader = self.conn.rfile
        # A TLS client (an https:// URL for this plain HTTP port) opens with a handshake record
        # and then waits for the server's: no line end ever comes, and cheroot waited for one
        # until the read timeout (10 s) before answering a 408 the client could not read.
        # Closing at once lets the client fail at once, with its own error.
        if isinstance(reader, SocketReader) and reader.peek(1)[:1] == TLS_HANDSHAKE:
            self.close_connection = True
            return False
        rest = self.rfile
        lines = [rest.readline()]
        # The one empty line before a request line that cheroot skips.
        if lines[0] == b"\r\n":
            lines.append(rest.readline())
        # Both forms rewritten hold "//"; any other line goes to cheroot as it came.
        if b"//" in lines[-1]:
            lines[-1] = origin_form(lines[-1])
        self.rfile = _FirstLines(lines, rest)
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
        elif error is ErrorCode.REQUEST_TIMEOUT and not message:
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
                # What came of a body awaited in the selector, for a request answered unread.
                bytes_in=self.conn.body_in if self.unread else 0,
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


def record_gone(conn: Any) -> None:
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

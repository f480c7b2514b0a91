"""Where an HTTP/1.1 request ends, read strictly: its request line, header fields and a chunked
body.

cheroot reads all three leniently. When a server and a proxy in front of it disagree on where a
request's body ends, the rest of one request is read as another (request smuggling), and cheroot
also lets a client grow a worker's memory without bound. What it did, each fixed here:

- the request line: the version's numbers were read with int(), which takes a sign, spaces,
  underscores and leading zeros (`HTTP/1.-5` was served as HTTP/1.0, with no Host needed, and
  `HTTP/01.1` as HTTP/1.1), and the method and target could hold any byte but SP (a NUL
  before `GET` was answered 405, one in the path 404);
- header fields: the last of two different Content-Length headers won; Content-Length and
  Transfer-Encoding together were taken (chunked winning, the connection kept); a space before
  the colon was ignored; a folded line replaced the value it continued; Content-Length accepted
  `+5`, `-1` and `5_0`; NUL and a bare CR passed in values; a Transfer-Encoding naming no
  coding (an empty value, or commas) was taken for none, so the request was framed as
  bodiless and its body read as the next request; a VT or FF next to `chunked` was dropped
  as if it were a space;
- a chunked body: the chunk-size line was read without a length limit; sizes such as `0x5`,
  `+5` and `-1` passed, and a bare CR or NUL in a chunk extension; the trailer section was
  never read, so it was taken for the next request; each chunk was read whole into memory,
  then sliced off a piece at a time (a 16 MiB chunk cost 0.76 s of CPU against 0.03 s in 1 MiB
  chunks).

Every refusal is a ValueError for cheroot to answer 400, or a GatewayError for the app's JSON
error handler.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

from cheroot import server

from gateway.core.errors import ErrorCode, GatewayError
from gateway.rest.heads import MAX_LINE, MAX_TRAILERS

_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# name ":" value CRLF, the value without CR, LF or NUL (RFC 9110 5.5). No two parts of it can
# take the same bytes, so a failing line is not retried in other splits: a lazy value followed
# by optional spaces had taken seconds on a 60 KB line of spaces.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):([^\r\n\x00]*)\r\n")
_DIGITS = re.compile(rb"[0-9]+")
_METHOD = re.compile(_TOKEN)
# Control bytes but HTAB, which RFC 9110 5.5 allows in a field's value as whitespace.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# Controls, SP and DEL: no request-target holds them unescaped (RFC 3986).
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
# Fields whose repeats join into one comma-separated value, as cheroot joins them.
_COMMA_SEPARATED = frozenset(server.comma_separated_headers)  # type: ignore[attr-defined]


class StrictHeaderReader(server.HeaderReader):
    """cheroot's header reader, refusing what RFC 9112 says a server must refuse or may, where
    accepting it lets two readers of one request disagree."""

    def __call__(self, rfile: Any, hdict: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
        headers: dict[bytes, bytes] = {} if hdict is None else hdict
        while True:
            line = rfile.readline()
            if not line:
                raise ValueError("Illegal end of headers.")
            if line == b"\r\n":
                break
            if not line.endswith(b"\r\n"):
                raise ValueError("HTTP requires CRLF terminators")
            field = _FIELD.fullmatch(line)
            if field is None:
                raise ValueError(_field_error(line))
            name, value = field[1], field[2].strip(b" \t")
            if b"_" in name:
                # WSGI names Content_Length and Content-Length alike (HTTP_CONTENT_LENGTH): the
                # app could take a different length or coding than the server framed the body
                # with. Dropped, as nginx drops them by default.
                continue
            key = name.title()
            if key == b"Host" and key in headers:
                raise ValueError("two Host headers")
            if key == b"Content-Length" and headers.get(key, value) != value:
                raise ValueError("two different Content-Length headers")
            if (key in _COMMA_SEPARATED or key == b"Authorization") and headers.get(key):
                # Authorization is one field (RFC 9110 11.6.2), yet the last of two had won,
                # where a proxy in front may read the first: joined, as a list, they are no
                # credential a server takes.
                value = headers[key] + b", " + value
            headers[key] = value
        length = headers.get(b"Content-Length")
        if length is not None and not _DIGITS.fullmatch(length):
            raise ValueError(f"malformed Content-Length {length[:64]!r}")
        if length is not None and b"Transfer-Encoding" in headers:
            raise ValueError("both Content-Length and Transfer-Encoding")
        # cheroot answers 501 for a coding it lacks, but not for chunked twice.
        if _list(headers.get(b"Transfer-Encoding", b"")).count(b"chunked") > 1:
            raise ValueError("chunked applied twice")
        return headers


def request_line_error(method: bytes, target: bytes, version: bytes) -> str | None:
    """What is wrong with a request line cheroot has taken, by RFC 9112 3: a method that is not
    a token, a target holding a control byte, a version other than HTTP/DIGIT.DIGIT. None when
    nothing is."""
    if not _METHOD.fullmatch(method):
        return f"malformed method {method[:64]!r}"
    if _NOT_IN_TARGET.search(target):
        return "a control byte in the request target"
    if not _VERSION.fullmatch(version):
        return f"malformed HTTP version {version[:64]!r}"
    return None


def _list(value: bytes) -> list[bytes]:
    """A comma-separated field's members, lowercased, as cheroot splits them."""
    return [m.strip(b" \t").lower() for m in value.split(b",") if m.strip(b" \t")]


def unsupported_coding(headers: dict[bytes, bytes]) -> bool:
    """Whether a request has a Transfer-Encoding field naming anything but chunked, read as RFC
    9110 reads a list (members between commas, SP and HTAB around them). cheroot refuses every
    coding but chunked (501) too, but reads the list with bytes.strip, which also drops VT and
    FF: `\x0bchunked` was read as chunked, where a proxy in front reads a coding it does not
    know. And it takes a field naming no coding (empty, or commas only) for no Transfer-Encoding
    at all, whose final coding is then not chunked either: RFC 9112 6.3 says such a body has no
    length a server can rely on. Each is refused (501), with the connection closed."""
    value = headers.get(b"Transfer-Encoding")
    if value is None:
        return False
    codings = _list(value)
    return not codings or any(coding != b"chunked" for coding in codings)


def expects_continue(value: bytes) -> bool:
    """Whether an Expect field (its repeats joined) asks for 100 Continue and nothing else."""
    members = _list(value)
    return bool(members) and all(m == b"100-continue" for m in members)


def _field_error(line: bytes) -> str:
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding (a header line starting with a space)"
    name, colon, _ = line.partition(b":")
    if not colon or not re.fullmatch(_TOKEN, name):
        return f"malformed header name {name[:64]!r}"
    return f"header {name.decode('ascii')} holds a CR, LF or NUL"


class ChunkedBody(io.RawIOBase):
    """A chunked request body, read into the caller's buffer a piece at a time.

    `finished` once the last chunk and the trailer section (dropped) are read: only then may the
    connection carry another request. A client that closes before the end raises
    ConnectionError, which Werkzeug reports as the client gone.
    """

    def __init__(self, rfile: Any, limit: int) -> None:
        super().__init__()
        self._rfile = rfile
        self._limit = limit  # bytes of data, refused from the chunk size that passes it
        self._total = 0
        self._left = 0  # bytes of the current chunk still to read
        self._chunk_ended = True  # the CRLF after a chunk's data has been read
        self.finished = False
        self.bytes_read = 0  # of data, chunk framing left out
        # Called once, before the first read (to send 100 Continue), and once the body has ended.
        self.before_first_read: Callable[[], None] | None = None
        self.after_last_read: Callable[[], None] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        if self.before_first_read is not None:
            self.before_first_read()
            self.before_first_read = None
        while self._left == 0:
            if self.finished:
                return 0
            if not self._chunk_ended:
                end = self._rfile.read(2)
                if len(end) < 2:
                    raise ConnectionError("the client closed the connection after a chunk")
                if end != b"\r\n":
                    raise _malformed("a chunk's data is not followed by CRLF")
                self._chunk_ended = True
            self._left = self._next_size()
            self._total += self._left
            if self._total > self._limit:
                raise GatewayError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the chunked body is larger than this gateway accepts ({self._limit} bytes)",
                )
            if self._left == 0:
                self._read_trailers()
                self.finished = True
                if self.after_last_read is not None:
                    self.after_last_read()
                    self.after_last_read = None
                return 0
            self._chunk_ended = False
        n = int(self._rfile.readinto(view[: self._left]))
        if n == 0:
            raise ConnectionError("the client closed the connection inside a chunk")
        self._left -= n
        self.bytes_read += n
        return n

    def _line(self, what: str) -> bytes:
        line = bytes(self._rfile.readline(MAX_LINE))
        if not line:
            raise ConnectionError(f"the client closed the connection before a {what}")
        if not line.endswith(b"\r\n"):
            raise _malformed(f"a {what} over {MAX_LINE} bytes or without CRLF")
        return line[:-2]

    def _next_size(self) -> int:
        # chunk-size [ chunk-ext ] CRLF; extensions are ignored, as RFC 9112 allows, but may
        # not hold a control byte: a bare CR there is a line end to some readers (RFC 9112 2.2).
        size, _, extensions = self._line("chunk-size line").partition(b";")
        size = size.rstrip(b" \t")
        if not _HEX_SIZE.fullmatch(size):
            raise _malformed(f"bad chunk size {size[:32]!r}")
        if _CONTROL.search(extensions):
            raise _malformed(f"a control byte in a chunk extension: {extensions[:32]!r}")
        return int(size, 16)

    def _read_trailers(self) -> None:
        # Dropped, but each must be a field: a request line here would be read as one by a
        # proxy that ends the body differently. MAX_TRAILERS fields, then the empty line.
        for _ in range(MAX_TRAILERS + 1):
            line = self._line("trailer line")
            if not line:
                return
            if not _FIELD.fullmatch(line + b"\r\n"):
                raise _malformed(f"a trailer line that is not a header field: {line[:64]!r}")
        raise _malformed(f"more than {MAX_TRAILERS} trailer lines")


def _malformed(detail: str) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_REQUEST, f"malformed chunked body: {detail}")

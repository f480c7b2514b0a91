"""How much of a connection's next request has arrived, found out without waiting for the
client and without reading it for the thread that will.

A thread that starts reading a head the client has only begun to send waits for the rest, for up
to the head time (10 s). One byte of a request line was enough to take a thread that long, so a
few clients sending a byte now and then (slowloris) held every HTTP thread of a worker. So a
thread gets a connection only once its head can be read without waiting (`head_readable`):
until then, the selector thread takes what arrives of it into the connection's reader
(gateway.rest.socketfile.SocketReader.gather_head) and the connection waits in the selector,
as nginx waits for a whole head before it does anything with a request.

The same goes for a body, of known length or chunked, that has not all come when its head has
(`awaited_body`): a thread reading it waited for each piece, so as many slow uploads as threads
stopped every HTTP request of a worker for up to the request timeout. The selector takes it in
instead, and the connection goes to a thread once the whole request is there, as nginx buffers
a body before it passes the request on; or, for a body over AWAITED_BODY_BYTES, once that much
of it is: a client that sends that much is no slowloris, and the rest goes from the socket
straight into the request's buffer. Past AWAITED_BYTES_MAX held by a worker, a thread reads a
body as it comes, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from typing import Any

# The request line and headers together. cheroot's default is no limit: a client could make a
# worker buffer one endless header line. Real requests carry a few hundred bytes; nginx's default
# allows 4 x 8 KiB.
MAX_HEADER_BYTES = 64 * 1024
# What request_start answers for a connection it cannot peek at (TLS): no request starts so.
UNREADABLE = b"\0"
# Bytes of a request start looked at (a probe's request line and headers fit in this).
PEEK_BYTES = 4096
# The first byte of a TLS record carrying a handshake (a ClientHello, to a plain HTTP port).
TLS_HANDSHAKE = b"\x16"
# A chunk-size or trailer line (real ones are a few bytes), and the trailer lines a chunked body
# may have: what the reader takes (gateway.rest.framing), and the selector's look at where one
# ends.
MAX_LINE = 4096
MAX_TRAILERS = 64
# How much of a body is awaited in the selector: a larger one goes to a thread once this much of
# it has come. Most images are well under this (a 4000x3000 JPEG is 2-5 MB), and it is what the
# selector holds at most for one request (a copy more for its thread to make).
AWAITED_BODY_BYTES = 8 << 20
# Bytes of bodies held at once by one worker's selector while the rest of each comes; past this,
# a connection whose body has not all come goes to a thread with what it has. What arrives is
# counted, not what is announced: an announced length costs nothing until it is sent.
AWAITED_BYTES_MAX = 64 << 20


def head_readable(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether a thread can read the head that `data` begins without waiting for more: the head
    has ended (CR LF CR LF), or what came holds something the reader refuses at once (a line
    end without its CR, answered 400, or a TLS handshake). `start`: where in `data` to look
    from, what came before holding neither.

    The selector asks this each time more of a head comes, of up to 64 KiB: so bytes' own find
    and count, not a regular expression, which took some 30 ns a byte (its look-behind for the
    CR defeats the search for a literal), 100 us and more each time a slow client sent a byte."""
    if data[:1] == TLS_HANDSHAKE:
        return True
    start = max(0, start)
    # A CR LF CR LF may straddle `start`.
    if data.find(b"\r\n\r\n", max(0, start - 3)) >= 0:
        return True
    # A bare LF: more LFs from `start` on than CR LF pairs whose LF is there (each pair holds one
    # LF, and pairs never overlap).
    return data.count(b"\n", start) > data.count(b"\r\n", max(0, start - 1))


def fields(start: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The header fields (lower-case name, value) whole in the head that `start` begins, and
    whether the head has ended there."""
    head, ended, _ = start.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    if not ended:
        lines = lines[:-1]  # the last line may be cut short
    found = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep:
            found.append((name.strip().lower(), value.strip()))
    return found, bool(ended)


def awaited_body(
    start: bytes, limit: int, token_needed: bool = False
) -> tuple[int, int, bool] | None:
    """(the head's length, how much of the body to await: all of it, up to AWAITED_BODY_BYTES,
    and whether it is chunked) for a request whose body may be awaited in the selector: its
    head whole in `start`, its body framed by one Content-Length of digits alone, at most
    `limit` (the app's: a body over it is refused from its head at once, 413), or by
    `Transfer-Encoding: chunked` alone in an HTTP/1.1 request (its end is found from its
    chunks, `chunked_end`); and, with `token_needed`, an Authorization field (without one it is
    refused from its head at once, 401, and a client that waits for that before it sends its
    body must not wait for ever). None for anything else, which a thread reads as it comes: no
    body, one the client sends only once told to (Expect), and framing a thread refuses at
    once."""
    end = start.find(b"\r\n\r\n")
    if end < 0:
        return None
    found, _ = fields(start[: end + 4])
    lengths = [value for name, value in found if name == b"content-length"]
    codings = [value for name, value in found if name == b"transfer-encoding"]
    if any(name == b"expect" for name, _ in found):
        return None
    if token_needed and all(name != b"authorization" for name, _ in found):
        return None
    if codings:
        version = start[: start.find(b"\r\n")].rpartition(b" ")[2]
        if lengths or codings != [b"chunked"] or version != b"HTTP/1.1":
            return None
        return end + 4, AWAITED_BODY_BYTES, True
    if len(lengths) != 1:
        return None
    length = lengths[0]
    if not length.isdigit() or len(length) > 10 or not 0 < int(length) <= limit:
        return None
    return end + 4, min(int(length), AWAITED_BODY_BYTES), False


def chunked_end(data: bytes | bytearray, at: int, total: int, limit: int) -> tuple[bool, int, int]:
    """Look through a chunked body in `data` from `at`, where a chunk-size line starts, `total`
    bytes of chunk data before it: (whether a thread can read the body to its end without
    waiting, where the next look starts, the chunk data before that). It can once the last
    chunk and the trailer section have come, or once what came holds something the reader
    refuses at once (gateway.rest.framing.ChunkedBody: a line over MAX_LINE, a size that is
    not hex, more than MAX_TRAILERS trailer lines, data past `limit`). Each look starts where
    the last stopped, at the first chunk not wholly come: a body trickled a byte at a time is
    not looked through from its start for each byte."""
    while True:
        # A line is read with its CR LF in MAX_LINE bytes, or refused.
        eol = data.find(b"\r\n", at, at + MAX_LINE)
        if eol < 0:
            return len(data) - at >= MAX_LINE, at, total
        size = bytes(data[at:eol]).partition(b";")[0].rstrip(b" \t")
        if not 0 < len(size) <= 16 or size.strip(b"0123456789abcdefABCDEF"):
            return True, at, total
        length = int(size, 16)
        if total + length > limit:
            return True, at, total
        if length == 0:
            line = eol + 2
            for _ in range(MAX_TRAILERS + 1):
                eol = data.find(b"\r\n", line, line + MAX_LINE)
                if eol < 0:
                    return len(data) - line >= MAX_LINE, at, total
                if eol == line:
                    return True, at, total
                line = eol + 2
            return True, at, total
        if eol + 2 + length + 2 > len(data):
            return False, at, total
        at, total = eol + 2 + length + 2, total + length


def body_missing(conn: Any, start: bytes) -> tuple[int, int] | None:
    """(the head's length, how much of the body to await) for the request that `start` begins,
    when its body may be awaited (`awaited_body`, up to the server's `max_awaited_body`) and
    that much has not arrived, in the connection's reader and its socket together, or, for a
    chunked body, its end has not been taken in yet; None when a thread may read the request
    now."""
    reader = conn.rfile
    unread = getattr(reader, "unread", None)  # not on a reader of cheroot's own (TLS)
    if unread is None:
        return None
    if b"\r\n\r\n" not in start:  # a head longer than the first look
        start = request_start(conn, MAX_HEADER_BYTES) or b""
    server = conn.server
    awaited = awaited_body(start, server.max_awaited_body, server.token_needed)
    if awaited is None:
        return None
    head, want, chunked = awaited
    if not chunked:
        return None if unread + socket_holds(conn.socket) >= head + want else (head, want)
    # Where a chunked body ends is known only from its chunks, looked through once taken in
    # (`gather`); a thread takes it once 8 MiB of it have come, as one of known length.
    taken = reader.taken()
    if taken is None or len(taken) <= head:
        return head, want
    key, at, total = reader.chunk_look
    if key != reader.bytes_read:  # the look of an earlier request on the connection
        at, total = head, 0
    ended, at, total = chunked_end(taken, at, total, server.max_body)
    reader.chunk_look = (reader.bytes_read, at, total)
    return None if ended else (head, want)


def socket_holds(sock: socket.socket) -> int:
    """Bytes received on `sock` and not yet read (0 where that cannot be asked)."""
    try:
        held = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", held)[0])


def request_start(conn: Any, size: int = PEEK_BYTES) -> bytes | None:
    """The first bytes (up to `size`) of the request due on `conn`, left unread for whichever
    thread answers it; None when none have come yet (cheroot hands a connection over as soon
    as it is accepted), b"" for a connection its client has closed."""
    reader = conn.rfile
    has_data = getattr(reader, "has_data", None)
    try:
        if has_data is not None and has_data():
            # Bytes already in the reader (a pipelined request, or what the selector took of
            # a head arriving in pieces): peek returns them unread. They may end inside the
            # head, the rest waiting in the socket: without that rest, a pipelined probe cut
            # so was queued behind slow requests.
            buffered = bytes(reader.peek(size)[:size])
            if len(buffered) < size and b"\r\n\r\n" not in buffered:
                with contextlib.suppress(BlockingIOError, ValueError):  # nothing more; TLS
                    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
                    buffered += conn.socket.recv(size - len(buffered), flags)
            return buffered
        # The socket is blocking with its timeouts kept by the kernel (socketfile), so
        # MSG_DONTWAIT is all it takes not to wait; a Python timeout would poll first.
        start: bytes = conn.socket.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return start
    except BlockingIOError:
        return None
    except OSError:  # reset: as good as closed
        return b""
    except ValueError:  # a TLS socket takes no flags
        return UNREADABLE

"""How much of a connection's next request head has arrived, found out without waiting for
the client and without reading it for the thread that will.

A thread that starts reading a head the client has only begun to send waits for the rest, for up
to the head time (10 s). One byte of a request line was enough to take a thread that long, so a
few clients sending a byte now and then (slowloris) held every HTTP thread of a worker. So a
thread gets a connection only once its head can be read without waiting (`head_readable`):
until then, the selector thread takes what arrives of it into the connection's reader
(gateway.rest.socketfile.SocketReader.gather_head) and the connection waits in the selector,
as nginx waits for a whole head before it does anything with a request.
"""

from __future__ import annotations

import contextlib
import socket
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


def request_start(conn: Any) -> bytes | None:
    """The first bytes of the request due on `conn`, left unread for whichever thread answers
    it; None when none have come yet (cheroot hands a connection over as soon as it is
    accepted), b"" for a connection its client has closed."""
    reader = conn.rfile
    has_data = getattr(reader, "has_data", None)
    try:
        if has_data is not None and has_data():
            # Bytes already in the reader (a pipelined request, or what the selector took of
            # a head arriving in pieces): peek returns them unread. They may end inside the
            # head, the rest waiting in the socket: without that rest, a pipelined probe cut
            # so was queued behind slow requests.
            buffered = bytes(reader.peek(PEEK_BYTES)[:PEEK_BYTES])
            if len(buffered) < PEEK_BYTES and b"\r\n\r\n" not in buffered:
                with contextlib.suppress(BlockingIOError, ValueError):  # nothing more; TLS
                    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
                    buffered += conn.socket.recv(PEEK_BYTES - len(buffered), flags)
            return buffered
        # The socket is blocking with its timeouts kept by the kernel (socketfile), so
        # MSG_DONTWAIT is all it takes not to wait; a Python timeout would poll first.
        start: bytes = conn.socket.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return start
    except BlockingIOError:
        return None
    except OSError:  # reset: as good as closed
        return b""
    except ValueError:  # a TLS socket takes no flags
        return UNREADABLE

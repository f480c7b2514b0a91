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
import re
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

# The end of a head, or a line end without its CR, which the head's reader answers at once
# (400: HTTP requires CRLF line ends). A lone CR + LF pair ending the last header line, then
# CR LF, is the end of a head; so is the CR LF CR LF that ends a request line with no headers.
_READABLE_FROM = re.compile(rb"\r\n\r\n|(?<!\r)\n")


def head_readable(data: bytes | bytearray, start: int = 0) -> bool:
    """Whether a thread can read the head that `data` begins without waiting for more: the head
    has ended, or what came holds something the reader refuses at once (a bare LF, a TLS
    handshake). `start`: where in `data` to look from, what came before holding neither."""
    if data[:1] == TLS_HANDSHAKE:
        return True
    return _READABLE_FROM.search(data, max(0, start - 3)) is not None


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

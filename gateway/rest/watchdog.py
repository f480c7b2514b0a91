"""The upload watchdog: cuts off a request whose head or body is still arriving past its limit.

cheroot's own timeout applies to each socket read, so a client that trickles its body a byte at
a time would hold a worker thread for ever. The watchdog closes the connection of any request
still uploading its body past `request_timeout` (plus a margin, so that a body arriving just in
time still gets its answer). Time spent after the upload is the core's to limit (504).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from cheroot import server

from gateway.rest.framing import ChunkedBody
from gateway.rest.socketfile import SocketReader

log = logging.getLogger(__name__)

# Seconds (at most the request timeout) a request line and its headers may take to arrive, from
# when a thread starts reading them. cheroot's read timeout applies to each read, so a client
# sending a header byte every few seconds held a thread for ever: ten of them stopped a worker.
# Real clients send the whole head at once.
HEAD_SECONDS = 10.0


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

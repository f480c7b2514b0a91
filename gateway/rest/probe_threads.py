"""Threads of their own for liveness, readiness and metrics requests while the others are busy.

cheroot gives every request the next thread of one pool. While each of a worker's
`--http-threads` held a request in a slow model or in the pixel budget's queue, a `/healthz`
waited behind them: a liveness probe with a 1 s timeout failed on a worker that was only busy,
and Kubernetes would restart it, and a Prometheus scrape of `/metrics` timed out just when the
numbers mattered. (gRPC health checks have had threads of their own since the same was found
there.)

A connection whose request is due goes to cheroot's pool as before, unless that pool has no
idle thread or a queue: then its first bytes are peeked at, without reading them, and a `GET`
of one of PROBE_PATHS goes to PROBE_THREADS threads of its own (a new connection whose request
has not come yet waits for it in the server's selector first). Requests on the pool's usual
path cost nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from typing import Any

log = logging.getLogger(__name__)

PROBE_THREADS = 2
# Request lines of the probe routes, up to the end of their path.
PROBE_PATHS = (b"/healthz", b"/readyz", b"/metrics")
_PREFIXES = tuple(b"GET " + path + end for path in PROBE_PATHS for end in (b" ", b"?"))
_LONGEST = max(len(prefix) for prefix in _PREFIXES)
_STOP = object()


def request_start(conn: Any) -> bytes | None:
    """The first bytes of the request due on `conn`, left unread for whichever thread answers
    it; None when none have come yet. cheroot hands a connection over as soon as it is accepted,
    before its client has sent anything."""
    reader = conn.rfile
    has_data = getattr(reader, "has_data", None)
    try:
        if has_data is not None and has_data():
            # A pipelined request already in the reader's buffer: peek returns it unread.
            return bytes(reader.peek(_LONGEST)[:_LONGEST])
        start: bytes = conn.socket.recv(_LONGEST, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return start
    except BlockingIOError:
        return None
    except (OSError, ValueError):  # gone: the usual path closes it
        return b""


def is_probe(start: bytes) -> bool:
    """Whether a request starting with `start` is a probe's. A request line not yet whole is
    not."""
    return start.startswith(_PREFIXES)


class ProbeThreads:
    """A few threads answering the connections handed to them, one request each: afterwards the
    connection goes back to the server's selector, so its next request is routed afresh."""

    def __init__(self, server: Any, threads: int = PROBE_THREADS) -> None:
        self._server = server
        # Unbounded: a probe is answered in microseconds from the process's own state, and
        # every connection queued here is one the server has already accepted.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"http-probe-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, conn: Any) -> None:
        conn.probe_only = True
        self._queue.put(conn)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)

    def _run(self) -> None:
        while (conn := self._queue.get()) is not _STOP:
            keep = False
            try:
                keep = conn.communicate()
            except Exception:
                # This thread must outlive any one connection; cheroot's own threads do the same.
                log.exception("answering a probe failed")
            finally:
                conn.probe_only = False
                if keep:
                    self._server.put_conn(conn)
                else:
                    with contextlib.suppress(OSError):
                        conn.close()

"""Lingering closes: after an answer given with the request's body unread, what the client goes
on sending is read and dropped by one thread, and only then is the connection closed.

A socket closed with bytes unread sends a reset, and the client's kernel then discards the
answer it has not read yet: a client that sends its whole body before it reads (Python's
http.client) got a broken pipe instead of the 413 or 503. nginx lingers the same way (its
lingering_time and lingering_timeout). One thread with a selector does it for every such
connection, so a slow client holds no request thread: each connection gets LINGER_SECONDS at
most, and LINGER_IDLE without a byte, and at most MAX_LINGERING linger at once.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import threading
import time

LINGER_SECONDS = 10.0
LINGER_IDLE = 2.0
MAX_LINGERING = 1024
# Seconds between two looks at the connections' time limits.
_TICK = 0.1


class Lingerer:
    def __init__(self) -> None:
        self._new: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="http-linger", daemon=True).start()

    def add(self, sock: socket.socket) -> bool:
        """Take `sock` over (its answer sent, its sending side shut) to read out and close;
        False, leaving it to the caller, when MAX_LINGERING are lingering already."""
        with self._lock:
            if self._count >= MAX_LINGERING or self._stop.is_set():
                return False
            self._count += 1
        self._new.put(sock)
        return True

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        # socket -> [when it is closed whatever comes, when it is closed if nothing comes]
        limits: dict[socket.socket, list[float]] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(queue.Empty):
                while True:
                    sock = self._new.get_nowait()
                    try:
                        selector.register(sock, selectors.EVENT_READ)
                    except (OSError, ValueError):  # closed meanwhile
                        self._close(sock, selector, limits)
                        continue
                    limits[sock] = [now + LINGER_SECONDS, now + LINGER_IDLE]
            if not limits:
                self._stop.wait(_TICK)
                continue
            for key, _ in selector.select(_TICK):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    limits[ready][1] = time.monotonic() + LINGER_IDLE
                else:  # the client has ended its side
                    self._close(ready, selector, limits)
            now = time.monotonic()
            for sock, (ends, idle_ends) in list(limits.items()):
                if now > ends or now > idle_ends:
                    self._close(sock, selector, limits)
        for sock in list(limits):
            self._close(sock, selector, limits)
        selector.close()

    def _close(
        self,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        limits: dict[socket.socket, list[float]],
    ) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(sock)
        limits.pop(sock, None)
        with contextlib.suppress(OSError):
            sock.close()
        with self._lock:
            self._count -= 1

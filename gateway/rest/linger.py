"""Lingering closes: after an answer given with the request's body unread, what the client goes
on sending is read and dropped by one thread, and only then is the connection closed.

A socket closed with bytes unread sends a reset, and the client's kernel then discards the
answer it has not read yet: a client that sends its whole body before it reads (Python's
http.client) got a broken pipe instead of the 413 or 503. nginx lingers the same way (its
lingering_time and lingering_timeout). One thread with a selector does it for every such
connection, so a slow client holds no request thread: each connection gets LINGER_SECONDS at
most, and LINGER_IDLE without a byte, and at most MAX_LINGERING linger at once.

The same thread finishes sending answers a client is slow to take (the probe threads'
answers, gateway.rest.dispatch): it sends what is left as the client makes room, within the
time it is given, then lingers as above. At most MAX_UNSENT bytes wait to be sent at once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time

log = logging.getLogger(__name__)

LINGER_SECONDS = 10.0
LINGER_IDLE = 2.0
MAX_LINGERING = 1024
MAX_UNSENT = 16 << 20
# Seconds between two looks at the connections' time limits.
_TICK = 0.1


class Lingerer:
    def __init__(self) -> None:
        self._new: queue.SimpleQueue[tuple[socket.socket, bytes, float]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._unsent = 0
        self._stopped = False
        # The thread's own: the connections it watches; socket -> [when it is closed whatever
        # comes, when it is closed if nothing comes]; socket -> what is left to send of its
        # answer, while some is.
        self._selector = selectors.DefaultSelector()
        self._limits: dict[socket.socket, list[float]] = {}
        self._sending: dict[socket.socket, memoryview] = {}
        # Wakes the thread when a connection is added or the server stops; it would otherwise
        # see either only at its next tick (85 ms more for each answer it finished sending).
        self._wake_in, self._wake_out = socket.socketpair()
        for end in (self._wake_in, self._wake_out):
            end.setblocking(False)
        threading.Thread(target=self._run, name="http-linger", daemon=True).start()

    def add(self, sock: socket.socket, unsent: bytes = b"", within: float = 0.0) -> bool:
        """Take `sock` over to read out and close: its answer sent and its sending side shut,
        or, given `unsent`, once that rest of its answer is sent (then its sending side is shut
        here) within `within` seconds. False, leaving it to the caller, when MAX_LINGERING
        are lingering already, MAX_UNSENT bytes wait to be sent, or the server stops."""
        with self._lock:
            if (
                self._count >= MAX_LINGERING
                or self._unsent + len(unsent) > MAX_UNSENT
                or self._stopped
            ):
                return False
            self._count += 1
            self._unsent += len(unsent)
            # Under the lock: whatever is added before the stop is there for the thread's
            # last look, and nothing after it.
            self._new.put((sock, unsent, within))
        self._wake()
        return True

    @property
    def unsent(self) -> int:
        """Bytes of answers waiting to be sent."""
        return self._unsent

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake()

    def _wake(self) -> None:
        # Full: a wake-up is pending already. Closed: the thread has ended.
        with contextlib.suppress(OSError):
            self._wake_out.send(b"\0")

    def _run(self) -> None:
        self._selector.register(self._wake_in, selectors.EVENT_READ)
        while not self._stopped:
            try:
                self._turn()
            except Exception:
                # This thread must outlive any one connection, as the request threads do.
                log.exception("lingering over a connection failed")
        self._take_new()
        for sock in list(self._limits):
            self._close(sock)
        self._selector.close()
        for end in (self._wake_in, self._wake_out):
            end.close()

    def _turn(self) -> None:
        self._take_new()
        for key, events in self._selector.select(_TICK):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            if ready is self._wake_in:
                with contextlib.suppress(OSError):
                    ready.recv(4096)
                continue
            if events & selectors.EVENT_READ:
                self._read(ready)
            if events & selectors.EVENT_WRITE and ready in self._sending:
                self._send(ready)
        now = time.monotonic()
        for sock, (ends, idle_ends) in list(self._limits.items()):
            if now > ends or now > idle_ends:
                self._close(sock)

    def _take_new(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(queue.Empty):
            while True:
                sock, unsent, within = self._new.get_nowait()
                events = selectors.EVENT_READ
                if unsent:
                    self._sending[sock] = memoryview(unsent)
                    self._limits[sock] = [now + within, now + within]
                    events |= selectors.EVENT_WRITE
                else:
                    self._limits[sock] = [now + LINGER_SECONDS, now + LINGER_IDLE]
                try:
                    self._selector.register(sock, events)
                except (OSError, ValueError, KeyError):  # closed meanwhile
                    self._close(sock)

    def _read(self, sock: socket.socket) -> None:
        """Drop what the client sent. While its answer is still being sent, that is read out
        too (closed with bytes unread, the socket would reset and lose the answer), but it does
        not buy the client more time, and its end of input does not end the answer."""
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        sending = sock in self._sending
        if data:
            if not sending:
                self._limits[sock][1] = time.monotonic() + LINGER_IDLE
        elif not sending:  # the client has ended its side
            self._close(sock)
        else:
            try:
                self._selector.modify(sock, selectors.EVENT_WRITE)
            except (OSError, ValueError):
                self._close(sock)

    def _send(self, sock: socket.socket) -> None:
        left = self._sending[sock]
        try:
            sent = sock.send(left, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:  # gone
            self._close(sock)
            return
        self._sent(sent)
        if len(left) > sent:
            self._sending[sock] = left[sent:]
            return
        del self._sending[sock]
        try:
            sock.shutdown(socket.SHUT_WR)
            self._selector.modify(sock, selectors.EVENT_READ)
        except (OSError, ValueError):
            self._close(sock)
            return
        now = time.monotonic()
        self._limits[sock] = [now + LINGER_IDLE, now + LINGER_IDLE]

    def _sent(self, count: int) -> None:
        with self._lock:
            self._unsent -= count

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        self._limits.pop(sock, None)
        left = self._sending.pop(sock, None)
        if left is not None:
            self._sent(len(left))
        with contextlib.suppress(OSError):
            sock.close()
        with self._lock:
            self._count -= 1

"""cheroot's HTTP connection, made cheaper per request in two ways.

The reader is C io instead of cheroot's pure Python. cheroot reads every request line, header
line and body through `_pyio.BufferedReader`, the pure-Python twin of `io.BufferedReader` (its
makefile module says it prefers the slower one, to reach into the buffer). On a 64x64 PNG its
readline alone was 7% of the GIL-held samples of a loaded worker; with this reader the worker
spent 525 instead of 555 us of CPU a request (four alternating pairs). The one thing cheroot
needs from the buffer is whether a pipelined request already sits in it when a connection goes
back to wait for its next request (`has_data`); this reader answers that by counting bytes in
from the socket and bytes handed out.

A connection's timeout is kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO) on a blocking socket, not
by Python: a Python socket with a timeout polls before every recv and every send, two system
calls where one does, and each lets go of the GIL, which a busy worker pays for in thread
switches. One worker, 64x64 PNG, concurrency 8, three alternating pairs: 15.6-15.7 switches and
497-571 us of CPU a request with the polls, 13.0-13.1 and 474-511 us without.

A keep-alive connection stays a moment with the thread that answered it (see `Connection`). A
body of known length can be read straight into the caller's buffer (`KnownLengthBody`), and
`peer_closed` tells whether a client has left while its request is served.
"""

from __future__ import annotations

import fcntl
import io
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any, Literal

from cheroot import makefile as cheroot_makefile
from cheroot import server

from gateway.rest.heads import (
    UNREADABLE,
    body_missing,
    head_readable,
    request_start,
    socket_holds,
)

# How long a worker thread waits on a keep-alive connection it has just answered for that
# client's next request, before handing the connection back to the selector thread.
LINGER_MS = 2
# At most 4 MiB of a body left unread dropped on the closing thread (gateway.rest.linger reads
# the rest, if any comes).
_MAX_DROPPED_READS = 64
# The most bytes one recv takes off a socket early (`_SocketIO.take`).
_TAKE_MAX = 256 << 10


def move_timeout_to_kernel(sock: socket.socket) -> None:
    """Make a socket with a timeout blocking, its timeout enforced by the kernel instead."""
    timeout = sock.gettimeout()
    if not timeout:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
    set_send_timeout(sock, timeout)
    sock.settimeout(None)


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """The kernel's limit on one send of a blocking socket."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


class _SocketIO(socket.SocketIO):
    """SocketIO that counts the bytes it receives, for a blocking socket with kernel timeouts.
    When one of those ends a recv or send, it fails with EAGAIN, which SocketIO reports as None
    (nothing yet, as on a non-blocking socket) and cheroot's writer would take as everything
    sent. It is raised here as the TimeoutError("timed out") of a Python timeout, which cheroot
    answers with 408 or a quiet close."""

    received = 0
    # Set when the server ends the input of a client too slow to send its request (`cut`): the
    # end of input that follows is that timeout, not the client's close.
    cut = False
    # Called once, before the first read that finds nothing on the socket, while a thread
    # reads a request's body (`SocketReader.before_waiting`).
    before_wait: Callable[[], None] | None = None

    def __init__(self, sock: socket.socket, mode: Literal["rb", "wb"]) -> None:
        super().__init__(sock, mode)
        self._socket = sock
        # Bytes taken off the socket before a thread reads them (`take`), read before the
        # socket's.
        self.early = bytearray()

    def readinto(self, b: Any) -> int | None:
        early = self.early
        if early:
            n = min(len(b), len(early))
            # Through views: a slice of `early` would be one more copy, of up to a whole body.
            with memoryview(early) as taken:
                memoryview(b).cast("B")[:n] = taken[:n]
            del early[:n]
            return n
        if self.before_wait is not None and not socket_holds(self._socket):
            hook, self.before_wait = self.before_wait, None
            hook()
        got = super().readinto(b)
        if got is None or (got == 0 and self.cut):
            raise TimeoutError("timed out")
        self.received += got
        return got

    def write(self, b: Any) -> int | None:
        n = super().write(b)
        if n is None:
            raise TimeoutError("timed out")
        return n

    def take(self, limit: int) -> bool:
        """Take what the socket holds, without waiting, until `early` holds `limit` bytes;
        whether the client's input has ended (closed or reset)."""
        early = self.early
        while len(early) < limit:
            try:
                # At most _TAKE_MAX a recv: it allocates what it is asked for, and a body
                # awaited by the selector may be megabytes, which come a byte at a time from a
                # slow client.
                data = self._socket.recv(min(limit - len(early), _TAKE_MAX), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            early += data
            self.received += len(data)
        return False


class SocketReader(io.BufferedReader):
    """cheroot's StreamReader (read, readline, iteration, has_data, bytes_read) on C io."""

    def __init__(self, sock: socket.socket, bufsize: int = io.DEFAULT_BUFFER_SIZE) -> None:
        self._socket = sock
        self._socket_io = _SocketIO(sock, "rb")
        super().__init__(self._socket_io, bufsize)
        self.bytes_read = 0

    # The connection closes with its request's body not wholly read: see drop_arrived.
    body_left = False

    def cut(self) -> None:
        """End the connection's input from another thread: a read waiting on the socket, and
        every read after, fails as a timed-out one would, while the answer can still be sent
        (shutting the socket both ways, as closing it would, lost the answer)."""
        self._socket_io.cut = True
        self.body_left = True
        self._socket.shutdown(socket.SHUT_RD)

    @property
    def was_cut(self) -> bool:
        return self._socket_io.cut

    def before_waiting(self, hook: Callable[[], None] | None) -> None:
        """Have `hook` called once, before the first read from here on that finds nothing
        arrived and waits for the client (None: no longer). A body that has all come when its
        thread reads it never calls it."""
        self._socket_io.before_wait = hook

    def drop_arrived(self) -> bool:
        """When a body is left unread (`body_left`), end the sending side (the answer is whole)
        and drop what of the body has arrived; whether the client has ended its side too, so
        that closing now sends no reset. Closed with bytes unread, a socket sends a reset, and
        the client's kernel then discards the answer it has not read yet."""
        if not self.body_left:
            return True
        sock = self._socket
        try:
            sock.shutdown(socket.SHUT_WR)
            for _ in range(_MAX_DROPPED_READS):
                if not sock.recv(1 << 16, socket.MSG_DONTWAIT):
                    return True
        except BlockingIOError:
            return False  # more may come
        except OSError:
            return True  # gone
        return False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        self.bytes_read += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        data = super().read1(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n
        return n

    def readinto1(self, buffer: Any) -> int:
        n = super().readinto1(buffer)
        self.bytes_read += n
        return n

    def read_some_into(self, buffer: Any) -> int:
        """Up to len(buffer) bytes: those already buffered, or else what one read from the
        socket gives. A read that fails (a timeout) has then taken nothing, and `bytes_read`
        stays what was read: `readinto` goes on reading until the buffer is full, and one that
        failed after taking bytes lost their count (a body of 300,000 bytes of 1,000,000 that
        then stopped was logged as 0 bytes in)."""
        view = memoryview(buffer).cast("B")
        buffered = self._socket_io.received - self.bytes_read
        if 0 < buffered < len(view):
            view = view[:buffered]
        return self.readinto1(view)

    def peek(self, size: int = 0) -> bytes:
        """The bytes due next, unread: those in the buffer, then up to `size` in all of those
        taken early (`gather_head`), which follow them in the stream. C io's own peek gives the
        buffer alone while it holds any: a head begun there and going on in the early bytes
        was judged from its start and what waited in the socket, the bytes between left out.

        With the buffer empty, the early bytes are looked at where they are. C io's peek would
        fill the buffer from them, and `gather` put those back in front of the rest: each time
        more of a body awaited in the selector came, all it held was moved (330 us a byte sent
        with 8 MB held, the selector's time and the GIL's)."""
        taken = self.taken()
        if taken:
            with memoryview(taken) as view:
                return bytes(view[: max(size, 1)])
        data = super().peek(size)
        early = self._socket_io.early
        if early and len(data) < size:
            data += bytes(early[: size - len(data)])
        return data

    def has_data(self) -> bool:
        """Whether bytes received from the socket wait in the buffer, unread."""
        return self.unread > 0

    # Where the last look for the end of a chunked body awaited in the selector stopped
    # (gateway.rest.heads.chunked_end): the stream position of its request's start, the offset
    # from there of the chunk looked at, and the chunk data before it.
    chunk_look = (-1, 0, 0)

    def taken(self) -> bytearray | None:
        """The unread bytes, when all of them have been taken in early (`gather`): the bytes of
        the request due, from its start."""
        io_ = self._socket_io
        return io_.early if io_.received - self.bytes_read == len(io_.early) else None

    @property
    def unread(self) -> int:
        """Bytes received from the socket and not yet read: in the buffer, and taken early."""
        return self._socket_io.received - self.bytes_read

    def gather(self, limit: int) -> bool:
        """Take what has arrived off the socket, without waiting, until `limit` bytes are
        unread, so that the selector is not woken for it again; whether they are, or the
        client's input has ended (closed or reset). What this reader had buffered goes in
        front of them, unread: they are read through the buffer's own reads then."""
        io_ = self._socket_io
        early = io_.early
        buffered = io_.received - self.bytes_read - len(early)
        if buffered > 0:
            early[:0] = super().read1(buffered)  # the base class's: bytes_read stays as it is
        return io_.take(limit) or len(early) >= limit

    # Where in the stream (bytes received before it) the unread bytes are known to hold no
    # readable head: the next look starts there, so that a head arriving a byte at a time is
    # not searched from its start for each byte.
    _head_unreadable_to = 0

    def gather_head(self, limit: int) -> bool:
        """Take what has arrived of the next request's head (`gather`); whether a thread can
        read the head without waiting now (gateway.rest.heads): it has ended, it is over
        `limit` bytes, or the client's input has ended."""
        if self.gather(limit):
            return True
        io_ = self._socket_io
        early = io_.early
        first = io_.received - len(early)  # where `early` starts in the stream
        if head_readable(early, self._head_unreadable_to - first):
            self._head_unreadable_to = 0
            return True
        self._head_unreadable_to = io_.received
        return False


class KnownLengthBody(server.KnownLengthRFile):
    """cheroot's request body of known length, plus `readinto`. Without it, Werkzeug's stream
    reads through `read`: cheroot's `read` makes a bytes object, Werkzeug copies it into a
    bytearray and that into another bytes object, and the caller copies it once more into its
    buffer. With it, the body goes from the socket straight into the caller's buffer."""

    # Called once, before the first read (to send 100 Continue), and once the last byte is read.
    before_first_read: Callable[[], None] | None = None
    after_last_read: Callable[[], None] | None = None
    # Body bytes read so far (the access record's bytes_in).
    bytes_read = 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self.remaining]
        if not view:
            return 0
        if self.before_first_read is not None:
            self.before_first_read()
            self.before_first_read = None
        # As much as has come, not the whole view: a read that times out after taking some
        # would lose their count (the access record's bytes_in).
        read = getattr(self.rfile, "read_some_into", self.rfile.readinto)
        n = int(read(view))
        self.remaining -= n
        self.bytes_read += n
        if not self.remaining and self.after_last_read is not None:
            self.after_last_read()
            self.after_last_read = None
        return n

    def discard(self) -> None:
        """Read the rest of the body and drop it, a piece at a time (cheroot read it whole)."""
        scratch = bytearray(min(self.remaining, 1 << 16))
        while self.remaining:
            if not self.readinto(scratch):
                raise ConnectionError("the client closed the connection inside the body")


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client has closed (or reset) a connection that already sent its request.
    Bytes waiting to be read (a pipelined request) do not count. One poll, no wait: a recv on
    a socket with a timeout would first wait up to that timeout for bytes."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLRDHUP)
    except ValueError:  # the server has closed the socket itself (fileno -1)
        return True
    return bool(poller.poll(0))


class SocketWriter(cheroot_makefile.StreamWriter):
    """cheroot's StreamWriter over _SocketIO."""

    def __init__(self, sock: socket.socket, bufsize: int = io.DEFAULT_BUFFER_SIZE) -> None:
        # StreamWriter's own __init__ would wrap the socket in a plain SocketIO.
        cheroot_makefile.BufferedWriter.__init__(self, _SocketIO(sock, "wb"), bufsize)
        self.bytes_written = 0


class AnswerBuffer:
    """Stands in for a connection's writer while a probe thread answers it: the answer is kept
    in memory, up to `limit` bytes, to be sent without waiting for the client afterwards."""

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.bytes_written = 0
        self._limit = limit

    def write(self, data: bytes) -> int:
        if self.bytes_written + len(data) > self._limit:
            raise ConnectionError(f"an answer of over {self._limit} bytes to a probe")
        self.parts.append(bytes(data))
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def send_now(sock: socket.socket, data: bytes) -> int:
    """Send what the socket takes of `data` without waiting; how many bytes it took."""
    sent = 0
    with memoryview(data) as view:
        while sent < len(data):
            try:
                sent += sock.send(view[sent:], socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
    return sent


def send_within(sock: socket.socket, data: bytes, seconds: float) -> None:
    """Send all of `data` on a blocking socket within `seconds`; each send waits as long as the
    socket's send timeout. TimeoutError when either runs out."""
    deadline = time.monotonic() + seconds
    sent = 0
    with memoryview(data) as view:
        while sent < len(data):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the client did not take the answer within {seconds:g} s")
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError as exc:  # the kernel's send timeout
                raise TimeoutError("the client took none of the answer") from exc


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes sent on `sock` that its client's kernel has not acknowledged yet (the send queue,
    on Linux; 0 where that cannot be asked). What that kernel holds unread is not counted."""
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", queued)[0])


def make_file(sock: socket.socket, mode: str = "r", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> Any:
    if "r" in mode:
        return SocketReader(sock, bufsize)
    return SocketWriter(sock, bufsize)


class Connection(server.HTTPConnection):
    """cheroot's connection, reading through SocketReader (plain TCP only: TLS brings its own
    file objects, and this server does not terminate TLS).

    cheroot answers one request per turn of a worker thread, then hands the connection to its
    selector thread, which hands it to a worker thread again once the next request arrives:
    two thread wake-ups, and GIL hand-offs, per request on a busy keep-alive connection. A
    client that sends its next request right after the answer (any client in a loop, or a
    pool) mostly finds the same thread still waiting here for up to LINGER_MS. The wait holds
    no GIL, and is only taken while no connection waits for a thread and another thread is
    idle: a connection that comes to need a thread meanwhile gets that idle one, and at worst
    (several at once) waits LINGER_MS longer. At 2 ms it served 15-20% more requests a second
    to one client in a loop (64x64 PNG, one worker, three alternating pairs).
    """

    # Set while a probe thread answers it: that thread answers one request, no more.
    probe_only = False
    # Handed back to the selector before its first request came (gateway.rest.dispatch).
    parked = False
    # What is awaited in the selector, while its request's head or body arrives in pieces:
    # "head" or "body", and when (time.time()) its time runs out (gateway.rest.listening
    # ends it then).
    awaiting: str | None = None
    due: float | None = None
    # Bytes it holds while it waits, in the selector or for a thread (gateway.rest.dispatch
    # counts them), and how many of them are its body's (an access record's bytes_in, should
    # it be answered unread).
    held = 0
    body_in = 0
    # Set when its request is answered 408, unread, its head's or body's time having run out
    # before it had all come: the answer's message, or "" for the refusal's own.
    late: str | None = None
    # Ended to make room for newer parked connections (gateway.rest.dispatch): closed, unread,
    # once the selector hands it over.
    evicted = False

    def __init__(self, srv: Any, sock: socket.socket, makefile: Any = make_file) -> None:
        plain = makefile is cheroot_makefile.MakeFile
        super().__init__(srv, sock, make_file if plain else makefile)
        if plain:
            move_timeout_to_kernel(sock)

    def close(self) -> None:
        if self.parked:  # closed by the selector, idle too long
            self.server.dispatcher.unpark(self)
        if self.held:
            self.server.dispatcher.release(self)
        reader = self.rfile
        # Lingering already: the rest of its answer is being sent (gateway.rest.dispatch).
        if isinstance(reader, SocketReader) and not self.linger and not reader.drop_arrived():
            # The rest of the body is read out by the server's lingering thread, which closes
            # the socket after; cheroot's close then leaves it alone (its `linger`).
            lingerer = getattr(self.server, "lingerer", None)
            if lingerer is not None and lingerer.add(self.socket):
                self.linger = True
        super().close()

    def communicate(self) -> bool:
        if self.held:  # taken in by the selector, read by this thread now
            self.server.dispatcher.release(self)
        # cheroot's stubs leave communicate unannotated; it returns whether to keep the connection.
        while super().communicate():  # type: ignore[no-untyped-call]
            if self.moved():
                return False
            if not self._next_request_here():
                return True
        return False

    def moved(self) -> bool:
        """Whether the connection, between two requests, went to another process to be served
        there (gateway.rest.balance): this one only lets go of its descriptor then."""
        return False

    def _next_request_here(self) -> bool:
        """Whether this thread answers the connection's next request too. Never while another
        connection waits for a thread: a client pipelining many requests goes back in line
        after each, as with cheroot alone."""
        threads = self.server.requests
        if not self.server.ready or threads.qsize or self.probe_only:
            return False
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        deadline = time.monotonic() + LINGER_MS / 1000
        if not self.rfile.has_data() and (not threads.idle or not poller.poll(LINGER_MS)):
            return False
        # Only a request whose head, and body of known length, have come whole is read here:
        # the rest of one that has not is awaited in the selector (gateway.rest.heads). A body
        # sent right after its head (Python's http.client sends them apart) is waited for here
        # as long as a next request is: handed to the selector, a quarter of such requests went
        # there and back, 8-10% fewer a second from one client.
        start = request_start(self)
        if start is None or start == b"":
            return False
        if start == UNREADABLE or not head_readable(start):
            return start == UNREADABLE
        while (missing := body_missing(self, start)) is not None:
            if self.rfile.gather(sum(missing)):
                break
            left = deadline - time.monotonic()
            if left <= 0 or not threads.idle or not poller.poll(left * 1000):
                return False
        return True

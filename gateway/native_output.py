"""What native code writes to stderr, made into the server's log lines.

libpng and libjpeg write a line to file descriptor 2 for each damaged image OpenCV reads
("libpng error: IDAT: CRC error", "Corrupt JPEG data: premature end of data segment"), one per
image of a batch, and libpng quotes a PNG's ICC profile name in its warnings as it is, newlines
included: a client could write lines of its choosing into the log, a forged JSON access record
among them. Python's logging writes to stderr too, but through `sys.stderr`, which this module
points at a copy of the original descriptor; descriptor 2 itself becomes a socket whose
records a relay process reads, one `write()` each, and writes as log lines of the server's
format:

    2026-11-27 12:00:00,123 WARNING gateway.native[4242]: <the line, control characters escaped>

The decoders' lines about a damaged image (the client got its own error for it) are DEBUG;
anything else native code writes (grpc's core, a model's libraries, a fatal error) is WARNING,
each line of it a log line of its own. The relay is a process of its own, in a session of its
own, so that what a dying process writes last still reaches the log, and a Ctrl-C or a signal
to the gateway's process group does not end it; it ends once every process that holds the
socket has.

Neither the relay nor any process of the gateway waits for stderr's reader: each writes its lines
with a LineWriter (below), a thread of its own that writes them to an Outlet, stderr opened so
as never to block. While stderr takes nothing (a pipe whose reader has stalled) they are held,
up to a bound, then dropped and counted: the relay reads on all the same, and native code's
writes to descriptor 2 do not wait either.

Run as a script (stdlib only, `python -I -S native_output.py PID LEVEL`), it is the relay, and
so LineWriter is here: the relay imports nothing of the gateway's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

# The logger name of the relay's lines (run as a script, this module is __main__).
NAME = "gateway.native"

# The start of a record that is a decoder's word about a damaged image: libpng's warning and
# error functions, and libjpeg's warnings (jerror.h's JWRN_* texts).
DECODER_WORDS = (
    b"libpng warning: ",
    b"libpng error: ",
    b"Corrupt JPEG data: ",
    b"Premature end of JPEG file",
    b"Warning: unknown JFIF revision number",
    b"Invalid SOS parameters for sequential JPEG",
    b"Inconsistent progression sequence",
    b"Unknown Adobe color transform code",
    b"Application transferred too many scanlines",
)
# Bytes of a record the relay reads at once; a longer record is cut there (one write() of more
# than this to stderr is a dump, not a line).
RECORD_BYTES = 256 * 1024
# Characters of log lines the relay holds at most while stderr takes none, about 7,000 lines (as
# Docker's non-blocking log mode, whose buffer is 1 MB by default); past them it drops new ones.
RELAY_HELD_CHARS = 1 << 20
# Bytes of lines written in one write() at most, each line whole: a pipe takes up to PIPE_BUF
# bytes at once, never mixed with another process's write (the supervisor, each worker and each
# relay write into the same pipe). A longer line goes alone.
WRITE_BYTES = select.PIPE_BUF
# As a process exits, how long its LineWriter waits for stderr to take what it holds: as long as
# stderr takes some every FINISH_STALLED seconds, and FINISH_MOST seconds at most.
FINISH_STALLED = 0.5
FINISH_MOST = 2.0
# The line that counts the lines dropped while stderr took none.
DROPPED = "%d log lines dropped while stderr took none"
# Signals the relay ignores: a Ctrl-C, a stop or a reload sent to every process of the gateway.
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)

_relay_process: subprocess.Popen[bytes] | None = None


def capture(level: str) -> None:
    """Send what this process's native code writes to stderr through a relay process, and
    keep Python's own stderr (sys.stderr) on the original descriptor. Call it before logging is
    configured. Without a relay (it could not start), stderr is left as it was."""
    if sys.stderr is None:
        # Started with stderr closed (2>&-): descriptor 2 may since be any file this process
        # opened, and nothing of the log is written anywhere.
        return
    try:
        original = os.dup(2)
    except OSError:
        return
    try:
        ours, relays = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:
        os.close(original)
        log.warning("native code writes to stderr unfiltered: no socket (%s)", exc)
        return
    try:
        # Kept: a Popen collected while its process runs warns of it.
        global _relay_process
        _relay_process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), level],
            stdin=relays.fileno(),
            stdout=original,
            stderr=original,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(original)
        log.warning("native code writes to stderr unfiltered: no relay (%s)", exc)
        return
    finally:
        relays.close()
    os.dup2(ours.fileno(), 2)
    ours.close()
    stream = sys.stderr
    sys.stderr = open(  # noqa: SIM115 - the process's stderr, open while it lives
        original,
        "w",
        buffering=1,
        encoding=getattr(stream, "encoding", None) or "utf-8",
        errors="backslashreplace",
    )


def finish(timeout: float = 1.0) -> None:
    """Let the relay end, and wait up to `timeout` seconds for it, as this process is about
    to exit: its stderr (descriptor 2) goes to /dev/null from here on. Left to end after this
    process, the relay was an orphan, and a zombie of its new parent when that was a gateway
    running as a container's first process (PID 1), which reaps only its own workers: one a
    worker replaced."""
    relay = _relay_process
    if relay is None:
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    with contextlib.suppress(subprocess.TimeoutExpired):
        relay.wait(timeout)


def escaped(text: str) -> str:
    """The text with no control character left, so that it stays one line of the log."""
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in text)


def log_lines(record: bytes, pid: int, debug: bool, now: float) -> list[str]:
    """The log lines (without their newlines) for one record written to stderr by process
    `pid`: a decoder's word as one DEBUG line (none unless `debug`), anything else as a WARNING
    line for each of its lines."""
    if record.startswith(DECODER_WORDS):
        if not debug:
            return []
        level, lines = "DEBUG", [record.rstrip(b"\r\n")]
    else:
        level, lines = "WARNING", [line for line in record.splitlines() if line.strip()]
    start = f"{_stamp(now)} {level} {NAME}[{pid}]: "
    return [start + escaped(line.decode("utf-8", "backslashreplace")) for line in lines]


def _stamp(now: float) -> str:
    """The time as logging's default asctime has it."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return stamp + f",{int(now % 1 * 1000):03d}"


class Writable(Protocol):
    """Where a LineWriter writes: an Outlet, or a stream without a descriptor."""

    def write(self, data: bytes | memoryview) -> int: ...

    def wait(self, timeout: float) -> bool: ...


class Outlet:
    """A descriptor (stderr) to write to without waiting for its reader.

    A pipe or a terminal is written through an open file of its own, non-blocking: O_NONBLOCK
    set on the descriptor itself would be set on the open file it shares with every process that
    inherited it (a dup() shares it too), the shell that started the gateway among them, whose
    writes would then fail. A socket (journald's stream) takes MSG_DONTWAIT on each send
    instead. A file takes its writes at once. A pipe that cannot be opened again (no /proc) is
    written once poll() says it takes more, which it then does, unless another process fills it
    first.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._own: int | None = None
        self._socket: socket.socket | None = None
        with contextlib.suppress(OSError):
            mode = os.fstat(fd).st_mode
            if stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                self._own = os.open(f"/proc/self/fd/{fd}", flags)
            elif stat.S_ISSOCK(mode):
                self._socket = socket.socket(fileno=os.dup(fd))

    def write(self, data: bytes | memoryview) -> int:
        """Write what the descriptor takes of `data` now: the bytes written, 0 for none. OSError
        when it takes nothing any more (its reader has gone)."""
        try:
            if self._own is not None:
                return os.write(self._own, data)
            if self._socket is not None:
                return self._socket.send(data, socket.MSG_DONTWAIT)
            if not self.wait(0):
                return 0
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the descriptor to take more (or to fail for good);
        whether it does."""
        poll = select.poll()
        poll.register(self.fd if self._own is None else self._own, select.POLLOUT)
        return bool(poll.poll(timeout * 1000))


class LineWriter:
    """Lines handed over by any thread, written by a thread of the writer's own, in the order
    they came, each whole and in one write() with as many whole others as fit in WRITE_BYTES.

    No thread that hands a line over waits for stderr. While stderr takes nothing (a pipe whose
    reader has stalled), the writing thread holds the lines it had taken, and at most
    `max_lines` lines (and `max_chars` characters of those put()) wait behind them; past that,
    new lines are dropped and counted, and once stderr takes lines again, a line says how many:
    `dropped(count)`, and each note (add_note) for lines handed over other than by put().
    """

    def __init__(
        self,
        outlet: Writable | None,
        *,
        name: str,
        dropped: Callable[[int], str],
        max_chars: int,
        max_lines: int = sys.maxsize,
        encoding: str = "utf-8",
        interval: float = 0.05,
    ) -> None:
        self._outlet = outlet
        # The lines waiting, appended by put(), and by any caller that checks max_lines itself
        # and says what it dropped in a note (the access log, in gateway.logs).
        self.lines: deque[str] = deque()
        self.max_lines = max_lines
        self._notes: list[Callable[[], str | None]] = []
        self._max_chars = max_chars
        self._chars = 0
        self._dropped = 0
        self._say_dropped = dropped
        self._lock = threading.Lock()
        self._encoding = encoding
        self._interval = interval
        self._wake = threading.Event()
        # Flushes asked for, and done: the writer notes which it has seen before it takes.
        self._flushing = threading.Condition()
        self._asked = self._done = 0
        self._written = 0  # bytes, ever
        self._given_up = False
        self._pending: deque[bytes | memoryview] = deque()
        threading.Thread(target=self._write_forever, name=name, daemon=True).start()

    def put(self, line: str) -> None:
        """Hand a line (without its newline) over to be written, or drop it and count it."""
        with self._lock:
            if len(self.lines) >= self.max_lines or self._chars + len(line) > self._max_chars:
                self._dropped += 1
                return
            self.lines.append(line)
            self._chars += len(line)
        self._wake.set()

    def add_note(self, note: Callable[[], str | None]) -> None:
        """Lines are appended to `lines` other than by put(), without waking the writer: take
        them every `interval` seconds, and write what `note()` says of those dropped (None for
        nothing) after them."""
        self._notes.append(note)
        self._wake.set()

    def finish(self) -> bool:
        """As the process exits: wait for the lines handed over so far to be written, as long as
        stderr takes some every FINISH_STALLED seconds, FINISH_MOST seconds at most. Once that
        was not enough, a later call does not wait: stderr's reader is not reading."""
        if self._given_up:
            return False
        done = self._wait_written(FINISH_MOST, FINISH_STALLED)
        self._given_up = not done
        return done

    def _wait_written(self, most: float, stalled: float) -> bool:
        with self._flushing:
            self._asked += 1
            asked = self._asked
        self._wake.set()
        started = time.monotonic()
        seen, moved = self._written, started
        with self._flushing:
            while self._done < asked:
                now = time.monotonic()
                if self._written != seen:
                    seen, moved = self._written, now
                left = min(started + most, moved + stalled) - now
                if left <= 0:
                    return False
                self._flushing.wait(min(left, 0.05))
        return True

    def _write_forever(self) -> None:
        while True:
            # The lines of put() wake it; lines appended by others are taken every interval.
            self._wake.wait(self._interval if self._notes else None)
            self._wake.clear()
            with self._flushing:
                asked = self._asked
            try:
                self._write_held()
            except Exception:  # whatever it was, the lines to come are written
                self._pending.clear()
            with self._flushing:
                self._done = asked
                self._flushing.notify_all()

    def _write_held(self) -> None:
        """Write what it holds, or else what waits: back once it is written, or lost."""
        outlet = self._outlet
        if not self._pending:
            lines = self._take()
            if not lines or outlet is None:
                return
            self._pending = _writes(lines, self._encoding)
        while self._pending and outlet is not None:
            data = self._pending[0]
            try:
                written = outlet.write(data)
            except OSError:
                # stderr has gone (its reader closed it), or fails: these lines are lost rather
                # than held, and the next ones are tried afresh.
                self._pending.clear()
                return
            self._written += written
            if written >= len(data):
                self._pending.popleft()
            elif written:
                self._pending[0] = data[written:]
            else:
                outlet.wait(1.0)

    def _take(self) -> list[str]:
        lines = self.lines
        with self._lock:
            taken = [lines.popleft() for _ in range(len(lines))]
            self._chars = 0
            dropped, self._dropped = self._dropped, 0
        if dropped:
            taken.append(self._say_dropped(dropped))
        for note in self._notes:
            line = note()
            if line is not None:
                taken.append(line)
        return taken


def _writes(lines: list[str], encoding: str) -> deque[bytes | memoryview]:
    """The data of the write()s for these lines: each line whole, with as many whole others as
    fit in WRITE_BYTES. A line of several (a log line and its traceback) is one line here."""
    text = "\n".join(lines)
    data = (text + "\n").encode(encoding, "backslashreplace")
    writes: deque[bytes | memoryview] = deque()
    if len(data) <= WRITE_BYTES:
        writes.append(data)
    elif text.count("\n") == len(lines) - 1:
        # One line each: cut after the last newline that fits, or the line's own if it is longer.
        view, start = memoryview(data), 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + WRITE_BYTES) + 1
            if end <= start:
                end = data.index(b"\n", start) + 1
            writes.append(view[start:end])
            start = end
    else:
        part: list[bytes] = []
        size = 0
        for line in lines:
            encoded = line.encode(encoding, "backslashreplace") + b"\n"
            if part and size + len(encoded) > WRITE_BYTES:
                writes.append(b"".join(part))
                part, size = [], 0
            part.append(encoded)
            size += len(encoded)
        writes.append(b"".join(part))
    return writes


def _relay(pid: int, debug: bool) -> None:
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    records = socket.socket(fileno=0)
    writer = LineWriter(
        Outlet(1),
        name="relay-writer",
        dropped=lambda count: f"{_stamp(time.time())} WARNING {NAME}[{pid}]: " + DROPPED % count,
        max_chars=RELAY_HELD_CHARS,
        encoding=getattr(sys.stdout, "encoding", None) or "utf-8",
    )
    try:
        while True:
            record = records.recv(RECORD_BYTES)
            if not record:
                # The end, or a write() of nothing: only the end hangs up.
                poll = select.poll()
                poll.register(records, select.POLLRDHUP | select.POLLHUP)
                if poll.poll(0):
                    return
                continue
            # Never waits on stderr: the socket is read on, and no writer waits for it.
            for line in log_lines(record, pid, debug, time.time()):
                writer.put(line)
    finally:
        writer.finish()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        _relay(int(sys.argv[1]), sys.argv[2].upper() == "DEBUG")

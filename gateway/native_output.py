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

Run as a script (stdlib only, `python -I -S native_output.py PID LEVEL`), it is the relay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

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
    """The log lines for one record written to stderr by process `pid`: a decoder's word as
    one DEBUG line (none unless `debug`), anything else as a WARNING line for each of its
    lines."""
    if record.startswith(DECODER_WORDS):
        if not debug:
            return []
        level, lines = "DEBUG", [record.rstrip(b"\r\n")]
    else:
        level, lines = "WARNING", [line for line in record.splitlines() if line.strip()]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    stamp += f",{int(now % 1 * 1000):03d}"
    return [
        f"{stamp} {level} {NAME}[{pid}]: {escaped(line.decode('utf-8', 'backslashreplace'))}\n"
        for line in lines
    ]


def _relay(pid: int, debug: bool) -> None:
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    records = socket.socket(fileno=0)
    out = sys.stdout
    writing = True
    while True:
        record = records.recv(RECORD_BYTES)
        if not record:
            # The end, or a write() of nothing: only the end hangs up.
            poll = select.poll()
            poll.register(records, select.POLLRDHUP | select.POLLHUP)
            if poll.poll(0):
                return
            continue
        if not writing:
            continue  # stderr is gone: read on, so that no writer waits on a full socket
        try:
            out.writelines(log_lines(record, pid, debug, time.time()))
            out.flush()
        except OSError:
            writing = False


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        _relay(int(sys.argv[1]), sys.argv[2].upper() == "DEBUG")

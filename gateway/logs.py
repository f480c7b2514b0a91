"""The server's log: its own lines in one format, on stderr, with nothing a client sent able to
make a line of its own, and the access records, one JSON line per request. A thread of each
process's own writes them, and no thread that logs waits for stderr's reader (see
native_output.LineWriter)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from types import TracebackType
from typing import TextIO

from gateway import native_output
from gateway.config import Settings
from gateway.native_output import escaped

log = logging.getLogger("gateway")

# The server's own lines; tools wait for the ready line in this shape.
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


# Lines a process holds while stderr takes none (a pipe whose reader has stalled), its access
# records and its own lines together: past this many, new ones are dropped and counted. Up to
# about 50 MB of access records; they had piled up for as long as the pipe stayed full.
MAX_HELD = 100_000
# Characters of the process's own lines held at most, a traceback and its line being one: a
# model that failed on every request held one traceback (a few KB) per request.
MAX_HELD_CHARS = 8 << 20
# Seconds between two writes of the access records (none wakes the writer).
FLUSH_INTERVAL = 0.05


def _line_writer(
    stream: TextIO | None, formatter: logging.Formatter | None = None
) -> native_output.LineWriter:
    """A writer of log lines to `stream`'s descriptor (see native_output.LineWriter): no thread
    that logs waits on stderr. At exit it writes what it holds, but waits a moment at most."""
    say = formatter or OneLineFormatter(FORMAT)

    def dropped(count: int) -> str:
        args = (count,)
        return say.format(
            logging.LogRecord("gateway", logging.WARNING, "", 0, native_output.DROPPED, args, None)
        )

    writer = native_output.LineWriter(
        _outlet(stream),
        name="log-writer",
        dropped=dropped,
        max_lines=MAX_HELD,
        max_chars=MAX_HELD_CHARS,
        encoding=getattr(stream, "encoding", None) or "utf-8",
        interval=FLUSH_INTERVAL,
    )
    atexit.register(writer.finish)
    return writer


def _outlet(stream: TextIO | None) -> native_output.Writable | None:
    if stream is None:
        return None  # started with stderr closed (2>&-): the log goes nowhere, as Python's own
    try:
        return native_output.Outlet(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return _StreamOutlet(stream)


class _StreamOutlet:
    """A stream without a descriptor (an io.StringIO standing in for sys.stderr), written as it
    is: there is no reader to stall."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: bytes | memoryview) -> int:
        encoding = getattr(self._stream, "encoding", None) or "utf-8"
        self._stream.write(bytes(data).decode(encoding, "backslashreplace"))
        self._stream.flush()
        return len(data)

    def wait(self, timeout: float) -> bool:
        return True


class _LogLineWriter(logging.Handler):
    """The server's own lines: formatted on the thread that logs, as a StreamHandler's are, and
    written by the process's log writer (_line_writer), which that thread does not wait for."""

    def __init__(self, writer: native_output.LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.put(self.format(record))
        except RecursionError:  # as StreamHandler.emit
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        # logging.shutdown() calls it, as the process exits.
        self._writer.finish()


class _AccessLogWriter(logging.Handler):
    """Access records, written every FLUSH_INTERVAL seconds by the process's log writer
    (_line_writer), among its own lines.

    A request thread only appends the record's line to the writer's deque (atomic under the
    GIL): no handler lock, no write, and no thread woken per request. On a 64x64 PNG over gRPC
    (one worker) the log cost about 19% of the throughput with a QueueListener woken for each
    record, and costs about 8% this way.
    """

    def __init__(self, writer: native_output.LineWriter) -> None:
        super().__init__()
        self._writer = writer
        self._lines = writer.lines
        self._dropped = 0
        self._drop_lock = threading.Lock()
        writer.add_note(self._say_dropped)

    def handle(self, record: logging.LogRecord) -> bool:
        if len(self._lines) < MAX_HELD:
            self._lines.append(record.getMessage())
        else:
            with self._drop_lock:
                self._dropped += 1
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        # logging.shutdown() calls it, as the process exits.
        self._writer.finish()

    def _say_dropped(self) -> str | None:
        with self._drop_lock:
            dropped, self._dropped = self._dropped, 0
        # In the access log's own shape, where its readers look.
        return json.dumps({"dropped_access_records": dropped}) if dropped else None


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)  # a Ctrl-C is no error of the gateway's
        return
    log.critical("uncaught exception", exc_info=(kind, error, trace))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return  # as Python's own hook: a thread's way to end
    name = args.thread.name if args.thread is not None else "?"
    error = args.exc_value
    log.error(
        "uncaught exception in thread %s",
        name,
        exc_info=None if error is None else (args.exc_type, error, args.exc_traceback),
    )


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    error = unraisable.exc_value
    log.error(
        "%s: %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=None if error is None else (type(error), error, unraisable.exc_traceback),
    )


class OneLineFormatter(logging.Formatter):
    """The server's lines, each message on one line, control characters escaped, and so the
    messages of a traceback's exceptions: what a client sent (a parameter a model put into its
    exception, say) cannot start a line of its own, such as a forged access record. A
    traceback's own lines (its frames) stay as Python writes them."""

    def format(self, record: logging.LogRecord) -> str:
        # A traceback another handler formatted first is cached in the record, unescaped.
        record.exc_text = None
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A warning's text ends with a newline of its own (warnings.formatwarning).
        record.message = escaped(record.message.rstrip("\n"))
        return super().formatMessage(record)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        kind, error, trace = ei
        if kind is None or error is None:
            return super().formatException(ei)
        formatted = traceback.TracebackException(kind, error, trace)
        _escape_messages(formatted, set())
        return "".join(formatted.format()).rstrip("\n")


def _escape_messages(formatted: traceback.TracebackException, seen: set[int]) -> None:
    """Escape the message and notes of an exception and of those chained to it."""
    if id(formatted) in seen:
        return
    seen.add(id(formatted))
    # TracebackException keeps the exception's str() in _str, and formats from it.
    message = getattr(formatted, "_str", None)
    if isinstance(message, str):
        setattr(formatted, "_str", escaped(message))  # noqa: B010 - private: see above
    notes = getattr(formatted, "__notes__", None)
    if isinstance(notes, list):
        formatted.__notes__ = [escaped(str(note)) for note in notes]
    chained = [formatted.__cause__, formatted.__context__, *(formatted.exceptions or ())]
    for other in chained:
        if other is not None:
            _escape_messages(other, seen)


def let_broken_streams_go() -> None:
    """Point stdout and stderr at /dev/null where their reader has gone (a closed pipe), as the
    process is about to exit: Python's last flush of them failed, and a clean stop exited 120
    (one process) or 1 (a supervisor, for its workers' 120)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)


def configure(settings: Settings, relay_native: bool = False) -> None:
    """Set up the log on stderr. `relay_native` (a process that decodes) first sends what its
    native code writes to stderr through a relay (gateway.native_output): before the handlers
    take hold of sys.stderr, which the relay's set-up moves to a copy of the descriptor."""
    if relay_native:
        native_output.capture(settings.log_level)
    # Every request makes a LogRecord (its access record). These fields are not in any format
    # here, and filling them (the caller's frame walk above all) is the costly part of a record;
    # the logging HOWTO's "Optimization" section names the same switches.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    # One writer for the process's lines, its own and its access records: written in the
    # order they came, never two at once, and by a thread that nobody who logs waits for.
    formatter = OneLineFormatter(FORMAT)
    writer = _line_writer(sys.stderr, formatter)
    handler = _LogLineWriter(writer)
    handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    # What Python writes to stderr on its own (a model's warning, an exception a thread of its
    # own left, one raised in a __del__, one that ends the process) as log lines too: a time,
    # a level and the process.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught
    sys.unraisablehook = _log_unraisable
    access = logging.getLogger("gateway.access")
    if settings.access_log == "off":
        access.setLevel(logging.WARNING)
        return
    # Bare JSON lines, apart from the server's own log lines. Its own level: --log-level
    # WARNING quiets the server's log, and had silenced the access log with it.
    access.setLevel(logging.INFO)
    access.addHandler(_AccessLogWriter(writer))
    access.propagate = False

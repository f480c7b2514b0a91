"""The server's log: its own lines in one format, on stderr, with nothing a client sent able to
make a line of its own, and the access records, one JSON line per request."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from collections import deque
from types import TracebackType
from typing import TextIO

from gateway import native_output
from gateway.config import Settings
from gateway.native_output import escaped

log = logging.getLogger("gateway")

# The server's own lines; tools wait for the ready line in this shape.
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class _AccessLogWriter(logging.Handler):
    """Access records, written by a thread of their own every FLUSH_INTERVAL seconds.

    A request thread only appends the record's line to a deque (atomic under the GIL): no
    handler lock, no write, and no thread woken per request. On a 64x64 PNG over gRPC (one
    worker) the log cost about 19% of the throughput with a QueueListener woken for each record,
    and costs about 8% this way.
    """

    FLUSH_INTERVAL = 0.05
    # Records held while stderr takes none (a pipe whose reader stalls): past this many, new
    # ones are dropped and counted. They had piled up for as long as the pipe stayed full.
    MAX_HELD = 100_000

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._drop_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        threading.Thread(target=self._write_forever, name="access-log", daemon=True).start()
        atexit.register(self.flush)

    def handle(self, record: logging.LogRecord) -> bool:
        if len(self._lines) < self.MAX_HELD:
            self._lines.append(record.getMessage())
        else:
            with self._drop_lock:
                self._dropped += 1
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        with self._flush_lock:
            lines = []
            while True:
                try:
                    lines.append(self._lines.popleft())
                except IndexError:
                    break
            with self._drop_lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                # In the access log's own shape, where its readers look.
                lines.append(json.dumps({"dropped_access_records": dropped}))
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()

    def _write_forever(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.FLUSH_INTERVAL):
            # stderr gone: the lines are dropped rather than hoarded.
            with contextlib.suppress(OSError, ValueError):
                self.flush()


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
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
    access.addHandler(_AccessLogWriter(sys.stderr))
    access.propagate = False

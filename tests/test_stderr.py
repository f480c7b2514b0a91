"""Every line the gateway writes to stderr is a log line (a time, a level, the process) or an
access record: what native code writes (gateway.native_output), for one process and for
workers, however the process that wrote it ends, and what Python writes on its own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import requests

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway import logs
from tests.conftest import DATA, wait_for
from tests.test_process import BIN, FILES, READY, Served, answers, launch

OCTET = {"Content-Type": "application/octet-stream"}
FORGED = b'{"request_id":"forged","status":"OK"}'
NATIVE = r"\S+ \S+ (?P<level>DEBUG|WARNING) gateway\.native\[\d+\]: "


def forged_png() -> bytes:
    """A PNG whose ICC profile is named with a forged access record between two newlines, and
    claims more tags than it holds: libpng warns of it on stderr, quoting the name as it is.
    The image decodes all the same."""
    data = (DATA / "images" / "icc_profile_rgba.png").read_bytes()
    start = data.index(b"iCCP") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    _, rest = data[start + 8 : start + 8 + length].split(b"\x00", 1)
    profile = bytearray(zlib.decompress(rest[1:]))
    struct.pack_into(">I", profile, 128, 100_000)  # the tag count
    body = b"x\n" + FORGED + b"\nz\x00\x00" + zlib.compress(bytes(profile))
    crc = struct.pack(">I", zlib.crc32(b"iCCP" + body))
    return (
        data[:start]
        + struct.pack(">I", len(body))
        + b"iCCP"
        + body
        + crc
        + data[start + 12 + length :]
    )


def gateway(
    tmp_path: Path, *args: str, models: tuple[str, ...] = ("shape", "tests.models:native_writer")
) -> Served:
    flags = [flag for model in models for flag in ("--model", model)]
    return launch(tmp_path, "--http-port", "0", "--grpc-port", "0", *flags, *args)


@pytest.mark.parametrize(("workers", "level"), [("1", "INFO"), ("2", "DEBUG")])
def test_no_client_can_write_lines_of_its_own_into_the_log(
    tmp_path: Path, workers: str, level: str
) -> None:
    # libpng's warning went to stderr as written: a forged access record on a line of its own.
    s = gateway(tmp_path, "--workers", workers, "--log-level", level)
    forged = forged_png()
    try:
        answer = requests.post(s.http_url, data=forged, headers=OCTET, timeout=10)
        assert answer.json() == [57, 57, 3]
        with grpc.insecure_channel(s.grpc_target) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            reply = stub.Infer(pb.InferRequest(image=pb.Image(data=forged)), timeout=10)
            assert [v.number_value for v in reply.result.output.list_value.values] == [57, 57, 3]
        # What a model's native library writes (an escape sequence included) is a warning.
        said = requests.post(
            f"{s.http_url}/v1/models/native-writer/infer",
            params={"say": "native says hi\x1b[31m\n"},
            data=Path(FILES[1]).read_bytes(),
            headers=OCTET,
            timeout=10,
        )
        assert said.status_code == 200, said.text
        wait_for(lambda: "native says hi" in s.log.read_text(), "the model's line", 10)
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    lines = s.log.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert "forged" not in {r["request_id"] for r in records}
    assert len(records) == 3
    assert not [line for line in lines if line.startswith(("libpng", "z'"))], lines
    assert re.search(NATIVE + r"native says hi\\x1b\[31m$", "\n".join(lines), re.M), lines
    quoted = [line for line in lines if "libpng" in line]
    if level == "INFO":
        assert not quoted  # the client was told; the log needs no line a damaged image
    else:
        # One line a warning, its newlines escaped, once a protocol.
        assert len(quoted) == 2, quoted
        for line in quoted:
            match = re.match(NATIVE + r"libpng warning: iCCP: profile 'x\\n(.*)\\nz': ", line)
            assert match and match["level"] == "DEBUG", line
            assert match[2] == FORGED.decode(), line


def test_what_a_dying_worker_writes_last_reaches_the_log(tmp_path: Path) -> None:
    # The lines go through a process of their own, which outlives the one that wrote them.
    s = gateway(tmp_path, "--workers", "2")
    try:
        with pytest.raises(requests.ConnectionError):
            requests.post(
                f"{s.http_url}/v1/models/native-writer/infer",
                params={"say": "last words\n", "then": "abort"},
                data=Path(FILES[1]).read_bytes(),
                headers=OCTET,
                timeout=10,
            )
        wait_for(lambda: "exited with -6" in s.log.read_text(), "the worker's end", 10)
        wait_for(lambda: "last words" in s.log.read_text(), "its last words", 10)
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    assert re.search(NATIVE + "last words$", s.log.read_text(), re.M)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_gateway_started_with_stderr_closed_serves(workers: str) -> None:
    # As `image-gateway serve 2>&-`: with no stderr to relay from, it served as before.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = ["sh", "-c", 'exec "$@" 2>&-', "sh", str(BIN / "image-gateway")]
    proc = subprocess.Popen(
        [*closed, "serve", "--http-port", str(port), "--grpc-port", "0", "--workers", workers],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/healthz"), "the gateway serves", seconds=30)
        answer = requests.post(url, data=forged_png(), headers=OCTET, timeout=10)
        assert answer.json() == [57, 57, 3]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_what_python_writes_on_its_own_is_logged(tmp_path: Path) -> None:
    # A model's warning, a thread's uncaught exception and one in a __del__ were written to
    # stderr as Python prints them, without a time, a level or the process.
    s = gateway(tmp_path, "--workers", "1", models=("tests.models:untidy",))
    try:
        answer = requests.post(s.http_url, data=Path(FILES[1]).read_bytes(), headers=OCTET)
        assert answer.json() == [128, 128, 3]
        wait_for(lambda: "__del__ of the model" in s.log.read_text(), "the __del__'s error", 10)
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    text = s.log.read_text()
    logged = r"^\S+ \S+ (WARNING|ERROR) (py\.warnings|gateway)\[\d+\]: "
    warned = logged + r".*UserWarning: an untidy model warns\\n  warnings\.warn\(.*\)$"
    assert re.search(warned, text, re.M), text
    assert re.search(logged + r"uncaught exception in thread untidy-thread$", text, re.M), text
    assert re.search(
        logged + r"Exception ignored in: <function _FailsWhenCollected\.__del__", text, re.M
    )
    # Tracebacks follow their log line; no line starts as Python's own prints do.
    assert not re.search(r"^(Exception in thread|Exception ignored in)", text, re.M), text
    assert not re.search(r"^\S+\.py:\d+: UserWarning", text, re.M), text


def test_an_exception_quoting_what_a_client_sent_stays_on_its_line(tmp_path: Path) -> None:
    # A model's exception that quoted a parameter made the last lines of its traceback: a
    # client could write any line into the log, a forged ready line or access record.
    s = gateway(tmp_path, "--workers", "1", models=("tests.models:untidy",))
    forged_ready = "2026-01-01 00:00:00,000 INFO gateway[1]: image-gateway ready: http=http://x:1"
    sent = f"x\n{FORGED.decode()}\n{forged_ready}\r\x1b[2K"
    try:
        answer = requests.post(
            s.http_url,
            params={"fail": sent},
            data=Path(FILES[1]).read_bytes(),
            headers=OCTET,
            timeout=10,
        )
        assert answer.json()["error"]["code"] == "model_error"
        wait_for(lambda: "cannot use" in s.log.read_text(), "the model's error", 10)
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0
    lines = s.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith((FORGED.decode(), forged_ready))]
    ready = [
        line
        for line in lines
        if re.match(r"\S+ \S+ INFO gateway\[\d+\]: image-gateway ready", line)
    ]
    assert len(ready) == 1, ready
    (error,) = [line for line in lines if line.startswith("ValueError")]
    assert error == "ValueError: cannot use x\\n" + FORGED.decode() + "\\n" + forged_ready + (
        "\\r\\x1b[2K"
    ), error


def test_an_exception_that_ends_the_process_is_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing a client does reaches the main thread uncaught; a bug of the gateway's would, and
    # its traceback was printed bare, the rest of the log being lines with a time and a level.
    try:
        raise RuntimeError("the main thread failed\nfor good")
    except RuntimeError as exc:
        error = exc
    with caplog.at_level(logging.CRITICAL, logger="gateway"):
        logs._log_uncaught(RuntimeError, error, error.__traceback__)
    (record,) = caplog.records
    assert (record.levelname, record.getMessage()) == ("CRITICAL", "uncaught exception")
    formatted = logs.OneLineFormatter(logs.FORMAT).format(record)
    assert formatted.splitlines()[-1] == "RuntimeError: the main thread failed\\nfor good"


# Makes the process it runs a subreaper, as a container's first process (PID 1) is: orphaned
# descendants become its children, for it to reap.
SUBREAPER = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_a_replaced_or_killed_worker_leaves_no_zombie_behind(tmp_path: Path) -> None:
    # Each worker's relay outlived it, and a gateway running as PID 1 inherited it and never
    # reaped it: a zombie for every worker a reload (or a stop of its own) replaced, or that
    # was killed.
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBREAPER, str(BIN / "image-gateway"), "serve",
         "--http-port", "0", "--grpc-port", "0", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        wait_for(lambda: READY.search(log.read_text()) is not None, "the gateway serves", 30)
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "reload done" in log.read_text(), "the reload", 60)
        assert not _zombies(proc.pid), log.read_text()
        # A worker killed outright cannot wait for its relay, which the gateway adopts.
        workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
        os.kill(int(workers[0]), signal.SIGKILL)
        wait_for(lambda: "exited with -9" in log.read_text(), "the worker's end", 10)
        wait_for(lambda: not _zombies(proc.pid), "no zombie left", 10)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return ""


def _workers(pid: int) -> set[str]:
    return {child for child in _children(pid) if "spawn_main" in _cmdline(child)}


def _zombies(pid: int) -> list[str]:
    return [child for child in _children(pid) if _state(child) == "Z"]


def _state(pid: str) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def test_access_records_stderr_does_not_take_are_counted_not_hoarded() -> None:
    # A pipe whose reader stalls (a log shipper that stopped) takes nothing: the records piled
    # up in the worker's memory for as long as it lasted. Past MAX_HELD they are dropped, and a
    # line counts them once stderr takes lines again.
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")  # open while its writer writes to it
    writer = logs._AccessLogWriter(logs._line_writer(stream))
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, '{"r": 1}', None, None)
    handled = 0
    while writer._dropped == 0:
        assert handled < 10 * logs.MAX_HELD, "nothing dropped"
        writer.handle(record)
        handled += 1
    for _ in range(99):
        writer.handle(record)
    assert len(writer._lines) <= logs.MAX_HELD
    # The reader comes back: every line is a record, or the count of those dropped since the
    # last line written, and together they account for every record handled.
    records = dropped = 0
    with os.fdopen(read_fd, "rb") as pipe:
        while records + dropped < handled + 99:
            line = pipe.readline()
            if line == b'{"r": 1}\n':
                records += 1
            else:
                dropped += json.loads(line)["dropped_access_records"]
    assert dropped >= 100
    # At most what the writer had taken to write when the pipe filled, and what it held then.
    assert records <= 2 * logs.MAX_HELD


def test_log_lines_stderr_does_not_take_are_counted_not_hoarded() -> None:
    # The server's own lines were written by the thread that logged them, which waited for as
    # long as the pipe stayed full. Now they wait in the process's log writer, up to
    # MAX_HELD_CHARS (a traceback is part of its line), and a line counts those dropped.
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    writer = logs._line_writer(stream)
    handler = logs._LogLineWriter(writer)
    handler.setFormatter(logs.OneLineFormatter(logs.FORMAT))
    message = "y" * 10_000
    record = logging.LogRecord("gateway", logging.ERROR, "", 0, message, None, None)
    handled = 0
    while writer._dropped == 0:
        assert handled < 10 * logs.MAX_HELD_CHARS // len(message), "nothing dropped"
        handler.handle(record)
        handled += 1
    for _ in range(99):
        handler.handle(record)
    # Its own descriptor is the pipe opened anew, non-blocking: stderr's own (shared with the
    # shell that started the gateway) is left blocking.
    assert os.get_blocking(write_fd)
    logged = dropped = 0
    with os.fdopen(read_fd, "rb") as pipe:
        while logged + dropped < handled + 99:
            line = pipe.readline().decode()
            start = LOG_LINE.match(line)
            assert start is not None, line[:200]
            if line[start.end() :] == message + "\n":
                logged += 1
            else:
                count = re.fullmatch(
                    r"(\d+) log lines dropped while stderr took none\n", line[start.end() :]
                )
                assert count is not None, line[:200]
                dropped += int(count[1])
    assert dropped >= 100
    # What the pipe took, what the writer had taken when it filled, and what waited after.
    assert logged * len(message) <= 2 * logs.MAX_HELD_CHARS + 2 * 64 * 1024
    stream.close()


def test_the_last_flush_gives_up_on_a_reader_that_never_reads() -> None:
    # A process exits a moment after its stop, whatever stderr's reader does.
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as stream:
        writer = logs._line_writer(stream)
        for _ in range(1000):
            writer.put("z" * 100)  # more than the pipe's 64 KiB
        assert not writer.finish()
        assert not writer.finish()  # at once: it gave up
    os.close(read_fd)


# A line of the server's own format, from the start of the time to the message.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+\[\d+\]: ")
# What native code writes in one write(), a line at a time: 64 KB.
NATIVE_LINE, NATIVE_LINES = "x" * 99 + "\n", "640"


class _StalledReader:
    """The read end of a gateway's stderr, read only when asked: between two reads it stalls,
    as a log collector that stopped reading does, and the pipe fills."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.fd = proc.stderr.fileno()
        self.text = ""

    def read_until(self, found: Callable[[str], bool], what: str, seconds: float = 30) -> None:
        """Read what has come until `found(text so far)`, or until the pipe ends."""
        deadline = time.monotonic() + seconds
        while not found(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not within {seconds:g} s: {what}\n{self.text[-3000:]}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 1 << 16)
                if not data:
                    return
                self.text += data.decode("utf-8", "backslashreplace")

    def unread(self) -> int:
        """The bytes in the pipe that nobody has read."""
        return int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, bytes(4)), sys.byteorder)


def _fill_stderr(url: str) -> None:
    """Make the gateway write several megabytes to stderr: native code's lines (through the
    relay) and the access records of the requests that write them."""
    with requests.Session() as session:
        for _ in range(80):
            said = session.post(
                f"{url}/v1/models/native-writer/infer",
                params={"say": NATIVE_LINE, "times": NATIVE_LINES},
                data=Path(FILES[1]).read_bytes(),
                headers=OCTET,
                timeout=10,
            )
            assert said.status_code == 200, said.text


@contextlib.contextmanager
def _gateway_on_a_stalled_pipe(
    workers: str, *flags: str
) -> Iterator[tuple[subprocess.Popen[bytes], _StalledReader, re.Match[str]]]:
    """A gateway whose stderr is a pipe the test reads only when it says (`_StalledReader`),
    serving: the process, the reader, and the match of its ready line (HTTP URL, gRPC
    target). Killed on the way out if it has not stopped."""
    proc = subprocess.Popen(
        [str(BIN / "image-gateway"), "serve", "--http-port", "0", "--grpc-port", "0",
         "--workers", workers, *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    reader = _StalledReader(proc)
    try:
        reader.read_until(lambda text: READY.search(text) is not None, "the gateway serves")
        ready = READY.search(reader.text)
        assert ready is not None, reader.text
        yield proc, reader, ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_log_reader_that_stalls_stops_neither_serving_nor_stopping(workers: str) -> None:
    # A pipe whose reader stalls (a log collector that stopped reading, `| less` left paused)
    # took the log's writes until it held 64 KiB, and then kept every writer waiting: a request
    # whose native code wrote to stderr, one whose model failed (its traceback is logged), and
    # the stop signal's own log line, which came before the stop. The gateway answered nobody
    # and stopped only when killed.
    models = ("shape", "tests.models:native_writer", "tests.models:untidy")
    flags = [flag for model in models for flag in ("--model", model)]
    with _gateway_on_a_stalled_pipe(workers, *flags) as (proc, reader, ready):
        url, target = ready.group(1), ready.group(2)
        _fill_stderr(url)
        assert reader.unread() > 32 * 1024
        # Served on both protocols all the same, with failures logged, tracebacks and all.
        png = Path(FILES[1]).read_bytes()
        answer = requests.post(url, data=png, headers=OCTET, timeout=10)
        assert answer.json() == [128, 128, 3]
        failed = requests.post(
            f"{url}/v1/models/untidy/infer",
            params={"fail": "while stalled"},
            data=png,
            headers=OCTET,
            timeout=10,
        )
        assert failed.json()["error"]["code"] == "model_error"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ImageGatewayServiceStub(channel)
            reply = stub.Infer(pb.InferRequest(image=pb.Image(data=png)), timeout=10)
            assert [v.number_value for v in reply.result.output.list_value.values] == [128, 128, 3]
            with pytest.raises(grpc.RpcError) as error:
                stub.Infer(
                    pb.InferRequest(
                        model="untidy", image=pb.Image(data=png), parameters={"fail": "over gRPC"}
                    ),
                    timeout=10,
                )
            assert error.value.code() == grpc.StatusCode.INTERNAL, error.value
        # The reader comes back: what did not fit is counted, once stderr takes lines again,
        # and what was held is written, the tracebacks logged while it stalled among them.
        reader.read_until(
            lambda text: "over gRPC" in text and "log lines dropped while stderr took none" in text,
            "the count of the lines dropped, and the lines held",
        )
        # It stalls again, and the gateway stops on SIGTERM all the same.
        _fill_stderr(url)
        assert reader.unread() > 32 * 1024
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # Its relays end once their lines are written, or when they give them up.
        reader.read_until(lambda _: False, "the end of stderr")
    dropped = re.findall(
        NATIVE + r"(\d+) log lines dropped while stderr took none$", reader.text, re.M
    )
    assert dropped and all(int(count) > 0 for _, count in dropped), reader.text[-3000:]
    # No line was cut short or written into another: each is whole, a log line, an access
    # record or a line of a traceback that follows one.
    for line in reader.text.splitlines():
        if line.startswith("{"):
            assert set(json.loads(line)) >= {"request_id", "status"}, line
        elif not LOG_LINE.match(line):
            assert line.startswith(("Traceback", "  ", "ValueError: cannot use")), line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_signals_are_acted_on_while_stderr_takes_nothing(workers: str) -> None:
    # The access records alone fill the pipe: their writer waited, and requests were answered
    # all the same, but the line that a signal was received waited for the reader, before the
    # reload or the stop: the workers were never replaced, and the gateway stopped only when
    # killed.
    with _gateway_on_a_stalled_pipe(workers) as (proc, reader, ready):
        png = Path(FILES[1]).read_bytes()
        with requests.Session() as session:

            def answered() -> bool:
                answer = session.post(ready.group(1), data=png, headers=OCTET, timeout=10)
                return bool(answer.json() == [128, 128, 3])

            # Until the pipe takes no more: the records of a hundred requests (about 25 KB),
            # written within 50 ms, leave it as it was.
            held = [reader.unread()]
            while len(held) < 2 or held[-2] < held[-1]:
                assert len(held) < 100, f"the pipe still takes records: {held}"
                assert all(answered() for _ in range(100))
                time.sleep(0.2)
                held.append(reader.unread())
            if workers == "2":
                before = _workers(proc.pid)
                proc.send_signal(signal.SIGUSR1)
                wait_for(
                    lambda: len(_workers(proc.pid)) == 2 and not _workers(proc.pid) & before,
                    "both workers replaced",
                    60,
                )
                assert all(answered() for _ in range(10))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

"""Reloads: SIGUSR1 to a gateway of several workers replaces them one at a time, each old one
finishing its requests, so new model code and weights are served without a stop. A worker
whose model call has hung is replaced the same way."""

from __future__ import annotations

import contextlib
import os
import py_compile
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import GatewayClient
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from clients.results import GatewayClientError
from tests.conftest import DATA, wait_for
from tests.test_process import Served, kill_left, launch, replaced, replacements, spawned

IMAGE = (DATA / "images" / "hopper.png").read_bytes()

# A model that answers with the text of version.txt as it was when the model loaded, and fails
# to load while that text is "broken".
VERSIONED = """
from pathlib import Path


class Versioned:
    name = "versioned"
    description = "the version file's text when it loaded"

    def __init__(self, version):
        self.version = version

    def predict(self, images, params):
        return [self.version for _ in images]


def create():
    version = Path(__file__).with_name("version.txt").read_text().strip()
    if version == "broken":
        raise RuntimeError("weights missing")
    return Versioned(version)
"""


def versioned(tmp_path: Path, *args: str) -> Served:
    (tmp_path / "versioned.py").write_text(VERSIONED)
    (tmp_path / "version.txt").write_text("v1")
    return launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--model", "versioned:create", *args,
        cwd=tmp_path,
    )  # fmt: skip


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Served]:
    s = versioned(tmp_path, "--workers", "2")
    yield s
    if s.proc.poll() is None:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


def reload(s: Served) -> None:
    done = s.log.read_text().count("reload ")  # "reload done" or "reload stopped"
    os.kill(s.proc.pid, signal.SIGUSR1)
    wait_for(lambda: s.log.read_text().count("reload ") > done, "the reload's end", 60)


def answers(s: Served) -> set[str]:
    """What the model answers over both protocols, on fresh connections (so both workers)."""
    seen = set()
    for url in [s.http_url] * 6 + [f"grpc://{s.grpc_target}"] * 6:
        with GatewayClient(url, channels=1) as client:
            seen.add(client.infer(IMAGE).output)
    return seen


def test_a_reload_serves_the_new_model_without_failing_a_request(
    two_workers: Served, tmp_path: Path
) -> None:
    s = two_workers
    before = set(spawned(s.proc.pid))
    assert answers(s) == {"v1"}
    # Clients calling all along, over both protocols, and a stream left open.
    stop = threading.Event()
    outputs: list[str] = []
    errors: list[str] = []

    def call(url: str) -> None:
        with GatewayClient(url) as client:
            while not stop.is_set():
                try:
                    outputs.append(client.infer(IMAGE).output)
                except GatewayClientError as exc:
                    errors.append(f"{url}: {exc.code}: {exc.message}")

    callers = [
        threading.Thread(target=call, args=(url,))
        for url in (s.http_url, s.http_url, f"grpc://{s.grpc_target}", f"grpc://{s.grpc_target}")
    ]
    for caller in callers:
        caller.start()
    channel = grpc.insecure_channel(s.grpc_target)
    stream = pb_grpc.ImageGatewayServiceStub(channel).InferStream(
        _held_open(stop, pb.InferRequest(image=pb.Image(data=IMAGE)))
    )
    assert next(stream).result.output.string_value == "v1"
    try:
        wait_for(lambda: len(outputs) >= 20, "calls before the reload", 30)
        (tmp_path / "version.txt").write_text("v2")
        reload(s)
        wait_for(lambda: outputs[-1] == "v2", "an answer of the new model", 30)
        count = len(outputs)
        wait_for(lambda: len(outputs) >= count + 20, "calls after the reload", 30)
        # The stream's worker has gone: the stream ended as at a stop, to be opened again.
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(ended.value.trailing_metadata() or ())["error-code"] == "shutting_down"
    finally:
        stop.set()
        for caller in callers:
            caller.join(60)
        channel.close()
    assert errors == []
    assert set(outputs) == {"v1", "v2"}
    assert answers(s) == {"v2"}
    assert "reload done: 2 workers serving" in s.log.read_text()
    wait_for(
        lambda: all(f"replaced worker {pid} exited\n" in s.log.read_text() for pid in before),
        "the old workers' exit",
        30,
    )
    assert not before & set(spawned(s.proc.pid))
    assert len(spawned(s.proc.pid)) == 2


# A model whose answer is written in its code, and the code's file, sized and timed alike for
# each version.
CODED = """
class Coded:
    name = "coded"
    description = "the version written in its code"

    def predict(self, images, params):
        return ["VERSION" for _ in images]


def create():
    return Coded()
"""


def _write_code(path: Path, version: str) -> None:
    path.write_text(CODED.replace("VERSION", version))
    os.utime(path, (1_000_000_000, 1_000_000_000))


@pytest.mark.parametrize("package", [False, True])
def test_a_reload_serves_new_code_of_the_old_code_s_size_and_time(
    tmp_path: Path, package: bool
) -> None:
    # Python takes a module's cached bytecode for current when the source's size and mtime (in
    # whole seconds) are those it was compiled from: code rewritten within a second, or
    # unpacked with fixed times (a reproducible build's archive), was served as the old code.
    if package:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "__init__.py").write_text("")
        code, target = tmp_path / "models" / "coded.py", "models.coded:create"
    else:
        code, target = tmp_path / "coded.py", "coded:create"
    _write_code(code, "c1")
    # Its bytecode, as any run of it writes it (unless told not to, as PYTHONDONTWRITEBYTECODE
    # does): written here, whatever this environment says.
    py_compile.compile(str(code), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    s = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--model", target, "--workers", "2",
        cwd=tmp_path,
    )  # fmt: skip
    try:
        assert answers(s) == {"c1"}
        _write_code(code, "c2")
        reload(s)
        assert "reload done: 2 workers serving" in s.log.read_text()
        assert answers(s) == {"c2"}
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


def _held_open(stop: threading.Event, first: pb.InferRequest) -> Iterator[pb.InferRequest]:
    yield first
    stop.wait()


def test_a_reload_whose_new_worker_cannot_start_leaves_the_old_ones_serving(
    two_workers: Served, tmp_path: Path
) -> None:
    s = two_workers
    before = set(spawned(s.proc.pid))
    (tmp_path / "version.txt").write_text("broken")
    reload(s)
    log = s.log.read_text()
    assert (
        "cannot start: model 'versioned:create' did not load: RuntimeError: weights missing" in log
    )
    assert re.search(
        r"reload stopped: worker \d+ did not start \(exit code 1\); 0 of 2 workers replaced", log
    )
    assert set(spawned(s.proc.pid)) == before
    assert answers(s) == {"v1"}
    # Mended, the next reload goes through.
    (tmp_path / "version.txt").write_text("v3")
    reload(s)
    assert "reload done" in s.log.read_text()
    assert answers(s) == {"v3"}


def test_a_stop_during_a_reload_stops_the_gateway(two_workers: Served, tmp_path: Path) -> None:
    s = two_workers
    # The new worker takes its time to load, and the stop comes meanwhile.
    (tmp_path / "versioned.py").write_text(
        VERSIONED.replace("def create():\n", "def create():\n    import time; time.sleep(3)\n")
    )
    os.kill(s.proc.pid, signal.SIGUSR1)
    wait_for(lambda: "replacing the 2 workers" in s.log.read_text(), "the reload's start")
    wait_for(lambda: len(spawned(s.proc.pid)) == 3, "the new worker's start")
    workers = spawned(s.proc.pid)
    s.proc.terminate()
    assert s.proc.wait(timeout=30) == 0
    assert "image-gateway stopped" in s.log.read_text()
    assert "reload done" not in s.log.read_text()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "their exit")


@pytest.mark.parametrize("which", [0, 1])
def test_a_worker_sent_a_stop_signal_alone_during_a_reload_does_not_hold_it(
    tmp_path: Path, which: int
) -> None:
    # While a reload ran, the supervisor read nothing its workers said: a worker sent a stop
    # signal of its own then drained and waited for a CLOSE for its whole grace, answering
    # every request that reached it 503 shutting_down, and the reload, told to wait for it to
    # retire, waited as long.
    (tmp_path / "staged.py").write_text(
        "import pathlib, time\n"
        "from gateway.models.shape import ShapeModel\n"
        "def create():\n"
        "    if pathlib.Path('slow').exists():\n"
        "        pathlib.Path('loading').touch()\n"
        "        while not pathlib.Path('go').exists():\n"
        "            time.sleep(0.02)\n"
        "    return ShapeModel()\n"
    )
    s = launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--workers", "2",
        "--model", "staged:create", "--shutdown-grace", "300", cwd=tmp_path,
    )  # fmt: skip
    try:
        workers = sorted(spawned(s.proc.pid))  # pids rise (bar a wrap): in order of start
        (tmp_path / "slow").touch()
        os.kill(s.proc.pid, signal.SIGUSR1)
        wait_for((tmp_path / "loading").exists, "the reload's first new worker loads", 30)
        stopped = workers[which]
        os.kill(stopped, signal.SIGTERM)
        wait_for(
            lambda: f"gateway[{stopped}]: received SIGTERM" in s.log.read_text(),
            "the worker drains",
            30,
        )
        (tmp_path / "go").touch()
        wait_for(lambda: "reload done" in s.log.read_text(), "the reload's end", 60)
        assert not Path(f"/proc/{stopped}").exists()
        serving = spawned(s.proc.pid)
        assert len(serving) == 2 and not set(serving) & set(workers), s.log.read_text()
        for _ in range(8):
            answer = requests.post(f"{s.http_url}/", data=IMAGE, timeout=30)
            assert answer.status_code == 200, answer.text
        assert "ERROR" not in s.log.read_text(), s.log.read_text()
    finally:
        kill_left(s.proc, spawned(s.proc.pid))


def test_one_process_logs_that_it_cannot_reload_and_serves_on(tmp_path: Path) -> None:
    s = versioned(tmp_path, "--workers", "1")
    try:
        (tmp_path / "version.txt").write_text("v2")
        os.kill(s.proc.pid, signal.SIGUSR1)
        wait_for(lambda: "ignored" in s.log.read_text(), "the warning")
        assert (
            "received SIGUSR1: a reload replaces worker processes, and this gateway is one "
            "process (--workers 1); ignored"
        ) in s.log.read_text()
        assert answers(s) == {"v1"}
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


# A model whose call hangs, while the file "hang" is there, for a request that asks it to.
HANGING = """
import time
from pathlib import Path

HANG = Path(__file__).with_name("hang")


class Hanging:
    name = "hanging"
    description = "hangs on ?hang=1 while the file 'hang' is there"

    def predict(self, images, params):
        while params.get("hang") and HANG.exists():
            time.sleep(0.05)
        return [list(image.shape) for image in images]


def create():
    return Hanging()
"""


def hanging(tmp_path: Path, workers: str) -> Served:
    (tmp_path / "hanging.py").write_text(HANGING)
    (tmp_path / "hang").touch()
    return launch(
        tmp_path, "--http-port", "0", "--grpc-port", "0", "--model", "hanging:create",
        "--workers", workers, "--request-timeout", "0.5", "--shutdown-grace", "1", cwd=tmp_path,
    )  # fmt: skip


def hang_one(s: Served) -> None:
    """A request whose model call hangs (the client gives up on it at once)."""
    with contextlib.suppress(requests.RequestException):
        requests.post(f"{s.http_url}/?hang=1", data=IMAGE, timeout=0.3)


def test_a_worker_whose_model_call_hangs_is_replaced(tmp_path: Path) -> None:
    s = hanging(tmp_path, "2")
    try:
        before = set(spawned(s.proc.pid))
        hang_one(s)
        wait_for(lambda: "asking for this worker to be replaced" in s.log.read_text(), "it", 30)
        log = s.log.read_text()
        assert "model 'hanging' has run one call for " in log
        assert "over 4 x --request-timeout (2 s), and can answer no one" in log
        (stuck,) = (int(pid) for pid in re.findall(r"gateway\[(\d+)\]: model 'hanging'", log))
        assert stuck in before
        wait_for(
            lambda: f"replaced worker {stuck} exited with 1" in s.log.read_text(),
            "the hung worker's end",
            60,
        )
        assert re.search(
            rf"worker \d+ serving in place of worker {stuck}, which finishes its requests and "
            r"exits \(a model call of the worker it replaces has hung\)",
            s.log.read_text(),
        )
        now = set(spawned(s.proc.pid))
        assert len(now) == 2 and stuck not in now
        assert replacements(s.http_url) == replaced(hung=1)
        for url in [s.http_url] * 4 + [f"grpc://{s.grpc_target}"] * 4:
            with GatewayClient(url, channels=1) as client:
                assert client.infer(IMAGE).output == [128, 128, 3]
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_health(s: Served) -> list[int]:
    """The gateway's gRPC health, for the whole server and for its service."""
    with grpc.insecure_channel(s.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return [
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", "imagegateway.v1.ImageGatewayService")
        ]


def test_one_process_whose_model_call_hangs_is_not_live_until_it_ends(tmp_path: Path) -> None:
    s = hanging(tmp_path, "1")
    try:
        assert requests.get(f"{s.http_url}/healthz", timeout=5).status_code == 200
        hang_one(s)
        wait_for(
            lambda: requests.get(f"{s.http_url}/healthz", timeout=5).status_code == 503,
            "/healthz 503",
            30,
        )
        body = requests.get(f"{s.http_url}/healthz", timeout=5).json()
        assert body["status"] == "hung"
        assert body["reason"].startswith("model 'hanging' has run one call for ")
        assert "/healthz answers 503, and gRPC health NOT_SERVING, until it ends" in (
            s.log.read_text()
        )
        # A gRPC liveness probe sees it too: it had gone on answering SERVING.
        assert grpc_health(s) == [NOT_SERVING, NOT_SERVING]
        # It still serves meanwhile, and is live again once the call ends.
        with GatewayClient(s.http_url) as client:
            assert client.infer(IMAGE).output == [128, 128, 3]
        (tmp_path / "hang").unlink()
        wait_for(
            lambda: requests.get(f"{s.http_url}/healthz", timeout=5).status_code == 200,
            "/healthz 200 again",
            30,
        )
        assert grpc_health(s) == [SERVING, SERVING]
        assert "the model call that had hung has ended" in s.log.read_text()
    finally:
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


def test_a_reload_signal_while_the_gateway_loads_its_modules_does_not_end_it(
    tmp_path: Path,
) -> None:
    # SIGUSR1 ends a process that has not set it aside, and a gateway spends its first half
    # second or so importing its servers before its supervisor takes the signal: one sent then
    # (`systemctl reload` right after `systemctl start`) ended the gateway at once, with no
    # line logged. Here it comes as soon as the gateway's package is loaded.
    (tmp_path / "versioned.py").write_text(VERSIONED)
    (tmp_path / "version.txt").write_text("v1")
    log = tmp_path / "server.log"
    starter = (
        "import os, signal, sys, gateway; os.kill(os.getpid(), signal.SIGUSR1); "
        "from gateway.command import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["serve", "--http-port", "0", "--grpc-port", "0", "--model", "versioned:create"]
    proc = subprocess.Popen(
        [sys.executable, "-c", starter, *args, "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        cwd=tmp_path,
    )
    try:
        wait_for(
            lambda: "image-gateway ready" in log.read_text() or proc.poll() is not None,
            "the gateway's start",
            30,
        )
        assert proc.poll() is None, f"exit code {proc.returncode}: {log.read_text()}"
        match = re.search(r"http=(\S+)", log.read_text())
        assert match is not None
        with GatewayClient(match.group(1)) as client:
            assert client.infer(IMAGE).output == "v1"
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_reload_signal_during_a_reload_is_one_more_reload_each_with_its_done_line(
    two_workers: Served, tmp_path: Path
) -> None:
    # Each SIGUSR1 that came during a reload logged "replacing the 2 workers one at a time",
    # though it only asked for one more reload once this one was over (two such signals, for
    # one), and the two reloads, their workers overlapping, ended with one "reload done": a
    # tool waiting for the done line of the reload it asked for waited for ever.
    s = two_workers
    (tmp_path / "versioned.py").write_text(
        VERSIONED.replace("def create():\n", "def create():\n    import time; time.sleep(1)\n")
    )
    os.kill(s.proc.pid, signal.SIGUSR1)
    wait_for(lambda: len(spawned(s.proc.pid)) == 3, "the first new worker's start")
    os.kill(s.proc.pid, signal.SIGUSR1)
    wait_for(lambda: s.log.read_text().count("received SIGUSR1") == 2, "the second signal")
    os.kill(s.proc.pid, signal.SIGUSR1)
    wait_for(lambda: s.log.read_text().count("serving in place of") == 4, "both reloads", 60)
    replaced = re.findall(r"serving in place of worker (\d+)", s.log.read_text())
    wait_for(
        lambda: all(f"replaced worker {pid} exited" in s.log.read_text() for pid in replaced),
        "the replaced workers' exit",
        30,
    )
    wait_for(lambda: s.log.read_text().count("reload done") >= 2, "a done line each", 5)
    log = s.log.read_text()
    assert log.count("replacing the 2 workers one at a time") == 1
    assert log.count("received SIGUSR1 during a reload; one more reload follows it") == 1
    assert log.count("received SIGUSR1; a reload is due already") == 1
    assert log.count("reload done: 2 workers serving") == 2

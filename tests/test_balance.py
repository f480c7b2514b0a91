"""HTTP connections spread evenly over the workers, whichever worker's listener the kernel
hands them to (gateway.rest.balance): real gateways of two workers, real connections, and which
worker holds each read from /proc."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from tests.conftest import DATA, wait_for
from tests.test_framing import first_answer
from tests.test_process import Served, gateway_of_two, spawned

PNG = (DATA / "images" / "hopper.png").read_bytes()


def _address(served: Served) -> tuple[str, int]:
    url = urlsplit(served.http_url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def _connect(address: tuple[str, int]) -> socket.socket:
    """A keep-alive connection that has had one answer: the server holds it from then on."""
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first_answer(sock)[0] == 200
    return sock


def _infer(sock: socket.socket) -> Any:
    sock.sendall(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {len(PNG)}\r\n\r\n".encode()
        + PNG
    )
    status, _, output = first_answer(sock)
    assert status == 200, output
    return output


def _established(port: int) -> dict[int, str]:
    """The server's side of each connection established to `port`, whether a process holds
    it yet or not: its client's port, and its socket's name in /proc/PID/fd (`socket:[0]`
    while it waits in a listener's queue)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # ESTABLISHED
                found[int(remote.rsplit(":", 1)[1], 16)] = f"socket:[{inode}]"
    return found


def _holders(workers: list[int], port: int) -> dict[int, int]:
    """For each connection established to `port`: its client's port, and the worker holding
    it."""
    by_inode = {name: client for client, name in _established(port).items()}
    held = {}
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                client = by_inode.get(os.readlink(fd))
                if client is not None:
                    held[client] = pid
    return held


def _client_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@contextlib.contextmanager
def _closing(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _split_then_emptied(served: Served, socks: list[socket.socket]) -> tuple[int, int]:
    """Open 16 keep-alive connections, then close those of the worker holding fewer; the
    worker holding 8 or more, and the one holding none of them."""
    address = _address(served)
    workers = spawned(served.proc.pid)
    assert len(workers) == 2
    socks += [_connect(address) for _ in range(16)]
    held = _holders(workers, address[1])
    counts = collections.Counter(held[_client_port(s)] for s in socks)
    more, fewer = sorted(workers, key=lambda pid: -counts[pid])
    for sock in [s for s in socks if held[_client_port(s)] == fewer]:
        socks.remove(sock)
        sock.close()
    wait_for(
        lambda: fewer not in _holders(workers, address[1]).values(),
        "the worker holding fewer has closed its connections",
    )
    return more, fewer


def test_a_worker_holding_more_connections_hands_new_ones_to_the_other(tmp_path: Path) -> None:
    # The kernel picks a worker's listener by a hash of the connection's ports: alone, six new
    # connections would have reached the worker holding none in one run out of 64.
    with gateway_of_two(tmp_path) as served, _closing([]) as socks:
        address = _address(served)
        more, fewer = _split_then_emptied(served, socks)
        new = [_connect(address) for _ in range(6)]
        socks += new
        held = _holders([more, fewer], address[1])
        assert [held[_client_port(s)] for s in new] == [fewer] * 6
        # Handed over unread, each serves as any connection does, keep-alive and all.
        for sock in new:
            assert _infer(sock) == [128, 128, 3]
            assert _infer(sock) == [128, 128, 3]
        assert _holders([more, fewer], address[1])[_client_port(new[0])] == fewer
        metrics = requests.get(served.http_url + "/metrics", timeout=10).text
        assert "\ngateway_http_connections_handed_total " in metrics


def test_open_connections_move_to_the_worker_holding_fewer(tmp_path: Path) -> None:
    # A worker's count can be wrong when a connection comes (its client has closed others
    # the worker has not yet seen close), and the kernel put whole runs of a benchmark's
    # connections 2/6: the one holding more hands its connections over between two requests.
    with gateway_of_two(tmp_path) as served, _closing([]) as socks:
        address = _address(served)
        more, fewer = _split_then_emptied(served, socks)
        assert len(socks) >= 8
        for sock in socks:
            assert _infer(sock) == [128, 128, 3]

        def split() -> list[int]:
            held = collections.Counter(_holders([more, fewer], address[1]).values())
            return [held[more], held[fewer]]

        even = [len(socks) - len(socks) // 2, len(socks) // 2]
        wait_for(lambda: split() == even, f"the connections split {even}")
        # Moved between two requests, each goes on serving its client.
        for sock in socks:
            assert _infer(sock) == [128, 128, 3]
        assert split() == even


def _handed(served: Served) -> float:
    text = requests.get(served.http_url + "/metrics", timeout=10).text
    return sum(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("gateway_http_connections_handed_total ")
    )


def _accept_queue(pid: int, port: int) -> int:
    """Connections waiting for worker `pid` to accept them on `port`."""
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            mine.add(os.readlink(fd))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues, inode = fields[1], fields[3], fields[4], fields[9]
            listening = state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
            if listening and f"socket:[{inode}]" in mine:
                return int(queues.split(":")[1], 16)
    raise AssertionError(f"worker {pid} does not listen on {port}")


def _stopped(pid: int) -> bool:
    """Whether every thread of process `pid` has stopped: a signal reaches each as it next runs."""
    states = [
        Path(task, "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    return all(state == "T" for state in states)


def test_connections_handed_to_a_worker_that_dies_go_to_another(tmp_path: Path) -> None:
    # A worker stopped (SIGSTOP) holds fewest, so new connections are handed to it, and wait
    # there unread; it is then killed. Its count would have stayed where it was, and what it had
    # been handed would have waited for its replacement's start (or been lost with it).
    with gateway_of_two(tmp_path) as served, _closing([]) as socks:
        address = _address(served)
        more, fewer = _split_then_emptied(served, socks)
        handed_before = _handed(served)
        os.kill(fewer, signal.SIGSTOP)
        wait_for(lambda: _stopped(fewer), "the worker has stopped")
        new = [socket.create_connection(address, timeout=30) for _ in range(12)]
        socks += new
        for sock in new:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        clients = {_client_port(s) for s in new}
        # A client's connect() returns before the server's side has reached a listener's queue.
        wait_for(
            lambda: (
                clients <= _established(address[1]).keys() and _accept_queue(more, address[1]) == 0
            ),
            "the running worker has accepted all the kernel gave it",
        )
        # The kernel gave these to the stopped worker's listener: they die with it.
        lost = _accept_queue(fewer, address[1])
        os.kill(fewer, signal.SIGKILL)
        wait_for(
            lambda: f"worker {fewer} exited" in served.log.read_text(),
            "the supervisor has seen the worker die",
        )
        answered = []
        for sock in new:
            with contextlib.suppress(ConnectionResetError):
                assert first_answer(sock)[0] == 200
                answered.append(sock)
        handed = _handed(served) - handed_before
        # What the running worker handed over, it had accepted: none of the lost.
        assert handed >= 1
        assert len(answered) == len(new) - lost
        held = _holders([more], address[1])
        assert [held.get(_client_port(s)) for s in answered] == [more] * len(answered)
        for sock in answered:
            assert _infer(sock) == [128, 128, 3]

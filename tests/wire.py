"""Small helpers the tests share to call the gateway over the wire and read results."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import grpc
import requests

from clients.grpc_transport import result_from_pb
from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from tests.conftest import wait_for


def http_host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def tcp_queues(sock: socket.socket) -> tuple[int | None, int | None]:
    """(bytes `sock` sent that the server on this machine has not acknowledged, bytes of them it
    has acknowledged and not read from its socket yet), as the kernel's own queues tell
    (/proc/net/tcp); None for a side not found."""
    ours, theirs = sock.getsockname()[1], sock.getpeername()[1]
    unacked = unread = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
            tx_queue, rx_queue = (int(q, 16) for q in fields[4].split(":"))
            if (local, remote) == (ours, theirs):
                unacked = tx_queue
            elif (local, remote) == (theirs, ours):
                unread = rx_queue
    return unacked, unread


def send_and_see_read(sock: socket.socket, data: bytes) -> None:
    """Send `data` to a server on this machine, and return once the server has read all of it
    from its socket: whatever is sent next reaches it in a later read. The kernel's own queues
    tell (`tcp_queues`): nothing of ours waits for the server's acknowledgement, and nothing
    waits in the server's receive queue."""
    sock.sendall(data)
    wait_for(lambda: tcp_queues(sock) == (0, 0), f"the server reading the {len(data)} bytes sent")


def post_octet(http_url: str, model: str, data: bytes, **kw: Any) -> requests.Response:
    return requests.post(
        f"{http_url}/v1/models/{model}/infer",
        data=data,
        headers={"Content-Type": "application/octet-stream", **kw.pop("headers", {})},
        timeout=30,
        **kw,
    )


def post_multipart(http_url: str, model: str, images: list[bytes], **kw: Any) -> requests.Response:
    files = {
        str(i): (f"{i}.img", data, "application/octet-stream") for i, data in enumerate(images)
    }
    return requests.post(f"{http_url}/v1/models/{model}/infer", files=files, timeout=30, **kw)


def grpc_result(result: pb.ImageResult) -> dict[str, Any]:
    return result_from_pb(result).to_dict()


def grpc_code(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    trailing = dict(exc.trailing_metadata() or ())
    return exc.code(), str(trailing.get("error-code", ""))

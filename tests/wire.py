"""Small helpers the tests share to call the gateway over the wire and read results."""

from __future__ import annotations

from typing import Any

import grpc
import requests

from clients.grpc_transport import result_from_pb
from clients.pb.imagegateway.v1 import gateway_pb2 as pb


def http_host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


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

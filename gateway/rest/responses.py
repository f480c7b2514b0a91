"""Core results -> JSON bodies. The shapes mirror the protobuf messages field for field."""

from __future__ import annotations

from typing import Any

from gateway.core.types import InferResponse, ItemResult, ModelInfo


def result_json(result: ItemResult) -> dict[str, Any]:
    body: dict[str, Any] = {"name": result.name}
    if result.info is not None:
        info = result.info
        body["info"] = {
            "width": info.width,
            "height": info.height,
            "channels": info.channels,
            "format": info.format,
        }
    if result.error is not None:
        body["error"] = {"code": result.error.code, "message": result.error.message}
    else:
        body["output"] = result.output
    return body


def infer_json(response: InferResponse) -> dict[str, Any]:
    (result,) = response.results
    return {
        "model": response.model,
        "request_id": response.request_id,
        "result": result_json(result),
    }


def batch_json(response: InferResponse) -> dict[str, Any]:
    return {
        "model": response.model,
        "request_id": response.request_id,
        "results": [result_json(r) for r in response.results],
    }


def model_json(info: ModelInfo) -> dict[str, Any]:
    size, batching = info.min_input_size, info.batching
    return {
        "name": info.name,
        "description": info.description,
        "is_default": info.is_default,
        "min_input_size": None if size is None else {"width": size[0], "height": size[1]},
        "batching": None
        if batching is None
        else {"max_batch_size": batching[0], "max_batch_wait_ms": batching[1]},
    }


# Every method some route of the server takes: the Allow of a question about the whole server
# (`OPTIONS *`) and of a method no route takes (CONNECT, which is for proxies).
REQUEST_ID_HEADER = "X-Request-ID"
# Readable by a page's script on an allowed origin (CORS): the id, and when to retry a 503.
EXPOSED_HEADERS = (REQUEST_ID_HEADER, "Retry-After")
SERVER_METHODS = "GET, HEAD, POST, OPTIONS"


def error_headers(http_status: int) -> dict[str, str]:
    """Headers an error answer carries by its status, whichever layer writes it."""
    if http_status == 503:
        # Overload and shutdown are both short-lived here: a retry soon may well succeed.
        return {"Retry-After": "1"}
    if http_status == 415:
        # The one content coding a request body may have (RFC 9110 15.5.16, 12.5.3).
        return {"Accept-Encoding": "identity"}
    if http_status == 401:
        # The scheme a client must use (RFC 9110 11.6.1, RFC 6750 3).
        return {"WWW-Authenticate": 'Bearer realm="image-gateway"'}
    if http_status == 408:
        # The rest of the request may never come: the connection ends with this answer (RFC
        # 9110 15.5.9), rather than the server waiting to read it out.
        return {"Connection": "close"}
    return {}


def error_json(code: str, message: str, request_id: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}

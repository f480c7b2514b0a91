"""Every HTTP error, ours or Werkzeug's, as {"error": {"code", "message", "request_id"}}."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from gateway.core.errors import ErrorCode, GatewayError
from gateway.rest.responses import error_headers, error_json

log = logging.getLogger(__name__)

# Werkzeug raises these itself (unknown route, wrong method, body over MAX_CONTENT_LENGTH, ...).
_WERKZEUG = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


class PartError(GatewayError):
    """An image's error that fails a whole request (the bare /multi route), naming its part and
    giving its place among the images (file parts may share a name)."""

    def __init__(self, part: str, index: int, error: ErrorCode, message: str) -> None:
        super().__init__(error, f"part {part!r} (image {index}): {message}")
        self.part = part
        self.index = index


def error_response(error: ErrorCode, message: str, **extra: object) -> Response:
    g.error = error.code  # for the access record and the error count
    response = jsonify(error_json(error.code, message, str(g.get("request_id", "")), **extra))
    response.status_code = error.http_status
    if error is ErrorCode.CANCELLED:  # not a registered status: nginx's name, not "UNKNOWN"
        response.status = f"{error.http_status} Client Closed Request"
    response.headers.update(error_headers(error.http_status))
    return response


def _gateway_error(exc: GatewayError) -> Response:
    extra = {"part": exc.part, "index": exc.index} if isinstance(exc, PartError) else {}
    return error_response(exc.error, exc.message, **extra)


def _http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    error = _WERKZEUG.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL)
    message = {
        ErrorCode.NOT_FOUND: "no such route; see GET /v1/models and POST /v1/models/<model>/infer",
        ErrorCode.PAYLOAD_TOO_LARGE: "the request body is larger than this gateway accepts",
    }.get(error, exc.description or error.code)
    response = error_response(error, message)
    if status != error.http_status:
        response.status_code = status
    # Keep the headers Werkzeug meant to send, such as Allow on a 405.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error, request id %s", g.get("request_id", ""))
    return error_response(
        ErrorCode.INTERNAL,
        f"internal error (request id {g.get('request_id', '')}); the server log has the details",
    )


def register(app: Flask) -> None:
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)

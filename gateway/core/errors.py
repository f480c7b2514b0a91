"""The one error table, shared by the HTTP and gRPC fronts, and the exception that carries it.

Each row is (stable code, HTTP status, gRPC status name). The gRPC status is written out for every
row, never derived from the HTTP one. Codes are part of the API: never rename one.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    # code                     HTTP  gRPC status name
    INVALID_REQUEST = ("invalid_request", 400, "INVALID_ARGUMENT")
    EMPTY_IMAGE = ("empty_image", 400, "INVALID_ARGUMENT")
    NO_IMAGES = ("no_images", 400, "INVALID_ARGUMENT")
    MALFORMED_MULTIPART = ("malformed_multipart", 400, "INVALID_ARGUMENT")
    UNDECODABLE_IMAGE = ("undecodable_image", 422, "INVALID_ARGUMENT")
    UNSUPPORTED_FORMAT = ("unsupported_format", 415, "INVALID_ARGUMENT")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, "INVALID_ARGUMENT")
    UNAUTHENTICATED = ("unauthenticated", 401, "UNAUTHENTICATED")
    MODEL_NOT_FOUND = ("model_not_found", 404, "NOT_FOUND")
    NOT_FOUND = ("not_found", 404, "NOT_FOUND")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "UNIMPLEMENTED")
    DUPLICATE_PART = ("duplicate_part", 400, "INVALID_ARGUMENT")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "RESOURCE_EXHAUSTED")
    TOO_MANY_IMAGES = ("too_many_images", 413, "RESOURCE_EXHAUSTED")
    TOO_MANY_PARTS = ("too_many_parts", 413, "RESOURCE_EXHAUSTED")
    IMAGE_TOO_LARGE = ("image_too_large", 413, "RESOURCE_EXHAUSTED")
    TOO_MANY_PIXELS = ("too_many_pixels", 413, "RESOURCE_EXHAUSTED")
    HEADERS_TOO_LARGE = ("headers_too_large", 431, "RESOURCE_EXHAUSTED")
    # HTTP framing only; gRPC never answers these, but every row names a gRPC status.
    UNSUPPORTED_TRANSFER_CODING = ("unsupported_transfer_coding", 501, "UNIMPLEMENTED")
    UNSUPPORTED_HTTP_VERSION = ("unsupported_http_version", 505, "UNIMPLEMENTED")
    REQUEST_TIMEOUT = ("request_timeout", 408, "DEADLINE_EXCEEDED")
    DEADLINE_EXCEEDED = ("deadline_exceeded", 504, "DEADLINE_EXCEEDED")
    OVERLOADED = ("overloaded", 503, "UNAVAILABLE")
    SHUTTING_DOWN = ("shutting_down", 503, "UNAVAILABLE")
    # Nobody reads this answer; the code is for the access log and the metrics. 499 is nginx's
    # "client closed request".
    CANCELLED = ("cancelled", 499, "CANCELLED")
    MODEL_ERROR = ("model_error", 500, "INTERNAL")
    INTERNAL = ("internal", 500, "INTERNAL")

    def __init__(self, code: str, http_status: int, grpc_status: str) -> None:
        self.code = code
        self.http_status = http_status
        self.grpc_status = grpc_status

    @classmethod
    def from_code(cls, code: str) -> ErrorCode:
        for member in cls:
            if member.code == code:
                return member
        raise KeyError(code)


class GatewayError(Exception):
    """A failure with a stable code; fronts turn it into an HTTP or gRPC status from the table."""

    def __init__(self, error: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message

    @property
    def code(self) -> str:
        return self.error.code

    def __repr__(self) -> str:
        return f"GatewayError({self.error.code!r}, {self.message!r})"

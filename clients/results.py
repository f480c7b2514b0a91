"""What the high-level client returns, the same over gRPC and HTTP."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


def canonical_output(value: Any) -> Any:
    """A model's output with each object's keys in sorted order. Over gRPC an object travels as
    a protobuf Struct, a map that keeps no order; sorted on both protocols, the same output
    prints the same."""
    if isinstance(value, list):
        return [canonical_output(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical_output(value[k]) for k in sorted(value)}
    return value


def _known(cls: type[T], body: dict[str, Any]) -> T:
    """The dataclass `cls` from the fields of a JSON object it knows: a newer gateway may send
    more, as a protobuf message read by older code skips fields it does not know."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in body.items() if k in names})


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    format: str


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class ImageResult:
    name: str
    info: ImageInfo | None
    output: Any = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name}
        if self.info is not None:
            body["info"] = asdict(self.info)
        if self.error is not None:
            body["error"] = asdict(self.error)
        else:
            body["output"] = self.output
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ImageResult:
        info = body.get("info")
        error = body.get("error")
        return cls(
            name=body.get("name", ""),
            info=_known(ImageInfo, info) if info else None,
            output=canonical_output(body.get("output")),
            error=ErrorInfo(error["code"], error["message"]) if error else None,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    is_default: bool
    # (width, height): a larger JPEG reaches this model decoded at 1/2, 1/4 or 1/8 scale.
    min_input_size: tuple[int, int] | None = None
    # (max_batch_size, max_batch_wait_ms) of the dynamic batching in force, None without.
    batching: tuple[int, float] | None = None

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ModelInfo:
        size, batching = body.get("min_input_size"), body.get("batching")
        return cls(
            body["name"],
            body["description"],
            body["is_default"],
            None if size is None else (size["width"], size["height"]),
            None
            if batching is None
            else (batching["max_batch_size"], float(batching["max_batch_wait_ms"])),
        )

    def to_dict(self) -> dict[str, Any]:
        """As the gateway's HTTP API gives it (GET /v1/models): from_dict's inverse."""
        size = self.min_input_size
        return {
            "name": self.name,
            "description": self.description,
            "is_default": self.is_default,
            "min_input_size": None if size is None else {"width": size[0], "height": size[1]},
            "batching": None
            if self.batching is None
            else {"max_batch_size": self.batching[0], "max_batch_wait_ms": self.batching[1]},
        }


# The code of a call that reached no gateway (refused connection, unknown host), on both
# protocols. Every other code is the gateway's (its error table), deadline_exceeded, or
# bad_response (an HTTP answer that is not the gateway's).
UNREACHABLE = "unreachable"
BAD_RESPONSE = "bad_response"


def unreachable(where: str, detail: str) -> GatewayClientError:
    """No answer came: nothing listens there, the connection was lost, or the name does not
    resolve. The same words on both protocols, then the library's own."""
    return GatewayClientError(UNREACHABLE, f"no answer from the gateway at {where}: {detail}", "")


def client_deadline(timeout: float | None) -> GatewayClientError:
    """The client's own timeout passed before an answer came: the same error on both
    protocols (requests and grpc word it differently)."""
    within = "in time" if timeout is None else f"within the client's timeout of {timeout:g} s"
    return GatewayClientError("deadline_exceeded", f"no answer from the gateway {within}", "")


def time_left(timeout: float | None, started: float) -> float | None:
    """What is left of the client's `timeout` for a call sent again, the first try having
    begun at `started` (time.monotonic()); raises deadline_exceeded when nothing is."""
    if timeout is None:
        return None
    left = timeout - (time.monotonic() - started)
    if left <= 0:
        raise client_deadline(timeout)
    return left


class GatewayClientError(Exception):
    """A request the gateway refused or failed, with the gateway's stable error code."""

    def __init__(self, code: str, message: str, status: str, request_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # "422" over HTTP, "INVALID_ARGUMENT" over gRPC; "" over HTTP when no answer came.
        self.status = status
        self.request_id = request_id


@dataclass(frozen=True)
class Limits:
    """What a gateway accepts (GET /v1/limits, GetLimits): over any of these a request or an
    image fails with the code the gateway's error table gives."""

    max_request_bytes: int
    max_image_bytes: int
    max_images: int
    max_parts: int
    max_image_pixels: int
    max_request_pixels: int
    request_timeout_seconds: float

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Limits:
        return _known(cls, body)

"""The core's request and response objects. Both fronts build and read exactly these."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from gateway.core.errors import ErrorCode
from gateway.models.base import JSONValue

# Anything exposing the buffer protocol over the request body: bytes, a memoryview of a
# multipart part, a protobuf bytes field. The decoder reads it in place.
Buffer = Union[bytes, bytearray, memoryview]


class ColorMode(Enum):
    COLOR = "color"
    GRAYSCALE = "grayscale"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ImageInput:
    data: Buffer
    name: str = ""
    content_type: str = ""


@dataclass(frozen=True)
class InferRequest:
    model: str
    images: tuple[ImageInput, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    color_mode: ColorMode = ColorMode.COLOR
    request_id: str = ""
    # Absolute time.monotonic() after which nobody waits for the answer; None means no limit.
    deadline: float | None = None
    # Whether the client has gone (closed its connection, cancelled its call): the request's
    # work stops at the next check. None where the front cannot tell.
    client_gone: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    # time.monotonic() when the front had the whole request.
    received: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    format: str


@dataclass(frozen=True)
class ItemError:
    error: ErrorCode
    message: str

    @property
    def code(self) -> str:
        return self.error.code


@dataclass(frozen=True)
class ItemResult:
    name: str
    info: ImageInfo | None = None
    output: JSONValue = None
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class InferResponse:
    model: str
    request_id: str
    results: tuple[ItemResult, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    is_default: bool
    min_input_size: tuple[int, int] | None = None
    # (max_batch_size, max_batch_wait_ms) of the batching in force, None without batching.
    batching: tuple[int, float] | None = None

"""GatewayClient: one API over grpc:// and http://, returning the same results from both.

client = GatewayClient("grpc://127.0.0.1:50051")   # or "http://127.0.0.1:5000"
result = client.infer("photo.jpg")                  # a path, bytes or a numpy array
results = client.infer_batch(["a.jpg", b"...", array])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, Union
from urllib.parse import urlsplit

import numpy as np

from clients.results import ImageResult, Limits, ModelInfo

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
COLOR_MODES = ("color", "grayscale", "unchanged")


def encode_image(image: ImageLike) -> bytes:
    """The encoded bytes to send: a file's contents, bytes as they are, an array as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        import cv2  # only arrays need OpenCV on the client side

        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise ValueError(f"cannot encode an array of shape {image.shape} as PNG")
        return encoded.tobytes()
    return Path(image).read_bytes()


class _Transport(Protocol):
    def infer(
        self, data: bytes, model: str, color_mode: str, params: Mapping[str, str]
    ) -> ImageResult: ...

    def infer_batch(
        self, images: list[bytes], model: str, color_mode: str, params: Mapping[str, str]
    ) -> list[ImageResult]: ...

    def list_models(self) -> list[ModelInfo]: ...

    def limits(self) -> Limits: ...

    def close(self) -> None: ...


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        parts = urlsplit(url)
        self.model = model
        self._transport: _Transport
        if parts.scheme == "grpc":
            from clients.grpc_transport import GrpcTransport

            self._transport = GrpcTransport(parts.netloc, timeout, max_message_bytes)
        elif parts.scheme in ("http", "https"):
            from clients.http_transport import HttpTransport

            self._transport = HttpTransport(url.rstrip("/"), timeout)
        else:
            raise ValueError(f"{url!r}: use grpc://host:port or http://host:port")

    def infer(
        self,
        image: ImageLike,
        *,
        model: str | None = None,
        color_mode: str = "color",
        params: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """The model's result for one image; raises GatewayClientError if the image fails."""
        _check_color_mode(color_mode)
        return self._transport.infer(
            encode_image(image), self._model(model), color_mode, params or {}
        )

    def infer_batch(
        self,
        images: Sequence[ImageLike],
        *,
        model: str | None = None,
        color_mode: str = "color",
        params: Mapping[str, str] | None = None,
    ) -> list[ImageResult]:
        """One result per image, in order; a bad image fails only its own result."""
        _check_color_mode(color_mode)
        encoded = [encode_image(i) for i in images]
        return self._transport.infer_batch(encoded, self._model(model), color_mode, params or {})

    def list_models(self) -> list[ModelInfo]:
        return self._transport.list_models()

    def limits(self) -> Limits:
        """The gateway's limits: request and image bytes, images, parts, pixels, timeout."""
        return self._transport.limits()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self, model: str | None) -> str:
        return self.model if model is None else model


def _check_color_mode(color_mode: str) -> None:
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES}")

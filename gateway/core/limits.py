"""The per-request limits the core enforces, whichever front a request came through."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.errors import ErrorCode, GatewayError


@dataclass(frozen=True)
class Limits:
    # Images in one request (a multipart body or an InferBatch message).
    max_images: int = 64
    # Bytes of one encoded image, below the request's own cap: a batch may be large while no
    # single image in it is.
    max_image_bytes: int = 64 * 1024 * 1024
    # Pixels per image, read from the header before any decoding.
    max_image_pixels: int = 50_000_000
    # Pixels of all the images of one request together, also read from the headers.
    max_request_pixels: int = 100_000_000
    # Seconds a request may take, queueing included; a gRPC client's shorter deadline wins.
    request_timeout: float = 30.0


@dataclass(frozen=True)
class PublishedLimits:
    """The limits a client needs to size its requests and its gRPC channel, published by both
    fronts (GET /v1/limits, GetLimits) with these field names."""

    max_request_bytes: int
    max_image_bytes: int
    max_images: int
    max_parts: int
    max_image_pixels: int
    max_request_pixels: int
    request_timeout_seconds: float


def check_image_bytes(size: int, limit: int) -> None:
    """GatewayError(image_too_large) for an encoded image of more than `limit` bytes."""
    if size > limit:
        raise GatewayError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image is {size} bytes; this gateway takes at most {limit} bytes per image",
        )

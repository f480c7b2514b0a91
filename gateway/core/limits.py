"""The per-request limits the core enforces, whichever front a request came through."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # Images in one request (a multipart body or an InferBatch message).
    max_images: int = 64
    # Pixels per image, read from the header before any decoding.
    max_image_pixels: int = 50_000_000
    # Pixels of all the images of one request together, also read from the headers.
    max_request_pixels: int = 100_000_000
    # Seconds a request may take, queueing included; a gRPC client's shorter deadline wins.
    request_timeout: float = 30.0

"""Encoded bytes -> numpy image, in place: np.frombuffer over the request's own buffer, then
cv2.imdecode. No copy of the body and no temporary file."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gateway.core import formats
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.types import Buffer, ColorMode, ImageInfo

# Every failure becomes a GatewayError with its own message; OpenCV's stderr lines about the same
# bad input would only flood the server log.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

# EXIF orientation is ignored for every format: OpenCV applies it to JPEG only, and one rule for
# all formats means the same pixels reach the model whatever container the client chose.
_FLAGS = {
    ColorMode.COLOR: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    ColorMode.GRAYSCALE: cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION,
    ColorMode.UNCHANGED: cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION,
}


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray
    info: ImageInfo


def decode(data: Buffer, color_mode: ColorMode = ColorMode.COLOR) -> DecodedImage:
    """Decode one encoded image or raise GatewayError with a stable code."""
    if len(memoryview(data)) == 0:
        raise GatewayError(ErrorCode.EMPTY_IMAGE, "the image is empty (0 bytes)")
    fmt = formats.sniff(data)
    if fmt is None:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            "the bytes are not an image in any format the gateway knows",
        )
    if not fmt.decodable:
        raise GatewayError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"the bytes are {fmt.name}, which the gateway cannot decode; "
            "send JPEG, PNG, WebP, GIF, BMP, TIFF, JPEG 2000, AVIF, PNM, OpenEXR or HDR",
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        array = cv2.imdecode(buffer, _FLAGS[color_mode])
    except cv2.error as exc:
        # OpenCV raises (instead of returning None) for some headers it refuses, such as
        # dimensions over its own pixel ceiling.
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {fmt.name} image could not be decoded: {_first_line(exc)}",
        ) from None
    if array is None or array.size == 0:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {fmt.name} image could not be decoded (corrupt, truncated or an unsupported "
            "variant)",
        )
    height, width = array.shape[:2]
    channels = array.shape[2] if array.ndim == 3 else 1
    return DecodedImage(array, ImageInfo(width, height, channels, fmt.name))


def _first_line(exc: cv2.error) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return text.splitlines()[-1] if text else "OpenCV error"

"""Encoded bytes -> numpy image, in place: np.frombuffer over the request's own buffer, then
cv2.imdecode. No copy of the body and no temporary file.

Decoding is two steps so that nothing is allocated for an image before its size is known:
`probe` sniffs the format and reads the dimensions from the header (a few microseconds, no pixel
memory); `decode` runs OpenCV only on a probed image within the pixel limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gateway.core import formats
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.headers import Dimensions, HeaderError, dimensions
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

DECODABLE = "JPEG, PNG, WebP, GIF, BMP, TIFF, JPEG 2000, AVIF, PNM, OpenEXR or Radiance HDR"


@dataclass(frozen=True)
class Probe:
    format: formats.Format
    size: Dimensions


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray
    info: ImageInfo


def probe(data: Buffer, max_pixels: int) -> Probe:
    """Format and dimensions from the header, or GatewayError; allocates no pixels."""
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
            f"the bytes are {fmt.name}, which the gateway cannot decode; send {DECODABLE}",
        )
    try:
        size = dimensions(data, fmt.name)
    except HeaderError as exc:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE, f"the {fmt.name} header cannot be read: {exc}"
        ) from None
    if size.pixels > max_pixels:
        raise GatewayError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the {fmt.name} image is {size.width}x{size.height} ({size.pixels} pixels); "
            f"this gateway decodes at most {max_pixels} pixels per image",
        )
    return Probe(fmt, size)


def decode(data: Buffer, probed: Probe, color_mode: ColorMode = ColorMode.COLOR) -> DecodedImage:
    """Decode a probed image or raise GatewayError with a stable code."""
    name = probed.format.name
    try:
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _FLAGS[color_mode])
    except cv2.error as exc:
        # OpenCV raises (instead of returning None) for some headers it refuses.
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {name} image could not be decoded: {_first_line(exc)}",
        ) from None
    if array is None or array.size == 0:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {name} image could not be decoded (corrupt, truncated or an unsupported variant)",
        )
    height, width = array.shape[:2]
    channels = array.shape[2] if array.ndim == 3 else 1
    return DecodedImage(array, ImageInfo(width, height, channels, name))


def _first_line(exc: cv2.error) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return text.splitlines()[-1] if text else "OpenCV error"

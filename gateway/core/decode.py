"""Encoded bytes -> numpy image, in place: np.frombuffer over the request's own buffer, then
cv2.imdecode. No copy of the body and no temporary file.

Decoding is two steps so that nothing is allocated for an image before its size is known:
`probe` sniffs the format and reads the dimensions from the header (a few microseconds, no pixel
memory); `decode` runs OpenCV only on a probed image within the pixel limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from gateway import allocator
from gateway.core import apng, formats
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.headers import CostlyImageError, Dimensions, HeaderError, dimensions
from gateway.core.tiff_planes import opencv_reads_deep_separate_planes
from gateway.core.types import Buffer, ColorMode, ImageInfo

# Every failure becomes a GatewayError with its own message; OpenCV's stderr lines about the same
# bad input would only flood the server log.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

# EXIF orientation is ignored for every format: OpenCV applies it to JPEG and to some PNG, WebP
# and AVIF files only, and one rule for all formats means the same pixels reach the model
# whatever container the client chose.
_FLAGS = {
    ColorMode.COLOR: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    ColorMode.GRAYSCALE: cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION,
    ColorMode.UNCHANGED: cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION,
}

# libjpeg scales a JPEG down by 2, 4 or 8 while decoding it (it skips the fine DCT detail
# instead of computing and then discarding it). OpenCV has the same flags for other formats but
# decodes them whole and resizes, which costs more, so only JPEG is ever decoded reduced.
# IMREAD_UNCHANGED is -1 (every bit set) and takes no reduction.
_REDUCED = {
    ColorMode.COLOR: {
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    },
    ColorMode.GRAYSCALE: {
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
}

# OpenEXR is optional in OpenCV's builds, and PyPI's 5.0.0 wheel has none: a valid OpenEXR image
# was "corrupt, truncated or an unsupported variant". (Its size is still checked first, as for
# every format, so that a bomb is refused as one whatever the build.)
HAS_OPENEXR = re.search(r"OpenEXR:\s+NO\b", cv2.getBuildInformation()) is None

_DECODED = [
    *("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF", "JPEG 2000", "AVIF", "PNM or PFM"),
    *("Sun raster", *(("OpenEXR",) if HAS_OPENEXR else ()), "Radiance HDR"),
]
DECODABLE = ", ".join(_DECODED[:-1]) + " or " + _DECODED[-1]


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
    except CostlyImageError as exc:
        raise GatewayError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the {fmt.name} image would cost its decoder far more memory than its pixels: {exc}",
        ) from None
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
    if fmt is formats.OPENEXR and not HAS_OPENEXR:
        raise GatewayError(
            ErrorCode.UNSUPPORTED_FORMAT,
            "the bytes are openexr, which this gateway's OpenCV is built without; send "
            + DECODABLE,
        )
    return Probe(fmt, size)


def reduction(
    probed: Probe, color_mode: ColorMode, min_size: tuple[int, int] | None
) -> Literal[1, 2, 4, 8]:
    """The largest scale-down (8, 4 or 2) at which the image still covers `min_size` (width,
    height), for a JPEG decoded in color or grayscale; else 1, a full decode."""
    if min_size is None or probed.format is not formats.JPEG or color_mode not in _REDUCED:
        return 1
    width, height = probed.size.width, probed.size.height
    scales: tuple[Literal[8, 4, 2], ...] = (8, 4, 2)
    for scale in scales:
        # libjpeg rounds a scaled dimension up.
        if -(-width // scale) >= min_size[0] and -(-height // scale) >= min_size[1]:
            return scale
    return 1


def decode(
    data: Buffer,
    probed: Probe,
    color_mode: ColorMode = ColorMode.COLOR,
    min_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode a probed image or raise GatewayError with a stable code. With `min_size`, a JPEG
    may be decoded reduced (see `reduction`); its info still gives the size it was sent at."""
    name = probed.format.name
    _refuse_misread_planes(probed, color_mode)
    _refuse_unwritten_pixels(probed, color_mode)
    scale = reduction(probed, color_mode, min_size)
    flags = _FLAGS[color_mode]
    if scale > 1:
        flags = _REDUCED[color_mode][scale] | cv2.IMREAD_IGNORE_ORIENTATION
    frame = _first_frame(data) if probed.format is formats.PNG else None
    try:
        array = cv2.imdecode(np.frombuffer(data if frame is None else frame.png, np.uint8), flags)
    except cv2.error as exc:
        # OpenCV raises (instead of returning None) for some headers it refuses.
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {name} image could not be decoded: {_first_line(exc)}",
        ) from None
    if probed.size.text_chunks:
        # libpng's inflated text, megabytes each, freed below the heap's top where the trim
        # threshold never reaches: a soak with such PNGs among its requests kept 50 MiB more.
        allocator.release_free_memory()
    if array is None or array.size == 0:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {name} image could not be decoded (corrupt, truncated or an unsupported variant)",
        )
    if frame is not None and not frame.covers_image:
        canvas = np.zeros((frame.image_height, frame.image_width, *array.shape[2:]), array.dtype)
        canvas[frame.y : frame.y + frame.height, frame.x : frame.x + frame.width] = array
        array = canvas
    height, width = array.shape[:2]
    if scale > 1:
        # A JPEG decodes whole at exactly its header's size (orientation is ignored).
        width, height = probed.size.width, probed.size.height
    channels = array.shape[2] if array.ndim == 3 else 1
    return DecodedImage(array, ImageInfo(width, height, channels, name))


def _refuse_misread_planes(probed: Probe, color_mode: ColorMode) -> None:
    """Refuse a TIFF the installed OpenCV would answer with memory it never wrote, some of it
    earlier requests' pixels (gateway.core.tiff_planes)."""
    if (
        color_mode is ColorMode.UNCHANGED
        and probed.size.deep_separate_planes
        and not opencv_reads_deep_separate_planes()
    ):
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {probed.format.name} image stores its channels in separate planes at more "
            "than 8 bits a sample, which this gateway's OpenCV misreads in unchanged mode; send "
            "it in color or grayscale mode, or with its channels interleaved "
            "(PlanarConfiguration 1)",
        )


def _refuse_unwritten_pixels(probed: Probe, color_mode: ColorMode) -> None:
    """Refuse an image that OpenCV would answer in this mode with pixels it never wrote, some of
    them earlier requests' (a PAM whose channels it converts wrongly, gateway.core.headers)."""
    if color_mode.value in probed.size.unwritten_modes:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE,
            f"the {probed.format.name} image is a PAM whose channels this gateway's OpenCV "
            f"converts to {color_mode.value} mode only in part, leaving the rest of the image "
            "unwritten; send it in a mode that keeps its channels (unchanged), or as PNG",
        )


def _first_frame(data: Buffer) -> apng.FirstFrame | None:
    """An animated PNG's first frame as a still PNG, for OpenCV to read on its ordinary path
    (gateway.core.apng); None for any other PNG."""
    try:
        return apng.first_frame(data)
    except apng.ApngError as exc:
        raise GatewayError(
            ErrorCode.UNDECODABLE_IMAGE, f"the animated png image is malformed: {exc}"
        ) from None


def _first_line(exc: cv2.error) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return text.splitlines()[-1] if text else "OpenCV error"

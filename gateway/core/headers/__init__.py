"""Image width and height read from the header alone, before any decoder sees the bytes.

OpenCV allocates the whole declared image before it decodes a pixel, so a few hundred bytes that
claim 30000x30000 pixels cost gigabytes. dimensions() reads the size a header declares so that the
caller can refuse an image over its pixel limit first. Where a file states its size in more than
one place, the largest is returned, since the decoder may allocate by any of them. Any malformed
input raises HeaderError, and the work done is bounded whatever the input. A header declaring what
would cost its decoder far more memory than its pixels (a JPEG 2000 in 65,535 tiles) raises
CostlyImageError, a HeaderError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.core.headers.avif import _avif
from gateway.core.headers.declared import CostlyImageError, Dimensions, HeaderError
from gateway.core.headers.fixed_fields import (
    MAX_PNG_TEXT_CHUNKS,
    _bmp,
    _gif,
    _png,
    _sun_raster,
    _webp,
)
from gateway.core.headers.jpeg import MAX_JPEG_SCANS, _jpeg
from gateway.core.headers.jpeg2000 import _jpeg2000
from gateway.core.headers.openexr import _openexr
from gateway.core.headers.text import _hdr, _pfm, _pnm
from gateway.core.headers.tiff import _tiff

if TYPE_CHECKING:
    # For the annotation only: gateway.core.types imports numpy, and this module must load
    # without it.
    from gateway.core.types import Buffer


__all__ = [
    "MAX_JPEG_SCANS",
    "MAX_PNG_TEXT_CHUNKS",
    "CostlyImageError",
    "Dimensions",
    "HeaderError",
    "dimensions",
]


def dimensions(data: Buffer, fmt: str) -> Dimensions:
    """The largest width and height that the header of `data`, in format `fmt`, declares.

    `fmt` is a Format.name from gateway.core.formats; an unknown one raises HeaderError.
    """
    reader = _READERS.get(fmt)
    if reader is None:
        raise HeaderError(f"no header reader for the format {fmt!r}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise HeaderError("the image is not a contiguous byte buffer") from None
    size = reader(view)
    deep = _FLOAT_PIXEL_BYTES.get(fmt)
    return size if deep is None else Dimensions(size.width, size.height, deep)


# Formats whose pixels decode to float32: PFM and Radiance HDR three channels, OpenEXR up to four.
# (A TIFF's depth is read from its own tags.)
_FLOAT_PIXEL_BYTES = {"pfm": 12, "hdr": 12, "openexr": 16}


_READERS: dict[str, Callable[[memoryview], Dimensions]] = {
    "jpeg": _jpeg,
    "png": _png,
    "webp": _webp,
    "gif": _gif,
    "bmp": _bmp,
    "tiff": _tiff,
    "jpeg2000": _jpeg2000,
    "pnm": _pnm,
    "pfm": _pfm,
    "avif": _avif,
    "openexr": _openexr,
    "hdr": _hdr,
    "sun-raster": _sun_raster,
}

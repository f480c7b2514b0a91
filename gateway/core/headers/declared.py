"""What a header declares, and the errors of a header that cannot be read or costs too much.

Kept out of the package's __init__, which imports every reader, so that the readers can import
them without importing the package that imports them."""

from __future__ import annotations

from dataclasses import dataclass, field


class HeaderError(ValueError):
    """The header is missing, truncated, inconsistent or unreadable."""


class CostlyImageError(HeaderError):
    """The header declares an image whose decoder would hold far more memory than its pixels
    (a JPEG 2000 of tens of thousands of tiles): too large an image, whatever its pixel count."""


@dataclass(frozen=True)
class Dimensions:
    width: int
    height: int
    # The most bytes one pixel decodes to with every channel at its stored depth (OpenCV's
    # IMREAD_UNCHANGED): 16-bit RGBA for most formats, more for float ones. Not part of the
    # size: two Dimensions are equal when they are the same size.
    pixel_bytes: int = field(default=8, compare=False)
    # A TIFF whose three or more samples a pixel are each stored in a plane of their own
    # (PlanarConfiguration 2), at more than 8 bits a sample: OpenCV's own TIFF reader, which
    # takes such samples in `unchanged` mode, may misread it (see gateway/core/tiff_planes.py).
    deep_separate_planes: bool = field(default=False, compare=False)
    # Bytes the decoder itself holds for the whole image whatever the color mode, where they are
    # more than the image it returns (OpenJPEG's 32-bit planes); 0 for other formats.
    decoder_bytes: int = field(default=0, compare=False)
    # A PNG's compressed text chunks (zTXt, iTXt), which libpng inflates, up to 8 MB each, and
    # holds while the image decodes (at most MAX_PNG_TEXT_CHUNKS); 0 for other formats.
    text_chunks: int = field(default=0, compare=False)
    # The color modes ("color", "grayscale", "unchanged") in which OpenCV's decoder would answer
    # pixels it never wrote (a PAM whose channels it converts wrongly); empty for other formats.
    unwritten_modes: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height

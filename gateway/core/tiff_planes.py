"""Whether the installed OpenCV decodes a TIFF whose channels are stored in separate planes.

A TIFF may store each sample of a pixel in a plane of its own (PlanarConfiguration 2: all the
red, then all the green...). For samples deeper than 8 bits, OpenCV's own TIFF reader (the one
`IMREAD_UNCHANGED` takes) reads such planes as if the samples were interleaved (4.14.0 and
5.0.0 do): the first plane fills the image's first rows, and the rest of the image is memory
the decoder never wrote, different from one call to the next and holding whatever the process
had there before, such as another request's pixels. opencv/opencv#29567 fixed it upstream.
Which release has the fix cannot be known in advance, so the gateway asks the OpenCV it runs
on, once, with a 2x2 image built here.
"""

from __future__ import annotations

import functools
import struct

import cv2
import numpy as np

# 2x2 pixels, 16 bits a sample, distinct values: red 1-4, green 101-104, blue 201-204.
_PLANES = np.array([[[1, 2], [3, 4]], [[101, 102], [103, 104]], [[201, 202], [203, 204]]], "<u2")


@functools.cache
def opencv_reads_deep_separate_planes() -> bool:
    """True when `IMREAD_UNCHANGED` decodes a 16-bit RGB TIFF stored in separate planes right."""
    sample = np.frombuffer(_separate_planes_tiff(_PLANES), np.uint8)
    try:
        decoded = cv2.imdecode(sample, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return False
    # OpenCV gives BGR: the planes in reverse order, each pixel's samples side by side.
    expected = np.moveaxis(_PLANES[::-1], 0, -1)
    return (
        decoded is not None
        and decoded.shape == expected.shape
        and bool((decoded == expected).all())
    )


def _separate_planes_tiff(planes: np.ndarray) -> bytes:
    """An uncompressed little-endian TIFF of `planes` (samples, height, width), a strip a plane."""
    samples, height, width = planes.shape
    bits = planes.dtype.itemsize * 8
    strip = planes[0].nbytes
    # Header, then the strips, then the three arrays that do not fit in a directory entry,
    # then the directory.
    arrays = 8 + samples * strip
    offsets = [8 + i * strip for i in range(samples)]
    extra = struct.pack(f"<{samples}H", *[bits] * samples)
    extra += struct.pack(f"<{samples}I", *offsets)
    extra += struct.pack(f"<{samples}I", *[strip] * samples)
    bits_at, offsets_at, counts_at = arrays, arrays + 2 * samples, arrays + 6 * samples
    short, long = 3, 4
    entries = [
        (256, long, 1, width),
        (257, long, 1, height),
        (258, short, samples, bits_at),
        (259, short, 1, 1),  # no compression
        (262, short, 1, 2),  # RGB
        (273, long, samples, offsets_at),
        (277, short, 1, samples),
        (278, long, 1, height),  # one strip a plane
        (279, long, samples, counts_at),
        (284, short, 1, 2),  # separate planes
    ]
    directory = struct.pack("<H", len(entries))
    directory += b"".join(struct.pack("<HHII", *entry) for entry in entries) + bytes(4)
    header = b"II*\x00" + struct.pack("<I", arrays + len(extra))
    return header + planes.tobytes() + extra + directory

"""An animated PNG's first frame, rewritten as a plain PNG before OpenCV sees it.

OpenCV's reader for animated PNGs (4.11 and later, 5.0.0 included) hands chunks to libpng
outside the `setjmp` that catches libpng's errors, so any error libpng raises there (a corrupt
frame, a frame whose control chunk is missing or renamed) jumps into a stack frame that has
already returned, and the process dies (opencv/opencv#27744 is one such file; a 1 KB APNG with
one chunk renamed is another). The gateway decodes untrusted bytes, so OpenCV gets the plain
PNG of the frame it would return instead: the chunks before the image data, the frame's size in
IHDR, its data as one IDAT. libpng reads that on OpenCV's ordinary path, where its errors are
caught. PNGs without animation are not touched.

The frame is the animation's first, as OpenCV returns it: the image data (IDAT) when a frame
control chunk (fcTL) comes before it, else the frame data (fdAT) after the first fcTL, placed at
that chunk's offset on a transparent black canvas of the image's size. A first frame drawn on
an empty canvas is its own pixels whichever blend operation it names.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.core.types import Buffer

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Real encoders write a few chunks before the first frame ends (image data comes in pieces of
# 8 KiB and up: 8,192 of them for a 64 MiB body); the walk stops here, so that a body of millions
# of empty chunks costs a few tens of milliseconds.
MAX_CHUNKS = 65_536


class ApngError(ValueError):
    """The animation is malformed where its first frame is concerned."""


@dataclass(frozen=True)
class FirstFrame:
    png: bytearray
    # The frame's place on the image, and the image's size.
    x: int
    y: int
    width: int
    height: int
    image_width: int
    image_height: int

    @property
    def covers_image(self) -> bool:
        size = (self.width, self.height)
        return self.x == self.y == 0 and size == (self.image_width, self.image_height)


def first_frame(data: Buffer) -> FirstFrame | None:
    """The first frame of an animated PNG as a plain PNG; None for a PNG that OpenCV reads as a
    still image (no animation control chunk with two frames or more before the image data)."""
    view = memoryview(data).cast("B")
    chunks = _chunks(view)
    header = next(chunks, None)
    if header is None or header[0] != b"IHDR" or len(header[1]) != 13:
        return None  # the header reader refuses it
    ihdr = header[1]
    kept: list[memoryview] = []  # whole chunks before the image data: palette, gamma, ...
    control: memoryview | None = None
    control_first = False  # the first fcTL came before IDAT: the image data is the first frame
    animated = False
    image_data: list[memoryview] = []
    frame_data: list[memoryview] = []
    for kind, body, whole in chunks:
        if not image_data:
            if kind == b"acTL":
                # OpenCV takes the animated path only for two frames or more; it refuses 0.
                animated = len(body) == 8 and struct.unpack_from(">I", body)[0] > 1
            elif kind == b"fcTL":
                if control is None:
                    control = body
                control_first = True
            elif kind == b"IDAT":
                if not animated:
                    return None
                image_data.append(body)
            elif kind == b"IEND":
                break
            else:
                kept.append(whole)
        elif kind == b"IDAT":
            image_data.append(body)
        elif kind == b"fcTL":
            if control_first or control is not None:
                break  # the next frame starts: the first one is whole
            control = body
        elif kind == b"fdAT" and control is not None and not control_first:
            frame_data.append(body[4:])  # after the chunk's sequence number
        elif kind == b"IEND":
            break
    if not animated:
        return None
    width, height = struct.unpack_from(">II", ihdr)
    x, y, frame_width, frame_height = 0, 0, width, height
    if control is not None:
        if len(control) != 26:
            raise ApngError("a frame control chunk is not 26 bytes long")
        frame_width, frame_height, x, y = struct.unpack_from(">IIII", control, 4)
    if not (frame_width > 0 and frame_height > 0) or (
        x + frame_width > width or y + frame_height > height
    ):
        raise ApngError("the first frame does not lie within the image")
    data_chunks = image_data if control is None or control_first else frame_data
    if not data_chunks:
        raise ApngError("the first frame has no image data")
    if control_first and (x, y, frame_width, frame_height) != (0, 0, width, height):
        raise ApngError("the image data is the first frame but does not cover the image")
    png = bytearray(SIGNATURE)
    png += _chunk(b"IHDR", struct.pack(">II", frame_width, frame_height) + bytes(ihdr[8:]))
    for whole in kept:
        png += whole
    # One IDAT of the frame's pieces, written straight into the new PNG: its only copy.
    png += struct.pack(">I", sum(len(piece) for piece in data_chunks)) + b"IDAT"
    crc = zlib.crc32(b"IDAT")
    for piece in data_chunks:
        png += piece
        crc = zlib.crc32(piece, crc)
    png += struct.pack(">I", crc)
    png += _chunk(b"IEND", b"")
    return FirstFrame(png, x, y, frame_width, frame_height, width, height)


def _chunks(view: memoryview) -> Iterator[tuple[bytes, memoryview, memoryview]]:
    """(type, data, whole chunk) from the signature on; stops at the end of the bytes, at a
    chunk that runs past it, or after MAX_CHUNKS (raising ApngError)."""
    pos = len(SIGNATURE)
    for _ in range(MAX_CHUNKS):
        if pos + 12 > len(view):
            return
        (length,) = struct.unpack_from(">I", view, pos)
        end = pos + 12 + length
        if end > len(view):
            return
        yield bytes(view[pos + 4 : pos + 8]), view[pos + 8 : end - 4], view[pos:end]
        pos = end
    raise ApngError(f"more than {MAX_CHUNKS} chunks before the image data or the first frame end")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

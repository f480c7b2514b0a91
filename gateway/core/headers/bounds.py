"""What keeps every reader's work bounded whatever the input (the prefix scanned byte by
byte, the structures one parse visits), and the checked reads all the readers share."""

from __future__ import annotations

from typing import Literal

from gateway.core.headers.declared import Dimensions, HeaderError

# Bytes examined one at a time (junk between JPEG segments, GIF blocks) stay within this prefix.
_SCAN_LIMIT = 1 << 20
# Structures walked by their declared lengths (segments, boxes, blocks, attributes) may lie
# anywhere in the data, but one parse visits at most this many.
_MAX_STEPS = 1 << 14

_Order = Literal["big", "little"]


class _Budget:
    """The structures one parse may still visit, so that no input makes it long."""

    def __init__(self) -> None:
        self.left = _MAX_STEPS

    def spend(self, count: int = 1) -> None:
        self.left -= count
        if self.left < 0:
            raise HeaderError("too many structures before the image size")


def _int(
    view: memoryview, offset: int, size: int, order: _Order = "big", signed: bool = False
) -> int:
    if offset < 0 or offset + size > len(view):
        raise HeaderError("the header is truncated")
    return int.from_bytes(view[offset : offset + size], order, signed=signed)


def _dims(width: int, height: int) -> Dimensions:
    if width <= 0 or height <= 0:
        raise HeaderError(f"the header declares an empty image ({width}x{height})")
    return Dimensions(width, height)

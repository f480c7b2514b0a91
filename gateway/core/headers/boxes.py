"""The boxes of ISO base media files, which JPEG 2000 (JP2) and AVIF files are made of."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.core.headers.bounds import _Budget, _int
from gateway.core.headers.declared import HeaderError


def _boxes(
    view: memoryview, start: int, end: int, budget: _Budget
) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, end) of each box from start to end."""
    pos = start
    while pos < end:
        budget.spend()
        if pos + 8 > end:
            raise HeaderError("a box header is truncated")
        size, kind, header = _int(view, pos, 4), bytes(view[pos + 4 : pos + 8]), 8
        if size == 1:  # a 64-bit size follows the type
            size, header = _int(view, pos + 8, 8), 16
        elif size == 0:  # the box runs to the end of its container
            size = end - pos
        if size < header or pos + size > end:
            raise HeaderError(f"box {kind!r} has an impossible size")
        yield kind, pos + header, pos + size
        pos += size

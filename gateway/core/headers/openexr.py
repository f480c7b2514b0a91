"""OpenEXR: the dataWindow of the first header, walked attribute by attribute."""

from __future__ import annotations

import re

from gateway.core.headers.bounds import _Budget, _dims, _int
from gateway.core.headers.declared import Dimensions, HeaderError

# OpenEXR 2 reads these attribute types by their own layout and ignores the declared size; a size
# that disagreed would make it read the rest of the header differently from this walk.
_EXR_FIXED_SIZES = {
    b"box2i": 16,
    b"box2f": 16,
    b"chromaticities": 32,
    b"compression": 1,
    b"deepImageState": 1,
    b"double": 8,
    b"envmap": 1,
    b"float": 4,
    b"int": 4,
    b"keycode": 28,
    b"lineOrder": 1,
    b"m33d": 72,
    b"m33f": 36,
    b"m44d": 128,
    b"m44f": 64,
    b"rational": 8,
    b"tiledesc": 9,
    b"timecode": 8,
    b"v2d": 16,
    b"v2f": 8,
    b"v2i": 8,
    b"v3d": 24,
    b"v3f": 12,
    b"v3i": 12,
}
_EXR_NAME = re.compile(rb"[^\x00]{0,255}\x00")


def _openexr(view: memoryview) -> Dimensions:
    """The dataWindow attribute of the first header (the first part of a multi-part file)."""
    if bytes(view[:4]) != b"v/1\x01":
        raise HeaderError("no OpenEXR magic number")
    budget = _Budget()
    windows = []
    pos = 8  # after the magic number and the version field
    while True:
        budget.spend()
        name, pos = _exr_string(view, pos)
        if not name:  # an empty name ends the header
            break
        kind, pos = _exr_string(view, pos)
        size, pos = _int(view, pos, 4, "little", signed=True), pos + 4
        _exr_check_size(view, kind, pos, size, budget)
        if name == b"dataWindow":
            if kind != b"box2i":
                raise HeaderError("dataWindow is not a box2i")
            x_min, y_min, x_max, y_max = (
                _int(view, pos + 4 * i, 4, "little", signed=True) for i in range(4)
            )
            windows.append(_dims(x_max - x_min + 1, y_max - y_min + 1))
        pos += size
    if not windows:
        raise HeaderError("no dataWindow attribute")
    return _dims(max(w.width for w in windows), max(w.height for w in windows))


def _exr_string(view: memoryview, pos: int) -> tuple[bytes, int]:
    found = _EXR_NAME.match(view, pos)
    if found is None:
        raise HeaderError("an attribute name is unterminated or too long")
    return found.group()[:-1], found.end()


def _exr_check_size(view: memoryview, kind: bytes, pos: int, size: int, budget: _Budget) -> None:
    if size < 0 or pos + size > len(view):
        raise HeaderError("an attribute size is out of range")
    if kind in _EXR_FIXED_SIZES:
        expected = _EXR_FIXED_SIZES[kind]
    elif kind == b"preview":  # width, height, then 4 bytes a pixel
        expected = 8 + 4 * _int(view, pos, 4, "little") * _int(view, pos + 4, 4, "little")
    elif kind == b"chlist":  # channels of name and 16 bytes each, up to an empty name
        end = pos
        while True:
            budget.spend()
            channel, end = _exr_string(view, end)
            if not channel:
                break
            end += 16
        expected = end - pos
    else:
        return
    if size != expected:
        raise HeaderError(f"a {kind.decode(errors='replace')} attribute has the wrong size")

"""TIFF and BigTIFF: the first directory's sizes, depth and planes, and the chain of
directories after it."""

from __future__ import annotations

from gateway.core.headers.bounds import _dims, _int, _Order
from gateway.core.headers.declared import Dimensions, HeaderError

_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 256, 257, 322, 323
_TIFF_BITS, _TIFF_SAMPLES, _TIFF_PLANAR = 258, 277, 284
_TIFF_PLANAR_SEPARATE = 2
# Integer field types libtiff accepts for a size: type -> (bytes, signed).
_TIFF_INTEGERS = {
    1: (1, False),  # BYTE
    3: (2, False),  # SHORT
    4: (4, False),  # LONG
    16: (8, False),  # LONG8
    6: (1, True),  # SBYTE
    8: (2, True),  # SSHORT
    9: (4, True),  # SLONG
    17: (8, True),  # SLONG8
}
# libtiff rejects a directory with more entries than this as not being one.
_TIFF_MAX_ENTRIES = 4096
# More samples a pixel than any image OpenCV decodes has; a bound on the BitsPerSample list read.
_TIFF_MAX_SAMPLES = 8
# OpenCV counts a TIFF's directories (pages) before it decodes the first, and libtiff keeps a
# record of each one it passes: a chain of a million empty directories, 6 MB, cost 115 MB. No
# real multipage TIFF has more directories than this.
_TIFF_MAX_DIRECTORIES = 4096


def _tiff(view: memoryview) -> Dimensions:
    order: _Order
    if bytes(view[:2]) == b"II":
        order = "little"
    elif bytes(view[:2]) == b"MM":
        order = "big"
    else:
        raise HeaderError("no TIFF byte order mark")
    version = _int(view, 2, 2, order)
    if version == 42:
        ifd, count_size, entry_size, field_size = _int(view, 4, 4, order), 2, 12, 4
    elif version == 43 and _int(view, 4, 2, order) == 8 and _int(view, 6, 2, order) == 0:
        ifd, count_size, entry_size, field_size = _int(view, 8, 8, order), 8, 20, 8  # BigTIFF
    else:
        raise HeaderError("not a TIFF or BigTIFF header")
    # Only the first directory's fields matter: OpenCV decodes page 0. The others are counted.
    count = _int(view, ifd, count_size, order)
    first = ifd + count_size
    if count > _TIFF_MAX_ENTRIES or first + count * entry_size > len(view):
        raise HeaderError("the first TIFF directory is truncated or implausibly long")
    sizes: dict[int, int] = {}
    bits: int | None = None
    samples: int | None = None
    planar: int | None = None
    for entry in range(first, first + count * entry_size, entry_size):
        tag = _int(view, entry, 2, order)
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH):
            # libtiff keeps the first of duplicate tags; the largest is at least as large.
            value = _tiff_integer(view, entry, order, field_size)
            sizes[tag] = max(sizes.get(tag, 0), value)
        # libtiff keeps the first of duplicate tags; these only weigh the image's cost, so an
        # odd value is taken as the deepest one rather than refused (libtiff decides).
        elif tag == _TIFF_SAMPLES and samples is None:
            try:
                samples = _tiff_integer(view, entry, order, field_size)
            except HeaderError:
                samples = _TIFF_MAX_SAMPLES
        elif tag == _TIFF_BITS and bits is None:
            bits = _tiff_bits(view, entry, order, field_size)
        elif tag == _TIFF_PLANAR and planar is None:
            try:
                planar = _tiff_integer(view, entry, order, field_size)
            except HeaderError:
                planar = 0  # libtiff refuses the directory; nothing to flag
    if _TIFF_WIDTH not in sizes or _TIFF_LENGTH not in sizes:
        raise HeaderError("the first TIFF directory has no ImageWidth or ImageLength")
    _tiff_count_directories(view, ifd, order, count_size, entry_size, field_size)
    # OpenCV reads a tiled TIFF through a buffer of one whole tile, which is filled even where
    # the tile overhangs the image, so a tile larger than the image counts as its size.
    width = max(sizes[_TIFF_WIDTH], sizes.get(_TIFF_TILE_WIDTH, 0))
    height = max(sizes[_TIFF_LENGTH], sizes.get(_TIFF_TILE_LENGTH, 0))
    size = _dims(width, height)
    # A 64-bit float RGB TIFF decodes to 24 bytes a pixel, three times 16-bit RGBA. 64 bits and
    # 8 samples bound the weight (OpenCV's images have at most four channels), so that a header
    # claiming 65,535 samples does not make a tiny image wait for the whole budget.
    bits = min(max(bits or 8, 1), 64)
    samples = min(max(samples or 1, 1), _TIFF_MAX_SAMPLES)
    separate = planar == _TIFF_PLANAR_SEPARATE and samples >= 3 and bits > 8
    return Dimensions(size.width, size.height, max(8, -(-bits * samples // 8)), separate)


def _tiff_count_directories(
    view: memoryview, ifd: int, order: _Order, count_size: int, entry_size: int, field_size: int
) -> None:
    """Refuse a chain of more than _TIFF_MAX_DIRECTORIES directories, the first at `ifd`.

    The walk follows libtiff's count: it ends at a next-directory offset of 0, at a directory
    already visited (a loop, which libtiff takes as the end) or at one that cannot be read.
    """
    seen: set[int] = set()
    while ifd != 0 and ifd not in seen:
        if len(seen) == _TIFF_MAX_DIRECTORIES:
            raise HeaderError(
                f"the TIFF has more than {_TIFF_MAX_DIRECTORIES} directories (pages), "
                "which the decoder would all go through before it decodes the first"
            )
        seen.add(ifd)
        try:
            count = _int(view, ifd, count_size, order)
            ifd = _int(view, ifd + count_size + count * entry_size, field_size, order)
        except HeaderError:
            return


def _tiff_bits(view: memoryview, entry: int, order: _Order, field_size: int) -> int:
    """The largest of BitsPerSample's values (one a sample); 64, the deepest, when they are
    not a plain list of integers: they only weigh the image's cost, and libtiff decides."""
    kind = _TIFF_INTEGERS.get(_int(view, entry + 2, 2, order))
    count = _int(view, entry + 4, field_size, order)
    if kind is None or not 1 <= count <= _TIFF_MAX_SAMPLES:
        return 64
    size, signed = kind
    where = entry + 4 + field_size
    try:
        if size * count > field_size:  # the values do not fit in the entry: it holds an offset
            where = _int(view, where, field_size, order)
        return max(_int(view, where + size * i, size, order, signed) for i in range(count))
    except HeaderError:
        return 64


def _tiff_integer(view: memoryview, entry: int, order: _Order, field_size: int) -> int:
    kind = _TIFF_INTEGERS.get(_int(view, entry + 2, 2, order))
    if kind is None or _int(view, entry + 4, field_size, order) != 1:
        raise HeaderError("a TIFF size field is not a single integer")
    size, signed = kind
    where = entry + 4 + field_size
    if size > field_size:  # the value does not fit in the entry: the entry holds its offset
        where = _int(view, where, field_size, order)
    value = _int(view, where, size, order, signed)
    if not 0 <= value <= 0xFFFFFFFF:
        raise HeaderError("a TIFF size is out of range")
    return value

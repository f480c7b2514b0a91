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

import bisect
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    # For the annotation only: gateway.core.types imports numpy, and this module must load
    # without it.
    from gateway.core.types import Buffer


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


# Bytes examined one at a time (junk between JPEG segments, GIF blocks) stay within this prefix.
_SCAN_LIMIT = 1 << 20
# Text headers are read from this prefix only. Real ones take a few hundred bytes, and matching
# many short comments costs far more a byte than a binary walk.
_TEXT_LIMIT = 1 << 16
# Structures walked by their declared lengths (segments, boxes, blocks, attributes) may lie
# anywhere in the data, but one parse visits at most this many.
_MAX_STEPS = 1 << 14
# Numbers in text headers; more digits than this is not a real image size.
_MAX_DIGITS = 18

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


def _number(token: bytes) -> int:
    # int() would also take "+2", " 2", "1_000" and non-ASCII digits; bytes.isdigit() is ASCII.
    if not token.isdigit() or len(token) > _MAX_DIGITS:
        raise HeaderError(f"{token[:20]!r} is not a number")
    return int(token)


# JPEG ------------------------------------------------------------------------------------------

# A marker is 0xFF, any number of 0xFF fill bytes, then a code other than 0x00 (0xFF00 is a
# stuffed zero inside entropy-coded data).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def _jpeg(view: memoryview) -> Dimensions:
    if bytes(view[:2]) != b"\xff\xd8":
        raise HeaderError("no SOI marker")
    budget = _Budget()
    pos, skipped = 2, 0
    while True:
        budget.spend()
        # libjpeg only warns about junk between segments and carries on to the next marker, so
        # the walk does the same rather than stop short of the SOF it would reach.
        limit = pos + max(_SCAN_LIMIT - skipped, 0) + 2
        found = _JPEG_MARKER.search(view, pos, limit)
        if found is None:
            raise HeaderError("no SOF marker")
        skipped += found.start() - pos
        marker, pos = view[found.start() + 1], found.end()
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise HeaderError(f"marker 0x{marker:02X} before any SOF")
        length = _int(view, pos, 2)
        if marker in _JPEG_SOF:
            if length < 8:
                raise HeaderError("SOF segment too short")
            height, width = _int(view, pos + 3, 2), _int(view, pos + 5, 2)
            if height == 0:
                raise HeaderError("the height is left to a DNL marker, which is not supported")
            if marker in _JPEG_PROGRESSIVE:
                _check_scans(view, pos)
            return _dims(width, height)
        if length < 2:
            raise HeaderError(f"segment 0x{marker:02X} has a length of {length}")
        pos += length


# A progressive JPEG refines the whole image once a scan, and libjpeg decodes every scan it is
# given: 8,000 scans of 75 bytes each over a 7000x7000 image took 45 s to decode (about 5 ms a
# scan). Encoders write about 10 (libjpeg's default) and rarely more than a few dozen.
MAX_JPEG_SCANS = 256
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# SOS: a 0xFF in entropy-coded data is followed by 0x00 or a restart marker, never 0xDA, so
# every match is a scan (or one of an embedded thumbnail's, counted too: a bound, not a count).
_JPEG_SOS = re.compile(rb"\xff\xda")


def _check_scans(view: memoryview, start: int) -> None:
    for count, _ in enumerate(_JPEG_SOS.finditer(view, start), 1):
        if count > MAX_JPEG_SCANS:
            raise HeaderError(
                f"a progressive JPEG of more than {MAX_JPEG_SCANS} scans; each is a pass over "
                "the whole image, and encoders write about 10"
            )


# PNG, GIF, WebP, BMP, Sun raster: fixed fields -----------------------------------------------

# libpng inflates every compressed text chunk (zTXt, iTXt) it meets, up to 8 MB each, and keeps
# them all: a 1x1 PNG of 100 such chunks (771 KB) took 798 MB to decode. OpenCV uses none of
# them; real files carry a few.
MAX_PNG_TEXT_CHUNKS = 8
# A chunk's type, anywhere in the file: more matches than chunks (the bytes may also occur in
# compressed data, harmlessly for a bound), never fewer. A literal is searched for at C speed
# (6 us over a 12 KB PNG; a character class was 80).
_PNG_TEXT = re.compile(rb"TXt")
_PNG_COMPRESSED_TEXT = frozenset(b"zi")


def _png(view: memoryview) -> Dimensions:
    if bytes(view[:8]) != b"\x89PNG\r\n\x1a\n":
        raise HeaderError("no PNG signature")
    if _int(view, 8, 4) != 13 or bytes(view[12:16]) != b"IHDR":
        raise HeaderError("the first chunk is not a 13-byte IHDR")
    texts = (m for m in _PNG_TEXT.finditer(view, 33) if _png_inflated_text(view, m.start() - 1))
    count = 0
    for count, _ in enumerate(texts, 1):
        if count > MAX_PNG_TEXT_CHUNKS:
            raise HeaderError(
                f"more than {MAX_PNG_TEXT_CHUNKS} compressed text chunks (zTXt, compressed "
                "iTXt), which the decoder would inflate, up to 8 MB each"
            )
    size = _dims(_int(view, 16, 4), _int(view, 20, 4))
    return Dimensions(size.width, size.height, text_chunks=count)


def _png_inflated_text(view: memoryview, kind: int) -> bool:
    """Whether the text chunk whose type starts at `kind` is one libpng inflates: a zTXt, or an
    iTXt whose compression flag is set. An iTXt may hold its text uncompressed (flag 0, after a
    keyword of 1 to 79 bytes; Pillow writes them so by default), and libpng then only copies
    it: counting those refused valid PNGs of nine such chunks. Whatever cannot be read as an
    uncompressed iTXt counts, as bytes that are no chunk do."""
    if view[kind] not in _PNG_COMPRESSED_TEXT:
        return False
    if view[kind] != ord("i"):
        return True
    length, start = _int(view, kind - 4, 4), kind + 4
    keyword = bytes(view[start : start + min(length, 80)]).find(b"\0")
    flag = start + keyword + 1
    return not (keyword > 0 and flag < min(start + length, len(view)) and view[flag] == 0)


def _gif(view: memoryview) -> Dimensions:
    if bytes(view[:6]) not in (b"GIF87a", b"GIF89a"):
        raise HeaderError("no GIF signature")
    width, height = _int(view, 6, 2, "little"), _int(view, 8, 2, "little")
    frame = _gif_first_frame(view[:_SCAN_LIMIT])
    if frame is not None:
        width, height = max(width, frame[0]), max(height, frame[1])
    return _dims(width, height)


def _gif_first_frame(head: memoryview) -> tuple[int, int] | None:
    """Right and bottom edges of the first image descriptor, or None if it cannot be reached."""
    flags = _int(head, 10, 1)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    in_extension = False
    for _ in range(_MAX_STEPS):
        if pos >= len(head):
            return None
        byte = head[pos]
        if in_extension:  # the size of the next sub-block; 0 ends the extension
            pos += byte + 1
            in_extension = byte != 0
        elif byte == 0x21:  # extension introducer, then its label
            pos += 2
            in_extension = True
        elif byte == 0x2C and pos + 9 <= len(head):
            left, top = _int(head, pos + 1, 2, "little"), _int(head, pos + 3, 2, "little")
            width, height = _int(head, pos + 5, 2, "little"), _int(head, pos + 7, 2, "little")
            return left + width, top + height
        else:
            return None
    return None


def _webp(view: memoryview) -> Dimensions:
    if bytes(view[:4]) != b"RIFF" or bytes(view[8:12]) != b"WEBP":
        raise HeaderError("no RIFF WEBP header")
    chunk = bytes(view[12:16])
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes minus one
        return _dims(_int(view, 24, 3, "little") + 1, _int(view, 27, 3, "little") + 1)
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one after the 0x2F signature
        if _int(view, 20, 1) != 0x2F:
            raise HeaderError("no VP8L signature")
        bits = _int(view, 21, 4, "little")
        return _dims((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key frame's start code
        if bytes(view[23:26]) != b"\x9d\x01\x2a":
            raise HeaderError("no VP8 start code")
        width, height = _int(view, 26, 2, "little"), _int(view, 28, 2, "little")
        return _dims(width & 0x3FFF, height & 0x3FFF)  # the top two bits are a scale hint
    # libwebp would read any other first chunk as a raw bitstream of unknown size.
    raise HeaderError(f"the first WebP chunk is {chunk!r}, not VP8, VP8L or VP8X")


def _bmp(view: memoryview) -> Dimensions:
    if bytes(view[:2]) != b"BM":
        raise HeaderError("no BMP signature")
    header_size = _int(view, 14, 4, "little")
    if header_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sizes
        return _dims(_int(view, 18, 2, "little"), _int(view, 20, 2, "little"))
    if header_size < 16:
        raise HeaderError(f"unknown BMP header size {header_size}")
    width = _int(view, 18, 4, "little", signed=True)
    height = _int(view, 22, 4, "little", signed=True)
    return _dims(width, abs(height))  # a negative height means rows are stored top-down


def _sun_raster(view: memoryview) -> Dimensions:
    if _int(view, 0, 4) != 0x59A66A95 or len(view) < 32:
        raise HeaderError("no complete Sun raster header")
    return _dims(_int(view, 4, 4), _int(view, 8, 4))


# TIFF ------------------------------------------------------------------------------------------

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


# ISO base media boxes: JPEG 2000 (JP2) and AVIF -------------------------------------------------


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


# OpenCV's JPEG 2000 images have at most four channels (gray, gray and alpha, RGB, RGBA).
_J2K_MAX_CHANNELS = 4
# OpenJPEG keeps records of every tile and tile-component from the main header on, before it
# decodes a pixel and before OpenCV can refuse anything: about 9 KB a tile and 1.1 KB a
# tile-component (measured: 16,384 1x1 tiles peaked at 162 MB with one component, 215 MB with
# four; 65,535 tiles of 3 components, an 87-byte file, at 791 MB). Real files are one tile, or
# tiles of 128 to 1024 samples a side: a 50-megapixel image in 128x128 tiles has about 3,100.
# 4096 tiles of four components peaked at 53 MB.
_J2K_MAX_TILES = 4096
# What those records weigh the image with (decoder_bytes), a little over the measured cost.
_J2K_TILE_BYTES, _J2K_TILE_COMPONENT_BYTES = 9000, 1100
# OpenJPEG keeps a record of about 400 bytes for each code-block, and about 150 more for each
# precinct, whatever their size: 4x4 code-blocks cost 25 bytes a sample, more than the samples
# (a 94-byte 2000x2000 codestream of 4 components peaked at 487 MB, 122 bytes a pixel). From 256
# samples a code-block (16x16) the records add at most about 2 bytes a sample. Encoders write
# 64x64 (the default of OpenJPEG, Kakadu and cv2.imencode) or 32x32 (the cinema profiles); the
# standard allows down to 4x4. Precincts smaller than the code-blocks cut them down to their size.
# What counts is the code-blocks the whole image has, on average at least this many samples each:
# precincts are often set for the highest resolution only, and OpenJPEG halves them for each
# level below (opj_compress -c [256,256], Pillow's precinct_size), down to 8x8 or 4x4 at the
# lowest levels, which hold a few thousandths of the samples.
_J2K_MIN_CODE_BLOCK = 8  # log2 of the samples
# Code-blocks a sample are counted in whole numbers of 1 / (4^33 * 2^20): the share of the samples
# of any level of up to 32 decomposition levels, over code-blocks of up to 2^20 samples, is one.
_J2K_LEVELS, _J2K_ONE_A_SAMPLE = 32, 4**33 << 20
_J2K_SOT, _J2K_SOD, _J2K_COD, _J2K_COC = 0xFF90, 0xFF93, 0xFF52, 0xFF53
# The most bytes after a COD or COC segment's length that the code-block check reads: 10 bytes
# of coding style in a COD (7 in a COC), then a precinct size for each of up to 33 levels.
_J2K_CODING_BYTES = 10 + 33


def _jpeg2000(view: memoryview) -> Dimensions:
    budget = _Budget()
    if bytes(view[:4]) == b"\xff\x4f\xff\x51":
        return _j2k_codestream(view, 0, len(view), 0, budget)
    if bytes(view[:12]) != b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        raise HeaderError("no JPEG 2000 signature")
    header: Dimensions | None = None
    palette = 0
    for kind, start, end in _boxes(view, 0, len(view), budget):
        if kind == b"jp2h":
            for sub, payload, sub_end in _boxes(view, start, end, budget):
                if sub == b"ihdr":  # height, then width, then 6 more bytes
                    if sub_end - payload != 14:
                        raise HeaderError("the ihdr box has the wrong size")
                    found = _dims(_int(view, payload + 4, 4), _int(view, payload, 4))
                    header = found if header is None else _larger(header, found)
                elif sub == b"pclr":
                    palette = max(palette, _jp2_palette(view, payload, sub_end))
        elif kind == b"jp2c":
            if header is None:
                raise HeaderError("no ihdr box before the codestream")
            # The decoder sizes the image from the codestream. OpenJPEG 2.2 and later refuse an
            # ihdr that disagrees with it; the larger of the two covers any version.
            return _larger(header, _j2k_codestream(view, start, end, palette, budget))
    raise HeaderError("no jp2c codestream box")


def _jp2_palette(view: memoryview, start: int, end: int) -> int:
    """The columns of a palette (pclr box): the channels each of its entries gives.

    OpenJPEG maps the image through the palette after decoding, into one full-size plane of 32-bit
    samples a column, and only then does OpenCV keep at most four of them: 255 columns took a
    1000x1000 image of 89 KB to 1 GB."""
    if start + 3 > end:
        raise HeaderError("the pclr box is truncated")
    columns = _int(view, start + 2, 1)  # after the number of entries
    if columns > _J2K_MAX_CHANNELS:
        raise HeaderError(
            f"a palette of {columns} columns (pclr box); OpenCV decodes at most "
            f"{_J2K_MAX_CHANNELS} channels, and OpenJPEG would first expand the image into "
            f"{columns} planes of 32-bit samples"
        )
    return columns


def _j2k_codestream(
    view: memoryview, start: int, end: int, palette: int, budget: _Budget
) -> Dimensions:
    """The image area of a codestream (SIZ must follow SOC directly), and what OpenJPEG holds to
    decode it: its tiles, components and code-blocks are checked, and weigh the image."""
    if bytes(view[start : start + 4]) != b"\xff\x4f\xff\x51":
        raise HeaderError("the codestream does not start with SOC and SIZ")
    x_end, y_end = _int(view, start + 8, 4), _int(view, start + 12, 4)
    x_origin, y_origin = _int(view, start + 16, 4), _int(view, start + 20, 4)
    size = _dims(x_end - x_origin, y_end - y_origin)
    tile_width, tile_height = _int(view, start + 24, 4), _int(view, start + 28, 4)
    tile_x, tile_y = _int(view, start + 32, 4), _int(view, start + 36, 4)
    components = _int(view, start + 40, 2)
    # OpenCV refuses these itself, but only once OpenJPEG has read the main header, with its
    # records of every tile-component.
    if not 1 <= components <= _J2K_MAX_CHANNELS:
        raise HeaderError(
            f"{components} components; OpenCV decodes 1 to {_J2K_MAX_CHANNELS} components"
        )
    # As OpenJPEG: the first tile must hold the image's top left corner.
    if not (tile_x <= x_origin < tile_x + tile_width and tile_y <= y_origin < tile_y + tile_height):
        raise HeaderError("the tiles do not cover the image's top left corner")
    tiles = -(-(x_end - tile_x) // tile_width) * -(-(y_end - tile_y) // tile_height)
    if tiles > _J2K_MAX_TILES:
        raise CostlyImageError(
            f"{tiles} tiles of {tile_width}x{tile_height}; OpenJPEG keeps 10 to 13 KB for each "
            f"before decoding anything, and this gateway takes at most {_J2K_MAX_TILES} tiles"
        )
    siz_end = start + 4 + _int(view, start + 4, 2)
    # The segment giving the most code-blocks a sample, and its smallest code-block's width and
    # height as powers of two.
    density, smallest = 0, (10, 2)
    # Tiles often repeat one coding style segment; each one of its own costs a step a level.
    # Without that, 16,000 different segments of 33 levels each took 230 ms to weigh.
    weighed: dict[bytes, tuple[int, tuple[int, int]]] = {}
    for marker, payload, segment_end in _j2k_segments(view, siz_end, end, budget):
        if marker in (_J2K_COD, _J2K_COC):
            key = bytes(view[payload - 4 : min(segment_end, payload + _J2K_CODING_BYTES)])
            found = weighed.get(key)
            if found is None:
                found = weighed[key] = _j2k_code_blocks(view, marker, payload, segment_end)
                budget.spend(_int(view, payload + (5 if marker == _J2K_COD else 2), 1))
            density, smallest = max((density, smallest), found, key=lambda d: d[0])
    if density > _J2K_ONE_A_SAMPLE >> _J2K_MIN_CODE_BLOCK:
        raise CostlyImageError(
            f"code-blocks of {1 << smallest[0]}x{1 << smallest[1]} samples, one for every "
            f"{_J2K_ONE_A_SAMPLE // density} samples of the image; OpenJPEG keeps about 400 "
            f"bytes for each, and this gateway takes code-blocks of at least "
            f"{1 << _J2K_MIN_CODE_BLOCK} samples (16x16) on average"
        )
    # OpenJPEG returns the image as one plane of 32-bit samples a component, whatever OpenCV
    # makes of it. Unless the image is one tile from (0, 0), it decodes each tile into planes of
    # the tile's size first, then copies them into the image. A palette's columns are planes
    # of their own, made from the decoded ones.
    planes = (components + palette) * size.pixels
    grid = (tile_x, tile_y, x_origin, y_origin, tile_width, tile_height)
    if grid != (0, 0, 0, 0, x_end, y_end):
        planes += components * min(tile_width, size.width) * min(tile_height, size.height)
    records = tiles * (_J2K_TILE_BYTES + components * _J2K_TILE_COMPONENT_BYTES)
    return Dimensions(size.width, size.height, decoder_bytes=4 * planes + records)


def _j2k_segments(
    view: memoryview, pos: int, end: int, budget: _Budget
) -> Iterator[tuple[int, int, int]]:
    """(marker, payload start, end) of the segments of the main header and of each tile-part's
    header, as OpenJPEG reads them: a tile-part's header runs up to its data (SOD), and the next
    tile-part starts Psot bytes after its SOT. The walk ends with the data, at the last
    tile-part (Psot 0: its data runs to the end), or at anything that is not a marker segment,
    where OpenJPEG stops too."""
    tile_part_end: int | None = None  # None in the main header
    while pos + 2 <= end:
        marker = view[pos] << 8 | view[pos + 1]
        if marker == _J2K_SOD and tile_part_end is not None:
            if tile_part_end <= pos:  # the last tile-part, or a length that does not advance
                return
            pos, tile_part_end = tile_part_end, None
            continue
        if marker < 0xFF00 or pos + 4 > end:
            return
        length = view[pos + 2] << 8 | view[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return
        if marker == _J2K_SOT:
            if length != 10:
                return
            tile_part_end = pos + _int(view, pos + 6, 4)  # Psot, after Isot
        budget.spend()  # one a segment: a jump past a tile-part's data follows its SOT segment
        yield marker, pos + 4, pos + 2 + length
        pos += 2 + length


def _j2k_code_blocks(
    view: memoryview, marker: int, start: int, end: int
) -> tuple[int, tuple[int, int]]:
    """The code-blocks a sample that a COD or COC segment makes (in units of 1 /
    _J2K_ONE_A_SAMPLE), and its smallest code-block (width and height, as powers of two).

    Each resolution level has the segment's code-block size, cut down where its precincts are
    smaller (a precinct of 2^n samples holds code-blocks of at most 2^n, or 2^(n-1) in the
    sub-bands of the resolution levels above the lowest), over its share of the samples: the
    lowest of L decomposition levels holds 1/4^L of them, the sub-bands of level r 3/4^(L-r+1).
    """
    if marker == _J2K_COD:  # Scod, then progression order, layers and colour transform
        style, at = _int(view, start, 1), start + 5
    else:  # Ccoc (one byte: fewer than 257 components), Scoc
        style, at = _int(view, start + 1, 1), start + 2
    levels, width, height = (_int(view, at + i, 1) for i in range(3))
    width, height = width + 2, height + 2
    if levels > _J2K_LEVELS or width > 10 or height > 10 or width + height > 12:
        raise HeaderError("a COD or COC segment declares an impossible coding style")
    precincts = style & 1  # then one byte a resolution level
    if at + 5 + precincts * (levels + 1) > end:
        raise HeaderError("a COD or COC segment is truncated")
    smallest = width, height
    if not precincts:  # one code-block size for every level
        return _J2K_ONE_A_SAMPLE >> (width + height), smallest
    density = 0
    # The level's share of the samples: 1/4^L for the lowest, 3/4^(L-r+1) for level r above it.
    share = _J2K_ONE_A_SAMPLE >> 2 * levels
    for level, byte in enumerate(view[at + 5 : at + 6 + levels]):
        x, y = byte & 15, byte >> 4
        if level:
            if x == 0 or y == 0:
                raise HeaderError("a precinct of one sample above the lowest resolution level")
            x, y = x - 1, y - 1
            share = 3 * _J2K_ONE_A_SAMPLE >> 2 * (levels - level + 1)
        x, y = (width if width < x else x), (height if height < y else y)
        density += share >> (x + y)
        if x + y < smallest[0] + smallest[1]:
            smallest = x, y
    return density, smallest


def _larger(a: Dimensions, b: Dimensions) -> Dimensions:
    """The larger width and height, with what `b` says of the decoder."""
    return replace(b, width=max(a.width, b.width), height=max(a.height, b.height))


# The boxes walked into, to reach ispe and av1C properties (meta/iprp/ipco), image items
# (meta/iinf, meta/iloc, meta/idat) and tracks (moov/trak).
_AVIF_CONTAINERS = frozenset({b"meta", b"meta/iprp", b"meta/iprp/ipco", b"moov"})
# Within a track, the boxes walked into to reach its header (tkhd) and sample table
# (mdia/minf/stbl).
_AVIF_TRACK_CONTAINERS = frozenset({b"mdia", b"mdia/minf", b"mdia/minf/stbl"})
# The size of a VisualSampleEntry's own fields, before the boxes it holds (av1C).
_AVIF_VISUAL_SAMPLE_ENTRY = 78
# The item types whose data the decoder sizes an image by: an AV1 image, a grid of them.
_AVIF_AV1, _AVIF_GRID = b"av01", b"grid"


def _avif(view: memoryview) -> Dimensions:
    if bytes(view[4:8]) != b"ftyp":
        raise HeaderError("no ftyp box")
    budget = _Budget()
    boxes = _avif_boxes(view, 0, len(view), b"", _AVIF_CONTAINERS, budget)
    sizes = [_avif_ispe(view, start) for start, _ in boxes.get(b"meta/iprp/ipco/ispe", [])]
    if not sizes:
        raise HeaderError("no ispe property")
    # libavif sizes a grid image from the grid item's own fields and an image sequence from its
    # track header, and libaom allocates the frame an AV1 sequence header declares, whatever the
    # ispe properties say.
    sizes += _avif_items(view, boxes, budget)
    for start, end in boxes.get(b"meta/iprp/ipco/av1C", []):
        # Four bytes of fields, then any number of OBUs (a copy of the sequence header, say).
        if end - start < 4:
            raise HeaderError("an av1C box is truncated")
        sizes += _av1_frame_sizes(_Stream(view, [(start + 4, end - start - 4)]), budget)
    for start, end in boxes.get(b"moov/trak", []):
        sizes += _avif_track(view, start, end, budget)
    return _dims(max(w for w, _ in sizes), max(h for _, h in sizes))


def _avif_boxes(
    view: memoryview,
    start: int,
    end: int,
    parent: bytes,
    containers: frozenset[bytes],
    budget: _Budget,
) -> dict[bytes, list[tuple[int, int]]]:
    """Payload ranges of the boxes met on the way into `containers`, by path ("meta/iinf")."""
    found: dict[bytes, list[tuple[int, int]]] = {}
    for kind, payload, box_end in _boxes(view, start, end, budget):
        path = parent + kind
        found.setdefault(path, []).append((payload, box_end))
        if path in containers:
            if kind == b"meta":  # a full box: version and flags come first
                payload += 4
            inner = _avif_boxes(view, payload, box_end, path + b"/", containers, budget)
            for sub, ranges in inner.items():
                found.setdefault(sub, []).extend(ranges)
    return found


def _avif_ispe(view: memoryview, start: int) -> tuple[int, int]:
    return _int(view, start + 4, 4), _int(view, start + 8, 4)  # after version and flags


def _avif_tkhd(view: memoryview, start: int, end: int) -> tuple[int, int]:
    # Width and height as 16.16 fixed point, after fields whose size depends on the version.
    at = start + (88 if _int(view, start, 1) == 1 else 76)
    if at + 8 > end:
        raise HeaderError("a tkhd box is truncated")
    return _int(view, at, 4) >> 16, _int(view, at + 4, 4) >> 16


def _avif_track(view: memoryview, start: int, end: int, budget: _Budget) -> list[tuple[int, int]]:
    """The sizes a track states: its header's, and the frames the AV1 sequence headers in its
    sample entries' av1C and in its first sample (an image sequence's first frame) declare.

    libavif decodes a track whose sample entry is av01 (the image sequence of an "avis" file),
    its samples laid out by the sample table: the first chunk's offset (stco or co64, in order)
    and a size every sample has, or the first sample's own (stsz).
    """
    boxes = _avif_boxes(view, start, end, b"", _AVIF_TRACK_CONTAINERS, budget)
    sizes = [_avif_tkhd(view, tkhd, tkhd_end) for tkhd, tkhd_end in boxes.get(b"tkhd", [])]
    av1 = False
    for stsd, stsd_end in boxes.get(b"mdia/minf/stbl/stsd", []):
        for kind, entry, entry_end in _boxes(view, stsd + 8, stsd_end, budget):  # after count
            if kind != _AVIF_AV1:
                continue
            av1 = True
            children = entry + _AVIF_VISUAL_SAMPLE_ENTRY
            if children > entry_end:
                raise HeaderError("an av01 sample entry is truncated")
            for child, payload, child_end in _boxes(view, children, entry_end, budget):
                if child == b"av1C":
                    if child_end - payload < 4:
                        raise HeaderError("an av1C box is truncated")
                    config = _Stream(view, [(payload + 4, child_end - payload - 4)])
                    sizes += _av1_frame_sizes(config, budget)
    chunks = [  # (chunk offset box, the size of an offset), in the order libavif reads them
        (box, 8 if kind == b"co64" else 4)
        for kind in (b"stco", b"co64")
        for box, _ in boxes.get(b"mdia/minf/stbl/" + kind, [])
    ]
    chunks.sort()
    first = next(((at, size) for at, size in chunks if _int(view, at + 4, 4)), None)
    if not av1 or first is None:
        return sizes  # libavif decodes no sample of this track
    offset = _int(view, first[0] + 8, first[1])
    length = None
    for stsz, _ in boxes.get(b"mdia/minf/stbl/stsz", []):
        every, count = _int(view, stsz + 4, 4), _int(view, stsz + 8, 4)
        if every:
            length = every  # the last such box sets it for every sample
        elif count and length is None:
            length = _int(view, stsz + 12, 4)
    if length is None:
        raise HeaderError("a track's first sample has no size")
    found = _av1_frame_sizes(_Stream(view, [(offset, length)]), budget)
    if not found:
        raise HeaderError("the first sample of an AV1 track has no sequence header")
    return sizes + found


def _avif_items(
    view: memoryview, boxes: dict[bytes, list[tuple[int, int]]], budget: _Budget
) -> list[tuple[int, int]]:
    """Output sizes of the grid items, and the frame sizes the AV1 items' data declares."""
    for path in (b"meta", b"meta/iinf", b"meta/iloc", b"meta/idat"):
        if len(boxes.get(path, [])) > 1:
            raise HeaderError(f"more than one {path.decode()} box")
    if b"meta/iinf" not in boxes:
        return []
    types = _avif_item_types(view, *boxes[b"meta/iinf"][0], budget)
    if not types:
        return []
    if b"meta/iloc" not in boxes:
        raise HeaderError("image items but no iloc box")
    idat = boxes[b"meta/idat"][0] if b"meta/idat" in boxes else None
    sizes = []
    for item, method, extents in _avif_locations(view, *boxes[b"meta/iloc"][0], types, budget):
        if method == 0:  # offsets into the file
            source = (0, len(view))
        elif method == 1 and idat is not None:  # offsets into the idat box
            source = idat
        else:
            raise HeaderError(f"item {item} is stored in a way this reader does not follow")
        data = _Stream.of_extents(view, source, extents)
        if types[item] == _AVIF_GRID:
            # version, flags, rows - 1, columns - 1, then 16-bit sizes, or 32-bit if flags & 1
            head = data.read(0, 12)
            size = 4 if len(head) > 1 and head[1] & 1 else 2
            if len(head) < 4 + 2 * size:
                raise HeaderError(f"grid item {item} is truncated")
            sizes.append((_int(head, 4, size), _int(head, 4 + size, size)))
        else:
            found = _av1_frame_sizes(data, budget)
            if not found:
                raise HeaderError(f"the AV1 data of item {item} has no sequence header")
            sizes += found
    return sizes


def _avif_item_types(view: memoryview, start: int, end: int, budget: _Budget) -> dict[int, bytes]:
    """The AV1 and grid items listed in an iinf box: their IDs and types."""
    version = _int(view, start, 1)
    entries = start + (6 if version == 0 else 8)  # after version, flags and the entry count
    types, seen = {}, set()
    for kind, payload, _ in _boxes(view, entries, end, budget):
        if kind != b"infe" or _int(view, payload, 1) < 2:  # item types came with version 2
            continue
        id_size = 2 if _int(view, payload, 1) == 2 else 4
        item = _int(view, payload + 4, id_size)
        item_type = bytes(view[payload + 6 + id_size : payload + 10 + id_size])
        if item in seen:
            raise HeaderError(f"item {item} is listed twice")
        seen.add(item)
        if item_type in (_AVIF_AV1, _AVIF_GRID):
            types[item] = item_type
    return types


def _avif_locations(
    view: memoryview, start: int, end: int, items: Collection[int], budget: _Budget
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(item, construction method, [(offset, length)] of its extents) of each of `items`, from
    iloc."""
    version = _int(view, start, 1)
    if version > 2:
        raise HeaderError(f"iloc version {version}")
    sizes = _int(view, start + 4, 2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 15
    base_size, index_size = (sizes >> 4) & 15, sizes & 15 if version else 0
    if any(size not in (0, 4, 8) for size in (offset_size, length_size, base_size, index_size)):
        raise HeaderError("iloc field sizes other than 0, 4 or 8")
    id_size = 4 if version == 2 else 2
    count, pos = _int(view, start + 6, id_size), start + 6 + id_size
    remaining = set(items)
    for _ in range(count):
        budget.spend()
        item, pos = _int(view, pos, id_size), pos + id_size
        method = 0
        if version:
            method, pos = _int(view, pos, 2) & 15, pos + 2
        pos += 2  # data reference index
        base, pos = _int(view, pos, base_size), pos + base_size
        extents, pos = _int(view, pos, 2), pos + 2
        if item in items:
            if item not in remaining:
                raise HeaderError(f"item {item} has two locations")
            remaining.discard(item)
            if extents == 0:
                raise HeaderError(f"item {item} has no data")
            found = []
            for _ in range(extents):
                budget.spend()
                pos += index_size
                offset, pos = _int(view, pos, offset_size), pos + offset_size
                length, pos = _int(view, pos, length_size), pos + length_size
                found.append((base + offset, length))
            yield item, method, found
        else:
            pos += extents * (index_size + offset_size + length_size)
        if pos > end:
            raise HeaderError("the iloc box is truncated")
    if remaining:
        raise HeaderError(f"item {min(remaining)} has no location")


class _Stream:
    """Ranges of the data read as one run of bytes: an item's data, which may be in pieces."""

    def __init__(self, view: memoryview, ranges: list[tuple[int, int]]) -> None:
        self.view = view
        self.starts: list[int] = []  # where each range starts in the view
        self.ends: list[int] = []  # where each range ends in the run
        self.length = 0
        for start, length in ranges:
            if start < 0 or length < 0 or start + length > len(view):
                raise HeaderError("data lies outside the file")
            if length:
                self.starts.append(start)
                self.length += length
                self.ends.append(self.length)

    @classmethod
    def of_extents(
        cls, view: memoryview, source: tuple[int, int], extents: list[tuple[int, int]]
    ) -> _Stream:
        """An item's extents, (offset, length) into view[source[0]:source[1]], joined in order
        as libavif joins them (a length of 0 is no data)."""
        start, end = source
        if any(start + offset + length > end for offset, length in extents):
            raise HeaderError("item data lies outside its file or idat box")
        return cls(view, [(start + offset, length) for offset, length in extents])

    def _locate(self, pos: int) -> tuple[int, int]:
        """The range that holds byte pos of the run (len(ranges) past the end), and where in
        the view that byte is."""
        index = bisect.bisect_right(self.ends, pos)
        if index == len(self.ends):
            return index, len(self.view)
        return index, self.starts[index] + pos - (self.ends[index - 1] if index else 0)

    def read(self, pos: int, size: int) -> memoryview:
        """Up to `size` bytes from pos: fewer at the end of the run."""
        index, at = self._locate(pos)
        if index < len(self.ends) and pos + size <= self.ends[index]:
            return self.view[at : at + size]  # within one range: no copy
        out = bytearray()
        while len(out) < size and index < len(self.ends):
            take = min(size - len(out), self.ends[index] - pos)
            out += self.view[at : at + take]
            pos += take
            index += 1
            at = self.starts[index] if index < len(self.ends) else len(self.view)
        return memoryview(out)

    def skip_zeros(self, pos: int, budget: _Budget) -> int:
        """The position of the first byte other than 0 from pos on, or the end of the run.
        Every _ZEROS_A_STEP bytes passed cost one more step of the budget."""
        index, at = self._locate(pos)
        while index < len(self.ends):
            end = min(at + self.ends[index] - pos, at + _ZEROS_A_STEP * (budget.left + 1))
            found = _NONZERO.search(self.view, at, end)
            stop = end if found is None else found.start()
            budget.spend(1 + (stop - at) // _ZEROS_A_STEP)
            if found is not None:
                return pos + stop - at
            pos = self.ends[index]
            index += 1
            at = self.starts[index] if index < len(self.ends) else len(self.view)
        return self.length


_NONZERO = re.compile(rb"[^\x00]")
_ZEROS_A_STEP = 64

# AV1 -------------------------------------------------------------------------------------------

_AV1_SEQUENCE_HEADER = 1
# Enough of a sequence header OBU to reach the frame size, whatever comes before it: 32
# operating points with every optional field take 3,076 bits.
_AV1_SEQUENCE_HEADER_PREFIX = 512


def _av1_frame_sizes(data: _Stream, budget: _Budget) -> list[tuple[int, int]]:
    """The largest frame size of each sequence header among the OBUs of an AV1 stream.

    The OBUs are walked as libaom reads them (with their size fields, which it requires), up to
    the end of the data: a sequence header anywhere before a frame sizes that frame.
    """
    sizes = []
    pos = 0
    while pos < data.length:
        budget.spend()
        head = data.read(pos, 10)  # the header, its extension, a size of up to 8 bytes
        if head[0] == 0:  # libaom skips zero bytes after a frame
            pos = data.skip_zeros(pos, budget)
            continue
        if head[0] & 0x80:
            raise HeaderError("an AV1 OBU has its forbidden bit set")
        if not head[0] & 2:
            raise HeaderError("an AV1 OBU has no size field")
        kind, at = (head[0] >> 3) & 15, 2 if head[0] & 4 else 1
        size = 0
        for i in range(8):  # LEB128, at most 8 bytes
            if at >= len(head):
                raise HeaderError("an AV1 OBU header is truncated")
            byte, at = head[at], at + 1
            size |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        else:
            raise HeaderError("an AV1 OBU size is longer than 8 bytes")
        pos += at
        if pos + size > data.length:
            raise HeaderError("an AV1 OBU runs past the end of its data")
        if kind == _AV1_SEQUENCE_HEADER:
            budget.spend(3)  # reading its bits costs about as much as three structures
            body = data.read(pos, min(size, _AV1_SEQUENCE_HEADER_PREFIX))
            sizes.append(_av1_sequence_header(_Bits(body), budget))
        pos += size
    return sizes


def _av1_sequence_header(bits: _Bits, budget: _Budget) -> tuple[int, int]:
    """max_frame_width and max_frame_height of a sequence header OBU (AV1 5.5.1)."""
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)  # seq_level_idx
    else:
        decoder_model, delay_bits = 0, 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(64)  # num_units_in_display_tick, time_scale
            if bits.read(1):  # equal_picture_interval: num_ticks_per_picture_minus_1, uvlc()
                zeros = 0
                while not bits.read(1):
                    zeros += 1
                    if zeros == 32:  # libaom refuses the value this would make
                        raise HeaderError("an AV1 uvlc() value of 32 bits or more")
                bits.read(zeros)
            decoder_model = bits.read(1)
            if decoder_model:  # decoder_model_info()
                delay_bits = bits.read(5) + 1  # buffer_delay_length_minus_1
                bits.read(32 + 5 + 5)
        display_model = bits.read(1)  # initial_display_delay_present_flag
        for _ in range(bits.read(5) + 1):  # operating_points_cnt_minus_1
            budget.spend(2)
            bits.read(12)  # operating_point_idc
            if bits.read(5) > 7:  # seq_level_idx, then seq_tier
                bits.read(1)
            if decoder_model and bits.read(1):  # operating_parameters_info()
                bits.read(2 * delay_bits + 1)
            if display_model and bits.read(1):
                bits.read(4)  # initial_display_delay_minus_1
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1


class _Bits:
    """The bits of a few bytes, read from the most significant one on."""

    def __init__(self, data: memoryview) -> None:
        self.value = int.from_bytes(data, "big")
        self.left = 8 * len(data)

    def read(self, count: int) -> int:
        if count > self.left:
            raise HeaderError("an AV1 sequence header is truncated")
        self.left -= count
        return (self.value >> self.left) & ((1 << count) - 1)


# OpenEXR ---------------------------------------------------------------------------------------

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


# Text headers: PNM, PAM, PFM, Radiance HDR ------------------------------------------------------

# Whitespace and comments between header tokens (C isspace; '#' to the end of the line).
_PNM_GAP = re.compile(rb"\s*(?:#[^\r\n]*\s*)*")
_PNM_TOKEN = re.compile(rb"[^\s#]+")


def _text_tokens(head: memoryview, pos: int, count: int) -> list[bytes]:
    tokens = []
    for _ in range(count):
        gap = _PNM_GAP.match(head, pos)
        pos = gap.end() if gap else pos
        token = _PNM_TOKEN.match(head, pos)
        # A token running into the end of the prefix may be cut short, and a smaller number
        # than the decoder reads would pass the size check.
        if token is None or token.end() >= len(head):
            raise HeaderError("the header is truncated")
        tokens.append(token.group())
        pos = token.end()
    return tokens


def _pnm(view: memoryview) -> Dimensions:
    head = view[:_TEXT_LIMIT]
    magic = bytes(head[:3])
    if magic[:2] == b"P7":
        return _pam(head)
    if len(magic) < 3 or magic[:2] not in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        raise HeaderError("no PNM magic number")
    if not magic[2:].isspace():
        raise HeaderError("no whitespace after the PNM magic number")
    width, height = _text_tokens(head, 3, 2)
    return _dims(_number(width), _number(height))


_PAM_LINE = re.compile(rb"[^\r\n]+")


def _pam(head: memoryview) -> Dimensions:
    """P7: "KEY value" lines up to ENDHDR."""
    if bytes(head[2:3]) not in (b"\n", b"\r"):
        raise HeaderError("no line break after P7")
    budget = _Budget()
    sizes: dict[bytes, int] = {}
    tuple_type = b""
    for line in _PAM_LINE.finditer(head, 3):
        budget.spend()
        if line.end() >= len(head):
            raise HeaderError("the PAM header is truncated")
        fields = line.group().split(None, 1)  # key, then the rest of the line
        key = fields[0] if fields else b""
        if key == b"ENDHDR":
            if b"WIDTH" not in sizes or b"HEIGHT" not in sizes:
                raise HeaderError("no WIDTH or HEIGHT before ENDHDR")
            size = _dims(sizes[b"WIDTH"], sizes[b"HEIGHT"])
            if b"DEPTH" not in sizes or b"MAXVAL" not in sizes:
                return size  # OpenCV refuses it
            unwritten = _pam_unwritten_modes(sizes[b"DEPTH"], sizes[b"MAXVAL"], tuple_type)
            return replace(size, unwritten_modes=unwritten)
        if key in (b"WIDTH", b"HEIGHT", b"DEPTH", b"MAXVAL"):
            if key in sizes or len(fields) < 2:
                raise HeaderError(f"{key.decode()} is repeated or empty")
            sizes[key] = _number(fields[1].strip())
        elif key == b"TUPLTYPE":  # the last one counts
            tuple_type = fields[1].strip() if len(fields) > 1 else b""
    raise HeaderError("no ENDHDR line")


def _pam_unwritten_modes(depth: int, maxval: int, tuple_type: bytes) -> frozenset[str]:
    """The color modes in which OpenCV's PAM reader (4.x and 5.0.0) leaves pixels unwritten.

    Where the channels it returns are not the file's, it converts each row: RGB (TUPLTYPE RGB,
    or none with DEPTH 3 and MAXVAL under 256) by reading three samples a pixel, anything else
    by a loop that stops after WIDTH / DEPTH pixels, writing 3 bytes each whatever the target:
    an RGBA PAM in `color` fills a quarter of each row, and the rest is memory the decoder
    never wrote, which can hold an earlier request's pixels; a gray and alpha one in
    `grayscale` writes past its rows. Samples of one bit (MAXVAL 1) it unpacks only into one or
    three channels."""
    if tuple_type == b"" and maxval < 256:
        tuple_type = {1: b"GRAYSCALE", 3: b"RGB"}.get(depth, b"")
    unwritten = set()
    for mode, channels in (("color", 3), ("grayscale", 1), ("unchanged", depth)):
        if maxval == 1:
            whole = channels in (1, 3)
        elif channels == depth:
            whole = True  # copied as they are
        elif tuple_type == b"RGB":
            whole = depth >= 3
        else:
            whole = depth == 1
        if not whole:
            unwritten.add(mode)
    return frozenset(unwritten)


def _pfm(view: memoryview) -> Dimensions:
    head = view[:_TEXT_LIMIT]
    if bytes(head[:2]) not in (b"PF", b"Pf") or not bytes(head[2:3]).isspace():
        raise HeaderError("no PFM magic number")
    width, height = _text_tokens(head, 3, 2)
    return _dims(_number(width), _number(height))


# OpenCV reads the header with fgets into a 128-byte buffer, so a line of 127 characters or more
# arrives in pieces. It ends the header at the first piece that is just "\n": an empty line, or
# the newline of a line whose length is a multiple of 127. Reading whole lines instead would take
# a different line for the resolution, the size OpenCV allocates.
_HDR_HEADER_END = re.compile(rb"(?:^|(?<=\n))(?:[^\n]{127})*\n")
_HDR_AXES = {(b"-Y", b"+X"), (b"-Y", b"-X"), (b"+Y", b"+X"), (b"+Y", b"-X")}


def _hdr(view: memoryview) -> Dimensions:
    head = view[:_TEXT_LIMIT]
    if bytes(head[:2]) != b"#?":
        raise HeaderError("no Radiance magic")
    end = _HDR_HEADER_END.search(head)
    if end is None:
        raise HeaderError("no blank line ends the Radiance header")
    # The resolution line as fgets reads it (up to 127 bytes, through the newline) and sscanf
    # sees it (up to a NUL).
    line = bytes(view[end.end() : end.end() + 127]).split(b"\n")[0].split(b"\0")[0]
    tokens = line.split()
    if len(tokens) < 4:
        raise HeaderError("no resolution line")
    first, second = (tokens[0], tokens[2]), (tokens[2], tokens[0])
    if first in _HDR_AXES:  # "-Y 512 +X 768": height first
        return _dims(_number(tokens[3]), _number(tokens[1]))
    if second in _HDR_AXES:  # "+X 768 -Y 512": width first
        return _dims(_number(tokens[1]), _number(tokens[3]))
    raise HeaderError("the resolution line names no Y and X axes")


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

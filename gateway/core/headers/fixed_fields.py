"""PNG, GIF, WebP, BMP, Sun raster: sizes in fixed fields (and, for a GIF, its first frame's),
and the compressed text chunks of a PNG."""

from __future__ import annotations

import re

from gateway.core.headers.bounds import _MAX_STEPS, _SCAN_LIMIT, _dims, _int
from gateway.core.headers.declared import Dimensions, HeaderError

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

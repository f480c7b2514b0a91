"""JPEG 2000, a JP2 file or a bare codestream: its size, and what OpenJPEG holds to decode it
(tiles, components, palette columns, code-blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from gateway.core.headers.bounds import _Budget, _dims, _int
from gateway.core.headers.boxes import _boxes
from gateway.core.headers.declared import CostlyImageError, Dimensions, HeaderError

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

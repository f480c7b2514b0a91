"""JPEG 2000 files written out field by field: a codestream (SIZ, COD, QCD, then tile-parts) and
the JP2 boxes around it. The image is all zero and OpenJPEG decodes it: every packet is empty
(one zero byte), one for each component, resolution level and precinct of each tile."""

from __future__ import annotations

import struct

# Markers: start of codestream, image and tile size, coding style (default, component),
# quantization, start of tile-part, start of data, end of codestream.
SOC, SIZ, COD, COC, QCD = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF5C
SOT, SOD, EOC = 0xFF90, 0xFF93, 0xFFD9


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, 2 + len(payload)) + payload


# Precincts: one size (width, height; powers of two) for every resolution level, or one a level
# from the lowest.
Precincts = tuple[int, int] | list[tuple[int, int]] | None


def halved_precincts(size: int, levels: int) -> list[tuple[int, int]]:
    """Precincts of `size` samples at the highest resolution level, halved for each level below
    (down to 2), as OpenJPEG sets them from one size (opj_compress -c [256,256], Pillow's
    precinct_size)."""
    return [(max(size >> (levels - level), 2),) * 2 for level in range(levels + 1)]


def cod(
    code_block: tuple[int, int] = (64, 64),
    levels: int = 0,
    precincts: Precincts = None,
) -> bytes:
    """A COD segment: one quality layer, `levels` decomposition levels, code-blocks of
    `code_block` samples (width, height; powers of two) and, if given, precincts of `precincts`
    samples."""
    style = struct.pack(">BBHB", 1 if precincts else 0, 0, 1, 0)
    return segment(COD, style + _coding(code_block, levels, precincts))


def coc(
    component: int,
    code_block: tuple[int, int],
    levels: int = 0,
    precincts: Precincts = None,
) -> bytes:
    """A COC segment: as COD, for one component of fewer than 257."""
    style = struct.pack(">BB", component, 1 if precincts else 0)
    return segment(COC, style + _coding(code_block, levels, precincts))


def _per_level(precincts: Precincts, levels: int) -> list[tuple[int, int]] | None:
    """The precinct sizes of each resolution level, as powers of two, from the lowest."""
    if not precincts:
        return None
    sizes = precincts if isinstance(precincts, list) else [precincts] * (levels + 1)
    assert len(sizes) == levels + 1
    return [(w.bit_length() - 1, h.bit_length() - 1) for w, h in sizes]


def _coding(code_block: tuple[int, int], levels: int, precincts: Precincts) -> bytes:
    width, height = (size.bit_length() - 1 for size in code_block)
    payload = struct.pack(">BBBBB", levels, width - 2, height - 2, 0, 1)
    for x, y in _per_level(precincts, levels) or []:
        payload += bytes([y << 4 | x])
    return payload


def codestream(
    width: int,
    height: int,
    *,
    components: int = 1,
    tile: tuple[int, int] | None = None,
    code_block: tuple[int, int] = (64, 64),
    levels: int = 0,
    precincts: Precincts = None,
    main_header: bytes = b"",
    tile_header: bytes = b"",
    bits: int = 8,
    written_tiles: int | None = None,
) -> bytes:
    """A codestream of `components` components of `bits` bits, cut into tiles of `tile` samples
    (one tile by default). `main_header` and `tile_header` are more segments for the main header
    and each tile-part's header (COD and COC segments must keep the precincts). Only the first
    `written_tiles` tiles are written, if given."""
    tile_width, tile_height = tile or (width, height)
    siz = struct.pack(
        ">HIIIIIIIIH", 0, width, height, 0, 0, tile_width, tile_height, 0, 0, components
    )
    data = struct.pack(">H", SOC) + segment(SIZ, siz + bytes([bits - 1, 1, 1]) * components)
    data += cod(code_block, levels, precincts) + main_header
    # Reversible, no quantization: one exponent a sub-band.
    data += segment(QCD, bytes([0x40]) + bytes([(bits + 1) << 3]) * (1 + 3 * levels))
    across, down = -(-width // tile_width), -(-height // tile_height)
    tiles = across * down if written_tiles is None else written_tiles
    for number in range(tiles):
        x0, y0 = number % across * tile_width, number // across * tile_height
        x1, y1 = min(x0 + tile_width, width), min(y0 + tile_height, height)
        packets = components * _precincts((x0, y0, x1, y1), levels, precincts)
        body = tile_header + struct.pack(">H", SOD) + bytes(packets)
        data += segment(SOT, struct.pack(">HIBB", number, 12 + len(body), 0, 1)) + body
    return data + struct.pack(">H", EOC)


def _precincts(tile: tuple[int, int, int, int], levels: int, precincts: Precincts) -> int:
    """How many precincts the resolution levels of one tile-component have together."""
    sizes = _per_level(precincts, levels) or [(15, 15)] * (levels + 1)
    count = 0
    for level, (x_exp, y_exp) in enumerate(sizes):  # the lowest resolution first
        x0, y0, x1, y1 = (-(-edge >> (levels - level)) for edge in tile)  # ceil(edge / 2^n)
        if x1 > x0 and y1 > y0:
            across = -(-x1 >> x_exp) - (x0 >> x_exp)
            down = -(-y1 >> y_exp) - (y0 >> y_exp)
            count += across * down
    return count


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def jp2(stream: bytes, *, palette: int = 0, extra_header: bytes = b"") -> bytes:
    """`stream` in a JP2 file. With `palette`, the header maps the first component through a
    palette (pclr and cmap boxes) of that many columns, of two 8-bit entries each."""
    width, height = struct.unpack_from(">II", stream, 8)
    (components,) = struct.unpack_from(">H", stream, 40)
    bits = stream[42] + 1
    header = box(b"ihdr", struct.pack(">IIHBBBB", height, width, components, bits - 1, 7, 0, 0))
    channels = palette or components
    header += box(b"colr", struct.pack(">BBBI", 1, 0, 0, 17 if channels < 3 else 16))
    if palette:
        entries = bytes(range(palette)) * 2
        header += box(b"pclr", struct.pack(">HB", 2, palette) + bytes([7]) * palette + entries)
        header += box(b"cmap", b"".join(struct.pack(">HBB", 0, 1, i) for i in range(palette)))
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
        + box(b"jp2h", header + extra_header)
        + box(b"jp2c", stream)
    )

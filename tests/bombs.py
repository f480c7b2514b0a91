"""Decompression bombs: small files whose headers declare huge images.

Each is a real test image with its size fields rewritten or, for formats with no sample here, a
header written out field by field. They exist to test header parsing: never decode one.

A format may have several variants, one for each place its size can be declared; bomb() without
a variant picks the first that can encode the requested size.
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

_SAMPLES = Path(__file__).parent / "data" / "images"

Builder = Callable[[int, int], bytes]

# (format, variant) -> (largest width or height the variant can declare, builder)
_VARIANTS: dict[tuple[str, str], tuple[int, Builder]] = {}

U16, U24, U31, U32 = 0xFFFF, 1 << 24, 0x7FFFFFFF, 0xFFFFFFFF


def _variant(fmt: str, name: str, max_side: int) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        _VARIANTS[fmt, name] = (max_side, build)
        return build

    return register


def _sample(name: str) -> bytearray:
    return bytearray((_SAMPLES / name).read_bytes())


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full_box(kind: bytes, version: int, payload: bytes) -> bytes:
    return _box(kind, bytes([version, 0, 0, 0]) + payload)


def _boxes(data: bytes | bytearray, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """(payload start, end) of the first box of each type between start and end."""
    found: dict[bytes, tuple[int, int]] = {}
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        size = size or end - start  # 0: up to the end
        found.setdefault(kind, (start + 8, start + size))
        start += size
    return found


# JPEG ------------------------------------------------------------------------------------------


def _jpeg(name: str, width: int, height: int) -> bytes:
    data = _sample(name)
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):  # walk the segments up to the SOF
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    struct.pack_into(">HH", data, pos + 5, height, width)
    return bytes(data)


@_variant("jpeg", "progressive", U16)
def _jpeg_progressive(width: int, height: int) -> bytes:
    return _jpeg("sdl_sample_progressive.jpg", width, height)


@_variant("jpeg", "baseline", U16)
def _jpeg_baseline(width: int, height: int) -> bytes:
    return _jpeg("hopper_gray.jpg", width, height)


# PNG -------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@_variant("png", "ihdr", U31)
def _png_ihdr(width: int, height: int) -> bytes:
    # hopper.png's IHDR (8-bit RGB) with new sizes, then one scanline of data and IEND.
    sample = _sample("hopper.png")
    ihdr = struct.pack(">II", width, height) + sample[24:29]
    return (
        bytes(sample[:8])
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(bytes(1 + 3 * min(width, 64))))
        + _png_chunk(b"IEND", b"")
    )


# WebP ------------------------------------------------------------------------------------------


@_variant("webp", "vp8l", 1 << 14)
def _webp_lossless(width: int, height: int) -> bytes:
    data = _sample("sdl_sample_lossless.webp")
    bits = struct.unpack_from("<I", data, 21)[0]
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | (height - 1) << 14  # keep alpha and version
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


@_variant("webp", "vp8", 0x3FFF)
def _webp_lossy(width: int, height: int) -> bytes:
    data = _sample("hopper_lossy.webp")
    struct.pack_into("<HH", data, 26, width, height)  # clears the scale bits too
    return bytes(data)


@_variant("webp", "vp8x", U24)
def _webp_extended(width: int, height: int) -> bytes:
    # The lossless sample's VP8L chunk behind a VP8X chunk declaring the canvas.
    vp8l = bytes(_sample("sdl_sample_lossless.webp")[12:])
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4)
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


# GIF -------------------------------------------------------------------------------------------


def _gif_descriptor(data: bytearray) -> int:
    """Offset of the first image descriptor of a well-formed GIF."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[pos] == 0x21:
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C
    return pos


@_variant("gif", "screen", U16)
def _gif_screen(width: int, height: int) -> bytes:
    data = _sample("sdl_palette.gif")
    struct.pack_into("<HH", data, 6, width, height)
    struct.pack_into("<4H", data, _gif_descriptor(data) + 1, 0, 0, 1, 1)
    return bytes(data)


@_variant("gif", "frame", U16)
def _gif_frame(width: int, height: int) -> bytes:
    # A 1x1 logical screen whose first frame is width x height.
    data = _sample("sdl_palette.gif")
    struct.pack_into("<HH", data, 6, 1, 1)
    struct.pack_into("<4H", data, _gif_descriptor(data) + 1, 0, 0, width, height)
    return bytes(data)


# BMP -------------------------------------------------------------------------------------------


@_variant("bmp", "info", U31)
def _bmp_info(width: int, height: int) -> bytes:
    data = _sample("sdl_sample.bmp")  # BITMAPV5HEADER
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


@_variant("bmp", "top-down", U31)
def _bmp_top_down(width: int, height: int) -> bytes:
    data = _sample("sdl_sample.bmp")
    struct.pack_into("<ii", data, 18, width, -height)
    return bytes(data)


@_variant("bmp", "core", U16)
def _bmp_core(width: int, height: int) -> bytes:
    # BITMAPCOREHEADER, 24 bits a pixel, followed by the first pixels of the sample.
    sample = _sample("sdl_sample.bmp")
    pixels = bytes(sample[struct.unpack_from("<I", sample, 10)[0] :][:96])
    header = struct.pack("<IHHHH", 12, width, height, 1, 24)
    size = 14 + len(header) + len(pixels)
    return b"BM" + struct.pack("<IHHI", size, 0, 0, 14 + len(header)) + header + pixels


# TIFF ------------------------------------------------------------------------------------------


def _tiff_patched(name: str, width: int, height: int) -> bytes:
    # ImageWidth and ImageLength rewritten in place as LONG values.
    data = _sample(name)
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def _tiff_built(entries: dict[int, int], big: bool) -> bytes:
    """A little-endian TIFF or BigTIFF of one directory of integer tags, then 64 bytes of data."""
    if big:  # entries of tag, type LONG8, count, value
        header, entry, value_type = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16), "<HHQQ", 16
    else:  # entries of tag, type LONG, count, value
        header, entry, value_type = b"II*\x00" + struct.pack("<I", 8), "<HHII", 4
    count = len(entries) + 2
    ifd_size = (8 + 20 * count + 8) if big else (2 + 12 * count + 4)
    data_offset = len(header) + ifd_size
    tags = {**entries, 273: data_offset, 279: 64}  # StripOffsets, StripByteCounts
    ifd = struct.pack("<Q" if big else "<H", count)
    for tag in sorted(tags):
        ifd += struct.pack(entry, tag, value_type, 1, tags[tag])
    ifd += bytes(8 if big else 4)  # no next directory
    return header + ifd + bytes(64)


_TIFF_GRAY = {258: 8, 259: 1, 262: 1, 277: 1}  # 8 bits, uncompressed, min-is-black, 1 sample


def tiff_directories(count: int, big: bool = False, loop: bool = False) -> bytes:
    """A 1x1 TIFF or BigTIFF of `count` directories: the image's, then empty ones, each
    pointing to the next. With `loop`, the last points back to the second."""
    data = bytearray(_tiff_built({256: 1, 257: 1, 278: 1, **_TIFF_GRAY}, big))
    count_format, offset_format = ("<Q", "<Q") if big else ("<H", "<I")
    first = struct.unpack_from(offset_format, data, 8 if big else 4)[0]
    entries = struct.unpack_from(count_format, data, first)[0]
    next_at = first + struct.calcsize(count_format) + entries * (20 if big else 12)
    size = struct.calcsize(count_format) + struct.calcsize(offset_format)  # no entries
    start = len(data)
    struct.pack_into(offset_format, data, next_at, start if count > 1 else 0)
    for i in range(count - 1):
        following = start + size * (i + 1) if i < count - 2 else (start if loop else 0)
        data += struct.pack(count_format, 0) + struct.pack(offset_format, following)
    return bytes(data)


@_variant("tiff", "g4", U32)
def _tiff_g4(width: int, height: int) -> bytes:
    return _tiff_patched("hopper_g4.tif", width, height)


@_variant("tiff", "strips", U32)
def _tiff_strips(width: int, height: int) -> bytes:
    return _tiff_patched("sdl_sample.tif", width, height)


@_variant("tiff", "bigtiff", U32)
def _tiff_big(width: int, height: int) -> bytes:
    return _tiff_built({256: width, 257: height, 278: height, **_TIFF_GRAY}, big=True)


@_variant("tiff", "tiles", U32)
def _tiff_tiles(width: int, height: int) -> bytes:
    # A 1x1 image stored in one width x height tile.
    return _tiff_built({256: 1, 257: 1, 322: width, 323: height, **_TIFF_GRAY}, big=False)


# JPEG 2000 -------------------------------------------------------------------------------------


def _jp2(header: tuple[int, int], codestream: tuple[int, int]) -> bytearray:
    """The JP2 sample with ihdr declaring header and SIZ declaring codestream (width, height)."""
    data = _sample("rgb_trns_ycbc.jp2")
    top = _boxes(data, 0, len(data))
    ihdr, _ = _boxes(data, *top[b"jp2h"])[b"ihdr"]
    struct.pack_into(">II", data, ihdr, header[1], header[0])
    width, height = codestream
    # After SOC, SIZ, Lsiz, Rsiz: Xsiz, Ysiz, XOsiz, YOsiz, then one tile covering the image
    struct.pack_into(">6I", data, top[b"jp2c"][0] + 8, width, height, 0, 0, width, height)
    return data


@_variant("jpeg2000", "jp2", U32)
def _jpeg2000_jp2(width: int, height: int) -> bytes:
    return bytes(_jp2((width, height), (width, height)))


@_variant("jpeg2000", "jp2-codestream", U32)
def _jpeg2000_jp2_codestream(width: int, height: int) -> bytes:
    # ihdr says 1x1; the codestream, which the decoder sizes the image by, says width x height.
    return bytes(_jp2((1, 1), (width, height)))


@_variant("jpeg2000", "j2k", U32)
def _jpeg2000_j2k(width: int, height: int) -> bytes:
    data = _jp2((width, height), (width, height))
    start, end = _boxes(data, 0, len(data))[b"jp2c"]
    return bytes(data[start:end])


# PNM, PFM ---------------------------------------------------------------------------------------


def _netpbm_pixels(name: str, fields: int) -> bytes:
    data = _sample(name)
    header = re.match(rb"P\d" + rb"\s+\d+" * fields + rb"\s", data)
    assert header is not None
    return bytes(data[header.end() :][:1024])


@_variant("pnm", "p6", U31)
def _pnm_p6(width: int, height: int) -> bytes:
    return b"P6\n%d %d\n255\n" % (width, height) + _netpbm_pixels("rose.pnm", 3)


@_variant("pnm", "p4", U31)
def _pnm_p4(width: int, height: int) -> bytes:
    pixels = _netpbm_pixels("hopper_1bit.pbm", 2)
    return b"P4\n# a comment, then the size\n%d\t%d\n" % (width, height) + pixels


@_variant("pnm", "pam", U31)
def _pnm_pam(width: int, height: int) -> bytes:
    header = b"P7\nWIDTH %d\nHEIGHT %d\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
    return header % (width, height) + _netpbm_pixels("rose.pnm", 3)


@_variant("pfm", "color", U31)
def _pfm(width: int, height: int) -> bytes:
    return b"PF\n%d %d\n-1.0\n" % (width, height) + struct.pack("<48f", *([0.5] * 48))


# AVIF ------------------------------------------------------------------------------------------


def av1_obu(kind: int, body: bytes) -> bytes:
    """An AV1 OBU of the type, with its size field."""
    size = bytearray()
    length = len(body)
    while True:  # LEB128
        size.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            return bytes([kind << 3 | 2]) + bytes(size) + body


def bits(value: int, count: int) -> str:
    """value as `count` binary digits: the fields of a sequence header are written as text."""
    assert 0 <= value < 1 << count
    return format(value, f"0{count}b") if count else ""


# The fields of a still picture's sequence header before its frame size: profile 0, a still
# picture, the reduced header, level 0.
REDUCED_SEQUENCE_FIELDS = "000" + "1" + "1" + bits(0, 5)


def av1_sequence_header(
    width: int, height: int, fields: str = REDUCED_SEQUENCE_FIELDS, rest: str = ""
) -> bytes:
    """A sequence header OBU declaring a largest frame of width x height: the fields before the
    frame size, the size in as few bits as it takes, the fields after it, the trailing bits."""
    width_bits, height_bits = max((width - 1).bit_length(), 1), max((height - 1).bit_length(), 1)
    text = fields + bits(width_bits - 1, 4) + bits(height_bits - 1, 4)
    text += bits(width - 1, width_bits) + bits(height - 1, height_bits) + rest + "1"
    text += "0" * (-len(text) % 8)
    return av1_obu(1, int(text, 2).to_bytes(len(text) // 8, "big"))


def _av1_resized(av1: bytes, width: int, height: int) -> bytes:
    """The OBUs of av1, each (reduced) sequence header rewritten to declare width x height."""
    out, pos = b"", 0
    while pos < len(av1):
        header = av1[pos]
        assert header & 2 and not header & 4  # a size field, no extension
        size, at = 0, pos + 1
        for shift in range(0, 56, 7):
            size |= (av1[at] & 0x7F) << shift
            at += 1
            if not av1[at - 1] & 0x80:
                break
        body, pos = av1[at : at + size], at + size
        if (header >> 3) & 15 != 1:
            out += av1_obu((header >> 3) & 15, body)
            continue
        text = bits(int.from_bytes(body, "big"), 8 * len(body))
        fields = text[:10]
        assert fields[3:5] == "11"  # a still picture with the reduced header
        width_bits, height_bits = int(text[10:14], 2) + 1, int(text[14:18], 2) + 1
        rest = text[18 + width_bits + height_bits : text.rindex("1")]  # up to the trailing bits
        out += av1_sequence_header(width, height, fields, rest)
    return out


def avif_with_ispe(data: bytes | bytearray, width: int, height: int) -> bytes:
    """An AVIF with every ispe property rewritten to width x height."""
    out = bytearray(data)
    for match in re.finditer(rb"\x00\x00\x00\x14ispe", out):
        struct.pack_into(">II", out, match.start() + 12, width, height)
    return bytes(out)


def avif_sample(
    name: str, frame: tuple[int, int] = (1, 1), ispe: tuple[int, int] | None = None
) -> bytes:
    """The sample with the AV1 sequence header of its one item declaring a frame of `frame`
    (1x1 unless asked, so that the size a bomb states elsewhere is the largest), and its ispe
    properties rewritten if asked."""
    data = _sample(name)
    if ispe is not None:
        data = bytearray(avif_with_ispe(data, *ispe))
    top = _boxes(data, 0, len(data))
    start, end = top[b"mdat"]
    assert end == len(data)  # the item's data is the whole of the last box
    av1 = _av1_resized(bytes(data[start:end]), *frame)
    # iloc (version 0, one item of one extent): the extent's length, after its offset.
    iloc = _boxes(data, top[b"meta"][0] + 4, top[b"meta"][1])[b"iloc"][0]
    assert data[iloc] == 0 and struct.unpack_from(">H", data, iloc + 6)[0] == 1
    offset_size, length_size, base_size = (
        data[iloc + 4] >> 4,
        data[iloc + 4] & 15,
        data[iloc + 5] >> 4,
    )
    assert length_size == 4
    length_at = iloc + 8 + 2 + 2 + base_size + 2 + offset_size
    struct.pack_into(">I", data, length_at, len(av1))
    return bytes(data[: start - 8]) + _box(b"mdat", av1)


def avif_built(av1: bytes, ispe: tuple[int, int], config: bytes = b"", pieces: int = 1) -> bytes:
    """A still AVIF of one AV1 item of 8-bit RGB whose data is av1, stored in `pieces` extents
    that lie in the file in reverse order, with the OBUs `config` in its av1C property."""
    cuts = [len(av1) * i // pieces for i in range(pieces + 1)]
    chunks = [av1[a:b] for a, b in itertools.pairwise(cuts)]
    stored = b"".join(reversed(chunks))
    ipco = _full_box(b"ispe", 0, struct.pack(">II", *ispe))
    ipco += _full_box(b"pixi", 0, bytes([3, 8, 8, 8]))
    ipco += _box(b"av1C", bytes([0x81, 0x00, 0x0C, 0x00]) + config)
    ipma = struct.pack(">IHBBBB", 1, 1, 3, 0x01, 0x02, 0x83)  # item 1: ispe, pixi, av1C

    def meta_box(mdat: int) -> bytes:
        ends = [len(stored) - sum(len(c) for c in chunks[:i]) for i in range(pieces)]
        extents = b"".join(
            struct.pack(">II", mdat + end - len(chunk), len(chunk))
            for end, chunk in zip(ends, chunks, strict=True)
        )
        iloc = struct.pack(">BBHHHH", 0x44, 0x00, 1, 1, 0, pieces) + extents
        return _full_box(
            b"meta",
            0,
            _full_box(b"hdlr", 0, struct.pack(">I4s12x", 0, b"pict") + b"\0")
            + _full_box(b"pitm", 0, struct.pack(">H", 1))
            + _full_box(
                b"iinf",
                0,
                struct.pack(">H", 1)
                + _full_box(b"infe", 2, struct.pack(">HH4s", 1, 0, b"av01") + b"\0"),
            )
            + _full_box(b"iloc", 0, iloc)
            + _box(b"iprp", _box(b"ipco", ipco) + _full_box(b"ipma", 0, ipma)),
        )

    ftyp = _box(b"ftyp", b"avif" + bytes(4) + b"avifmif1miaf")
    mdat = len(ftyp) + len(meta_box(0)) + 8
    return ftyp + meta_box(mdat) + _box(b"mdat", stored)


def avif_sequence(
    frame: tuple[int, int], sample: bytes | None = None, config: bytes = b""
) -> bytes:
    """An image sequence ("avis", which libavif decodes from its track) of one frame whose
    sequence header declares `frame` (or whose data is `sample`), with the OBUs `config` in its
    sample entry's av1C; its ispe property, its still item and its track header say 1x1."""
    data = bytearray(avif_sample("sdl_sample.avif", ispe=(1, 1)))
    data[8:12] = b"avis"  # the major brand
    if sample is None:
        sample = _av1_resized(bytes(data[slice(*_boxes(data, 0, len(data))[b"mdat"])]), *frame)
    # A VisualSampleEntry: reserved, data reference 1, then 1x1 at 72 dpi, one frame, 24 bits.
    entry = struct.pack(">6xH16xHHII4xH32xHh", 1, 1, 1, 0x480000, 0x480000, 1, 0x18, -1)
    entry += _box(b"av1C", bytes([0x81, 0x00, 0x0C, 0x00]) + config)
    tkhd = struct.pack(">5I8xHHHH36xII", 0, 0, 1, 0, 0, 0, 0, 0, 0, 1 << 16, 1 << 16)
    mvhd = struct.pack(">IIIIIH10x36x24xI", 0, 0, 1000, 100, 0x10000, 0x100, 2)

    def moov(offset: int) -> bytes:
        stbl = (
            _full_box(b"stsd", 0, struct.pack(">I", 1) + _box(b"av01", entry))
            + _full_box(b"stts", 0, struct.pack(">III", 1, 1, 100))
            + _full_box(b"stsc", 0, struct.pack(">IIII", 1, 1, 1, 1))
            + _full_box(b"stsz", 0, struct.pack(">III", 0, 1, len(sample)))
            + _full_box(b"stco", 0, struct.pack(">II", 1, offset))
        )
        mdia = (
            _full_box(b"mdhd", 0, struct.pack(">IIIIHH", 0, 0, 1000, 100, 0, 0))
            + _full_box(b"hdlr", 0, struct.pack(">I4s12x", 0, b"pict") + b"\0")
            + _box(b"minf", _box(b"stbl", stbl))
        )
        trak = _full_box(b"tkhd", 0, tkhd) + _box(b"mdia", mdia)
        return _box(b"moov", _full_box(b"mvhd", 0, mvhd) + _box(b"trak", trak))

    offset = len(data) + len(moov(0)) + 8
    return bytes(data) + moov(offset) + _box(b"mdat", sample)


@_variant("avif", "ispe", U32)
def _avif_ispe(width: int, height: int) -> bytes:
    return avif_sample("hopper.avif", ispe=(width, height))


@_variant("avif", "sequence-header", 1 << 16)
def _avif_sequence_header(width: int, height: int) -> bytes:
    # ispe says 1x1; the AV1 sequence header, which libaom allocates the frame by, says more.
    return avif_sample("hopper.avif", (width, height), ispe=(1, 1))


@_variant("avif", "first-sample", 1 << 16)
def _avif_first_sample(width: int, height: int) -> bytes:
    # An image sequence's first frame is sized by the sequence header of its track's first sample.
    return avif_sequence((width, height))


@_variant("avif", "track", U16)
def _avif_track(width: int, height: int) -> bytes:
    # ispe says 1x1; a track header (image sequences are sized by it) says width x height.
    data = avif_sample("sdl_sample.avif", ispe=(1, 1))
    tkhd = struct.pack(">5I8xHHHH36xII", 0, 0, 1, 0, 0, 0, 0, 0, 0, width << 16, height << 16)
    return data + _box(b"moov", _box(b"trak", _full_box(b"tkhd", 0, tkhd)))


@_variant("avif", "grid", U32)
def _avif_grid(width: int, height: int) -> bytes:
    # Item 1 is a grid of one 1x1 tile, item 2, whose output is width x height.
    sample = bytearray(avif_sample("sdl_sample.avif"))
    top = _boxes(sample, 0, len(sample))
    meta_start, meta_end = top[b"meta"]
    properties = _boxes(sample, *_boxes(sample, meta_start + 4, meta_end)[b"iprp"])
    av1c_start, av1c_end = _boxes(sample, *properties[b"ipco"])[b"av1C"]
    av1c = bytes(sample[av1c_start - 8 : av1c_end])
    tile = bytes(sample[slice(*top[b"mdat"])])

    wide = max(width, height) > U16
    grid = bytes([0, int(wide), 0, 0]) + struct.pack(">II" if wide else ">HH", width, height)
    infe = b"".join(
        _full_box(b"infe", 2, struct.pack(">HH4s", item, 0, kind) + b"\0")
        for item, kind in ((1, b"grid"), (2, b"av01"))
    )

    def meta_box(tile_offset: int) -> bytes:
        iloc = struct.pack(">BBH", 0x44, 0x00, 2)  # 4-byte offsets and lengths, no base offset
        iloc += struct.pack(">HHHHII", 1, 1, 0, 1, 0, len(grid))  # item 1: in idat
        iloc += struct.pack(">HHHHII", 2, 0, 0, 1, tile_offset, len(tile))  # item 2: in mdat
        ipma = struct.pack(">IHBBHBBB", 2, 1, 1, 0x01, 2, 2, 0x01, 0x82)
        return _full_box(
            b"meta",
            0,
            _full_box(b"hdlr", 0, struct.pack(">I4s12x", 0, b"pict") + b"\0")
            + _full_box(b"pitm", 0, struct.pack(">H", 1))
            + _full_box(b"iinf", 0, struct.pack(">H", 2) + infe)
            + _full_box(b"iref", 0, _box(b"dimg", struct.pack(">HHH", 1, 1, 2)))
            + _full_box(b"iloc", 1, iloc)
            + _box(
                b"iprp",
                _box(b"ipco", _full_box(b"ispe", 0, struct.pack(">II", 1, 1)) + av1c)
                + _full_box(b"ipma", 0, ipma),
            )
            + _box(b"idat", grid),
        )

    ftyp = _box(b"ftyp", b"avif" + bytes(4) + b"avifmif1miaf")
    tile_offset = len(ftyp) + len(meta_box(0)) + 8
    return ftyp + meta_box(tile_offset) + _box(b"mdat", tile)


# OpenEXR, Radiance HDR, Sun raster: headers written out ------------------------------------------


def _exr_attribute(name: bytes, kind: bytes, value: bytes) -> bytes:
    return name + b"\0" + kind + b"\0" + struct.pack("<i", len(value)) + value


@_variant("openexr", "scanline", 1 << 31)
def _openexr(width: int, height: int) -> bytes:
    window = struct.pack("<4i", 0, 0, width - 1, height - 1)
    channel = b"Y\0" + struct.pack("<iB3xii", 1, 0, 1, 1)  # HALF, linear, no subsampling
    header = (
        _exr_attribute(b"channels", b"chlist", channel + b"\0")
        + _exr_attribute(b"compression", b"compression", b"\0")
        + _exr_attribute(b"dataWindow", b"box2i", window)
        + _exr_attribute(b"displayWindow", b"box2i", window)
        + _exr_attribute(b"lineOrder", b"lineOrder", b"\0")
        + _exr_attribute(b"pixelAspectRatio", b"float", struct.pack("<f", 1))
        + _exr_attribute(b"screenWindowCenter", b"v2f", struct.pack("<ff", 0, 0))
        + _exr_attribute(b"screenWindowWidth", b"float", struct.pack("<f", 1))
    )
    return b"v/1\x01" + struct.pack("<I", 2) + header + b"\0" + bytes(64)


@_variant("hdr", "y-first", U31)
def _hdr_y_first(width: int, height: int) -> bytes:
    header = b"#?RADIANCE\n# a comment\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n"
    return header % (height, width) + bytes([2, 2, 0, 8]) * 16


@_variant("hdr", "x-first", U31)
def _hdr_x_first(width: int, height: int) -> bytes:
    header = b"#?RGBE\nFORMAT=32-bit_rle_rgbe\nEXPOSURE=1.0\n\n+X %d -Y %d\n"
    return header % (width, height) + bytes([2, 2, 0, 8]) * 16


@_variant("sun-raster", "rgb", U31)
def _sun_raster(width: int, height: int) -> bytes:
    length = min(width * height * 3, U32)
    # magic, width, height, depth, length, type (standard), colour map type and length (none)
    return struct.pack(">8I", 0x59A66A95, width, height, 24, length, 1, 0, 0) + bytes(96)


# -----------------------------------------------------------------------------------------------

VARIANTS: tuple[tuple[str, str], ...] = tuple(_VARIANTS)
BOMB_FORMATS: tuple[str, ...] = tuple(dict.fromkeys(fmt for fmt, _ in VARIANTS))


def fits(fmt: str, variant: str, width: int, height: int) -> bool:
    """Whether the variant's header can declare width x height."""
    return min(width, height) >= 1 and max(width, height) <= _VARIANTS[fmt, variant][0]


def bomb(fmt: str, width: int, height: int, variant: str | None = None) -> bytes:
    """A small file of format fmt whose header declares width x height."""
    names = [variant] if variant is not None else [v for f, v in VARIANTS if f == fmt]
    for name in names:
        if fits(fmt, name, width, height):
            return _VARIANTS[fmt, name][1](width, height)
    raise ValueError(f"no {fmt} bomb variant can declare {width}x{height}")

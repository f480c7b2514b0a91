"""Header sizes match what OpenCV decodes, bombs are measured by their headers alone, and no input
makes dimensions() raise anything but HeaderError. Nothing here decodes a bomb."""

from __future__ import annotations

import struct
import subprocess
import sys
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import formats
from gateway.core.formats import sniff
from gateway.core.headers import (
    MAX_JPEG_SCANS,
    MAX_PNG_TEXT_CHUNKS,
    CostlyImageError,
    Dimensions,
    HeaderError,
    dimensions,
)
from tests.bombs import (
    BOMB_FORMATS,
    VARIANTS,
    av1_obu,
    av1_sequence_header,
    avif_built,
    avif_sample,
    avif_sequence,
    avif_with_ispe,
    bits,
    bomb,
    fits,
    tiff_directories,
)
from tests.conftest import IMAGES
from tests.hostile import png_with_text_chunks, progressive_jpeg_with_scans
from tests.jpeg2000 import SOT, coc, cod, codestream, halved_precincts, jp2, segment

ROOT = Path(__file__).resolve().parent.parent

DECODABLE = sorted(
    f.name for f in vars(formats).values() if isinstance(f, formats.Format) and f.decodable
)
SIZES = (
    (1, 1),
    (16383, 16383),
    (30000, 30000),
    (65500, 3),
    (3, 65500),
    (70000, 70000),
    (1 << 24, 1 << 24),
    (2**31 - 1, 2**31 - 1),
)


def format_of(data: bytes) -> str:
    found = sniff(data)
    assert found is not None
    return found.name


def sample(name: str) -> bytes:
    return (ROOT / "tests" / "data" / "images" / name).read_bytes()


def largest_bomb(fmt: str, variant: str) -> bytes:
    size = max(s for s in (30000, 16383, 1) if fits(fmt, variant, s, s))
    return bomb(fmt, size, size, variant)


# (name, format, bytes) of every sample and every bomb variant: the seeds the tests below cut
# and mutate.
SEEDS = [(p.name, format_of(p.read_bytes()), p.read_bytes()) for p in IMAGES] + [
    (f"bomb-{fmt}-{variant}", fmt, largest_bomb(fmt, variant)) for fmt, variant in VARIANTS
]


def parse_or_refuse(data: bytes, fmt: str) -> Dimensions | None:
    """dimensions(), or None for HeaderError; any other exception fails the test."""
    try:
        dims = dimensions(data, fmt)
    except HeaderError:
        return None
    assert dims.width > 0 and dims.height > 0
    return dims


@cache
def header_length(seed: int) -> int:
    """Bytes up to and a little past the shortest prefix of the seed that parses."""
    _, fmt, data = SEEDS[seed]
    shortest = next(n for n in range(len(data) + 1) if parse_or_refuse(data[:n], fmt))
    return min(len(data), shortest + 64)


# Agreement with the decoder ---------------------------------------------------------------------


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_header_matches_the_decoded_size(path: Path) -> None:
    data = path.read_bytes()
    decoded = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    )
    assert decoded is not None
    # No sample declares more than OpenCV returns. One that legitimately did (a TIFF whose tiles
    # overhang the image, say) would assert header >= decoded instead.
    decoded_size = Dimensions(decoded.shape[1], decoded.shape[0])
    assert dimensions(data, format_of(data)) == decoded_size


def test_every_decodable_format_has_a_reader_and_a_bomb() -> None:
    assert sorted(BOMB_FORMATS) == DECODABLE


def test_buffers_of_every_kind_give_the_same_answer() -> None:
    data = sample("hopper.png")
    expected = Dimensions(128, 128)
    assert dimensions(data, "png") == expected
    assert dimensions(bytearray(data), "png") == expected
    assert dimensions(memoryview(data)[: len(data) // 2], "png") == expected
    assert expected.pixels == 128 * 128
    with pytest.raises(HeaderError):
        dimensions(memoryview(data)[::2], "png")  # not contiguous


def test_an_unknown_format_is_a_header_error() -> None:
    with pytest.raises(HeaderError):
        dimensions(b"\x89PNG\r\n\x1a\n", "heic")


def test_the_module_loads_without_decoder_or_frameworks() -> None:
    code = (
        "import sys, gateway.core.headers; "
        "print(','.join(m for m in ('cv2', 'numpy', 'flask', 'werkzeug', 'grpc') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# Bombs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "variant", "width", "height"),
    [(f, v, w, h) for f, v in VARIANTS for w, h in SIZES if fits(f, v, w, h)],
)
def test_a_bomb_is_measured_from_its_header(
    fmt: str, variant: str, width: int, height: int
) -> None:
    data = bomb(fmt, width, height, variant)
    assert len(data) < 8192
    assert format_of(data) == fmt
    assert dimensions(data, fmt) == Dimensions(width, height)


# Format details ---------------------------------------------------------------------------------


def test_jpeg_fill_bytes_standalone_markers_and_junk_are_walked_past() -> None:
    data = sample("sdl_sample_progressive.jpg")
    # After SOI: fill bytes, a TEM and an RST marker, junk (libjpeg skips it with a warning).
    extra = b"\xff\xff\xff\x01\xff\xd3junk\xff\x00"
    assert dimensions(data[:2] + extra + data[2:], "jpeg") == Dimensions(23, 42)


@pytest.mark.parametrize("length", [0, 1])
def test_a_jpeg_segment_length_that_does_not_advance_is_refused(length: int) -> None:
    data = sample("sdl_sample_progressive.jpg")
    with pytest.raises(HeaderError):
        dimensions(data[:2] + b"\xff\xfe" + struct.pack(">H", length) + data[2:], "jpeg")


def test_a_jpeg_height_left_to_dnl_is_refused() -> None:
    data = bomb("jpeg", 100, 1)
    height = data.index(struct.pack(">BHH", 8, 1, 100)) + 1  # SOF: precision, height, width
    with pytest.raises(HeaderError):
        dimensions(data[:height] + b"\x00\x00" + data[height + 2 :], "jpeg")


def test_jpeg_scan_data_before_any_sof_is_refused() -> None:
    with pytest.raises(HeaderError):
        dimensions(b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 32, "jpeg")


def test_a_progressive_jpeg_of_too_many_scans_is_refused() -> None:
    # 8,000 such scans over a 7000x7000 image took 45 s to decode; a baseline JPEG stops at its
    # first whole scan, whatever follows.
    assert dimensions(progressive_jpeg_with_scans(MAX_JPEG_SCANS - 10), "jpeg") == Dimensions(
        64, 64
    )
    with pytest.raises(HeaderError, match="scans"):
        dimensions(progressive_jpeg_with_scans(MAX_JPEG_SCANS), "jpeg")
    baseline = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    scan = baseline[baseline.index(b"\xff\xda") : -2]
    repeated = baseline[:-2] + scan * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    assert dimensions(repeated, "jpeg") == Dimensions(8, 8)


def test_a_png_of_too_many_compressed_text_chunks_is_refused() -> None:
    # A 1x1 PNG of 100 zTXt chunks (771 KB) took 798 MB to decode.
    assert dimensions(png_with_text_chunks(MAX_PNG_TEXT_CHUNKS), "png") == Dimensions(1, 1)
    with pytest.raises(HeaderError, match="text chunks"):
        dimensions(png_with_text_chunks(MAX_PNG_TEXT_CHUNKS + 1), "png")


def test_a_gif_without_a_reachable_frame_has_its_screen_size() -> None:
    data = sample("sdl_palette.gif")
    assert dimensions(data[:13], "gif") == Dimensions(23, 42)


def test_a_webp_whose_first_chunk_is_not_a_bitstream_is_refused() -> None:
    data = sample("sdl_sample_lossless.webp")
    with pytest.raises(HeaderError):
        dimensions(data[:12] + b"ALPH" + data[16:], "webp")


def test_avif_without_ispe_is_refused() -> None:
    data = sample("sdl_sample.avif").replace(b"ispe", b"free")
    with pytest.raises(HeaderError):
        dimensions(data, "avif")


# AV1 sequence headers: libaom allocates the frame one declares, whatever the ispe property says.
# A 314-byte AVIF whose ispe said 64x64 and whose sequence header said 16384x16384 peaked at 3.6 GB.


def test_an_avif_is_sized_by_its_av1_sequence_header_when_that_is_larger() -> None:
    assert dimensions(avif_sample("hopper.avif", (16384, 16384)), "avif") == Dimensions(
        16384, 16384
    )
    # ispe says 128x128: each side is the larger of the two.
    assert dimensions(avif_sample("hopper.avif", (65536, 3)), "avif") == Dimensions(65536, 128)


@pytest.mark.parametrize(
    ("shape", "dtype", "params"),
    [
        ((37, 53, 3), np.uint8, []),
        ((37, 53), np.uint8, []),
        ((64, 48, 4), np.uint8, []),  # an alpha item of its own
        ((31, 29, 3), np.uint16, [cv2.IMWRITE_AVIF_DEPTH, 10]),
        ((1, 2, 3), np.uint8, []),
        ((300, 2000, 3), np.uint8, [cv2.IMWRITE_AVIF_QUALITY, 100]),
    ],
)
def test_a_real_avif_declares_its_own_size_whatever_its_ispe_says(
    shape: tuple[int, ...], dtype: type, params: list[int]
) -> None:
    try:
        ok, encoded = cv2.imencode(".avif", np.full(shape, 100, dtype), params)
    except cv2.error:
        ok = False
    if not ok:
        pytest.skip("this OpenCV cannot encode AVIF")
    data = encoded.tobytes()
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    size = Dimensions(shape[1], shape[0])
    assert decoded is not None and decoded.shape[:2] == shape[:2]
    assert dimensions(data, "avif") == size
    # A real 2048x2048 AVIF whose ispe said 64x64 decoded the whole 2048x2048 frame.
    assert dimensions(avif_with_ispe(data, 1, 1), "avif") == size


def uvlc(value: int) -> str:
    """AV1's uvlc(): as many zeros as value + 1 has bits after its first, then value + 1."""
    length = (value + 1).bit_length() - 1
    return "0" * length + bits(value + 1, length + 1)


def full_sequence_fields(
    timing: bool = False,
    ticks: int | None = None,
    decoder_model: bool = False,
    points: int = 1,
    level: int = 0,
    display_delay: bool = False,
) -> str:
    """The fields before the frame size of a sequence header that is not reduced (AV1 5.5.1):
    timing info if asked (with equal picture intervals of `ticks` + 1 if given), a decoder model
    of 12-bit buffer delays with parameters for every operating point, then `points` operating
    points at `level`, each with an initial display delay if asked."""
    text = "000" + "0" + "0"  # seq_profile, still_picture, reduced_still_picture_header
    text += "1" if timing else "0"
    if timing:
        text += bits(1, 32) + bits(30, 32)  # num_units_in_display_tick, time_scale
        text += "0" if ticks is None else "1" + uvlc(ticks)  # equal_picture_interval
        text += "1" if decoder_model else "0"
        if decoder_model:  # buffer_delay_length_minus_1, a tick, two more lengths
            text += bits(11, 5) + bits(1, 32) + bits(4, 5) + bits(4, 5)
    text += "1" if display_delay else "0"  # initial_display_delay_present_flag
    text += bits(points - 1, 5)
    for _ in range(points):
        text += bits(0x101, 12) + bits(level, 5) + ("1" if level > 7 else "")  # idc, level, tier
        if decoder_model:  # present, decoder and encoder buffer delays, low_delay_mode_flag
            text += "1" + bits(5, 12) + bits(7, 12) + "0"
        if display_delay:
            text += "1" + bits(3, 4)  # initial_display_delay_minus_1
    return text


@pytest.mark.parametrize(
    "fields",
    [
        full_sequence_fields(),
        full_sequence_fields(timing=True),
        *(full_sequence_fields(timing=True, ticks=t) for t in (0, 1, 1000, 2**32 - 2)),
        full_sequence_fields(timing=True, decoder_model=True, points=3, level=9),
        full_sequence_fields(points=3, level=13, display_delay=True),
        # The longest: 32 operating points with every optional field.
        full_sequence_fields(
            timing=True, ticks=2**31, decoder_model=True, points=32, level=31, display_delay=True
        ),
    ],
    ids=[
        "plain",
        "timing",
        *(f"ticks {t}" for t in (0, 1, 1000, 2**32 - 2)),
        "decoder model",
        "display delays",
        "longest",
    ],
)
def test_a_full_av1_sequence_header_is_read_to_its_frame_size(fields: str) -> None:
    data = avif_built(av1_sequence_header(5000, 3000, fields), (64, 64))
    assert dimensions(data, "avif") == Dimensions(5000, 3000)


def test_every_av1_sequence_header_counts_wherever_it_is() -> None:
    small, large = av1_sequence_header(64, 64), av1_sequence_header(3000, 2000)
    padding = av1_obu(15, bytes(300))  # a two-byte size field
    # An OBU extension header (temporal and spatial layer IDs) before the size field.
    extended = bytes([large[0] | 4, 0x28]) + large[1:]
    for av1 in (
        small + padding + large,  # a later sequence header: libaom sizes later frames by it
        large + small,
        padding + extended + small,
        small + bytes(100) + large,  # libaom skips zero bytes after a frame
    ):
        assert dimensions(avif_built(av1, (64, 64)), "avif") == Dimensions(3000, 2000)
    # The item's data in three pieces, which lie in the file in reverse order.
    assert dimensions(avif_built(small + large, (64, 64), pieces=3), "avif") == Dimensions(
        3000, 2000
    )
    # A copy of a sequence header in the av1C property counts too.
    assert dimensions(avif_built(small, (64, 64), config=large), "avif") == Dimensions(3000, 2000)


@pytest.mark.parametrize(
    ("av1", "reason"),
    [
        (b"", "no sequence header"),
        (av1_obu(15, b"padding"), "no sequence header"),
        (bytes([1 << 3]) + av1_sequence_header(64, 64)[2:], "no size field"),
        (bytes([0x80]) + av1_sequence_header(64, 64)[1:], "forbidden bit"),
        (av1_sequence_header(64, 64)[:-1], "past the end"),
        (av1_obu(1, b"\x18\x15"), "truncated"),
        (bytes([0x0A]) + b"\x80" * 8 + b"\x00", "longer than 8 bytes"),
        # Timing info up to equal_picture_interval, set, then an uvlc() of 32 leading zeros,
        # a value libaom refuses.
        (
            av1_sequence_header(64, 64, full_sequence_fields(timing=True)[:70] + "1" + "0" * 40),
            "uvlc",
        ),
        # 20,000 empty OBUs before the sequence header: more than one parse may visit
        (av1_obu(15, b"") * 20000 + av1_sequence_header(64, 64), "too many structures"),
        # zero bytes are skipped, but as structures a few dozen bytes at a time
        (av1_sequence_header(64, 64) + bytes(2 << 20), "too many structures"),
    ],
    ids=[
        "empty",
        "padding only",
        "no size field",
        "forbidden bit",
        "overrun",
        "truncated",
        "long size",
        "uvlc",
        "many OBUs",
        "many zeros",
    ],
)
def test_an_avif_item_whose_av1_sequence_header_cannot_be_read_is_refused(
    av1: bytes, reason: str
) -> None:
    with pytest.raises(HeaderError, match=reason):
        dimensions(avif_built(av1, (64, 64)), "avif")


def test_an_avif_item_with_data_outside_the_file_or_no_location_is_refused() -> None:
    data = avif_built(av1_sequence_header(64, 64), (64, 64))
    extent = data.index(struct.pack(">HHH", 1, 0, 1)) + 6  # item 1: offset, then length
    length = struct.unpack_from(">I", data, extent + 4)[0]
    longer = data[: extent + 4] + struct.pack(">I", length + 1) + data[extent + 8 :]
    with pytest.raises(HeaderError, match="outside"):
        dimensions(longer, "avif")
    other = data.replace(struct.pack(">HHH", 1, 0, 1), struct.pack(">HHH", 2, 0, 1))
    with pytest.raises(HeaderError, match="no location"):
        dimensions(other, "avif")


def test_an_image_sequence_is_sized_by_the_sequence_header_of_its_first_sample() -> None:
    # libavif decodes an "avis" file from its track: an 898-byte one whose ispe, item and track
    # header said 1x1 and whose first sample's sequence header said 16384x16384 peaked at 3.6 GB.
    real = avif_sequence((23, 42))
    decoded = cv2.imdecode(np.frombuffer(real, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None  # the first frame, cut to the track header's 1x1
    assert dimensions(real, "avif") == Dimensions(23, 42)
    assert dimensions(avif_sequence((3000, 2000)), "avif") == Dimensions(3000, 2000)
    # A sequence header in the sample entry's av1C counts too.
    config = av1_sequence_header(5000, 10)
    assert dimensions(avif_sequence((23, 42), config=config), "avif") == Dimensions(5000, 42)
    with pytest.raises(HeaderError, match="first sample of an AV1 track has no sequence header"):
        dimensions(avif_sequence((1, 1), sample=av1_obu(15, b"padding")), "avif")
    # Real sequences, one with an alpha track, declare their own size.
    for channels in (3, 4):
        animation = cv2.Animation()
        animation.frames = [np.full((48, 80, channels), i * 40, np.uint8) for i in range(3)]
        animation.durations = [100] * 3
        ok, encoded = cv2.imencodeanimation(".avif", animation)
        assert ok
        assert dimensions(encoded.tobytes(), "avif") == Dimensions(80, 48)


@pytest.mark.parametrize("token", ["\u0663", "+2", "1_000", "0x10", "1e3", "-5", "9" * 19])
def test_text_numbers_are_ascii_digits_only(token: str) -> None:
    value = token.encode()
    for data, fmt in (
        (b"P6\n%s 5\n255\n" % value, "pnm"),
        (b"PF\n5 %s\n-1.0\n" % value, "pfm"),
        (b"P7\nWIDTH %s\nHEIGHT 5\nENDHDR\n" % value, "pnm"),
        (b"#?RADIANCE\n\n-Y %s +X 5\n" % value, "hdr"),
    ):
        with pytest.raises(HeaderError):
            dimensions(data, fmt)


def test_pnm_comments_and_whitespace_between_tokens() -> None:
    assert dimensions(b"P6 # a comment\n\t7#another\r 5\n255\n", "pnm") == Dimensions(7, 5)


def test_a_number_cut_by_the_scan_limit_is_refused_not_shortened() -> None:
    data = b"P6\n#" + b"x" * ((1 << 16) - 6) + b"\n123456 5\n255\n"
    with pytest.raises(HeaderError):
        dimensions(data, "pnm")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"-Y 5 +X 7", (7, 5)),
        (b"-Y 5 -X 7", (7, 5)),
        (b"+Y 5 +X 7", (7, 5)),
        (b"+Y 5 -X 7", (7, 5)),
        (b"+X 7 -Y 5", (7, 5)),
        (b"-X 7 -Y 5", (7, 5)),
        (b"+X 7 +Y 5", (7, 5)),
        (b"-X 7 +Y 5", (7, 5)),
    ],
)
def test_hdr_resolution_in_any_orientation(line: bytes, expected: tuple[int, int]) -> None:
    data = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + line + b"\n"
    assert dimensions(data, "hdr") == Dimensions(*expected)


def test_an_hdr_header_line_of_127_bytes_ends_the_header_as_fgets_reads_it() -> None:
    # OpenCV's 128-byte fgets reads this comment, then its newline alone: the end of the header.
    comment = b"#" + b"c" * 126 + b"\n"
    data = b"#?RADIANCE\n" + comment + b"-Y 30000 +X 30000\n\n-Y 1 +X 1\n"
    assert dimensions(data, "hdr") == Dimensions(30000, 30000)


def test_an_exr_attribute_whose_size_disagrees_with_its_type_is_refused() -> None:
    data = bomb("openexr", 100, 100)
    attribute = b"compression\0compression\0"
    one_byte = attribute + struct.pack("<i", 1) + b"\0"
    bad = data.replace(one_byte, attribute + struct.pack("<i", 2) + b"\0\0")
    assert bad != data
    with pytest.raises(HeaderError):
        dimensions(bad, "openexr")


def test_a_parse_visits_a_bounded_number_of_structures() -> None:
    # 20000 empty COM segments before the SOF: more than one parse may visit.
    data = sample("sdl_sample_progressive.jpg")
    with pytest.raises(HeaderError):
        dimensions(data[:2] + b"\xff\xfe\x00\x02" * 20000 + data[2:], "jpeg")


# Truncation and fuzzing -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(len(SEEDS)), ids=[name for name, _, _ in SEEDS])
def test_every_prefix_parses_or_is_refused(seed: int) -> None:
    _, fmt, data = SEEDS[seed]
    for n in range(header_length(seed) + 1):
        parse_or_refuse(data[:n], fmt)


FUZZ = settings(max_examples=100, deadline=None, database=None)


@pytest.mark.parametrize("fmt", DECODABLE)
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(fmt: str, data: bytes) -> None:
    parse_or_refuse(data, fmt)


@settings(FUZZ, max_examples=300)
@given(seed=st.integers(0, len(SEEDS) - 1), cut=st.integers(0, 64), tail=st.binary(max_size=300))
def test_a_real_signature_then_arbitrary_bytes(seed: int, cut: int, tail: bytes) -> None:
    _, fmt, data = SEEDS[seed]
    parse_or_refuse(data[:cut] + tail, fmt)


MUTATION = st.tuples(
    st.sampled_from(("flip", "insert", "delete")), st.integers(0, 1 << 16), st.integers(1, 255)
)


@settings(FUZZ, max_examples=300)
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_headers(seed: int, mutations: list[tuple[str, int, int]]) -> None:
    _, fmt, data = SEEDS[seed]
    buf = bytearray(data)
    for op, where, value in mutations:
        pos = where % min(len(buf) + 1, header_length(seed) + 1)
        if op == "insert":
            buf.insert(pos, value)
        elif pos < len(buf) and op == "flip":
            buf[pos] ^= value
        elif pos < len(buf):
            del buf[pos]
    parse_or_refuse(bytes(buf), fmt)


def test_a_tiff_declaring_absurd_depth_weighs_at_most_64_bits_times_8_samples() -> None:
    ok, encoded = cv2.imencode(".tiff", np.zeros((4, 4, 3), np.float64))
    assert ok
    assert dimensions(encoded.tobytes(), "tiff").pixel_bytes == 24
    # SamplesPerPixel 65,535: a tiny image would have waited for the whole pixel budget.
    entries = [(256, 3, 1, 4), (257, 3, 1, 4), (258, 3, 1, 64), (277, 3, 1, 65535)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in entries
    )
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 4
    assert dimensions(data, "tiff").pixel_bytes == 64


@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_of_more_than_4096_directories_is_refused(big: bool, tmp_path: Path) -> None:
    # OpenCV has libtiff count every directory (page) before it decodes the first, and each
    # costs memory: a chain of a million empty ones (6 MB) took 115 MB to decode a 1x1 image.
    path = tmp_path / "pages.tif"
    path.write_bytes(tiff_directories(4097, big))
    assert cv2.imcount(str(path)) == 4097  # what the decoder would walk
    with pytest.raises(HeaderError, match="more than 4096 directories"):
        dimensions(path.read_bytes(), "tiff")
    assert dimensions(tiff_directories(4096, big), "tiff") == Dimensions(1, 1)
    # A loop ends the chain, as libtiff takes it to, and the walk with it.
    assert dimensions(tiff_directories(3, big, loop=True), "tiff") == Dimensions(1, 1)
    with pytest.raises(HeaderError, match="more than 4096 directories"):
        dimensions(tiff_directories(5000, big, loop=True), "tiff")


# JPEG 2000: what OpenJPEG allocates beyond the image ---------------------------------------------


@pytest.mark.parametrize("columns", [5, 255])
def test_a_jp2_palette_of_more_columns_than_opencv_outputs_is_refused(columns: int) -> None:
    # OpenJPEG expands the image into one 32-bit plane a column before OpenCV keeps at most four:
    # 255 columns took a 1000x1000 image to 1 GB.
    with pytest.raises(HeaderError, match=f"{columns} columns"):
        dimensions(jp2(codestream(1000, 1000), palette=columns), "jpeg2000")


@pytest.mark.parametrize("columns", [1, 3, 4])
def test_a_jp2_palette_of_up_to_four_columns_decodes(columns: int) -> None:
    data = jp2(codestream(64, 48), palette=columns)
    assert dimensions(data, "jpeg2000") == Dimensions(64, 48)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (48, 64, 3)


@pytest.mark.parametrize(
    ("width", "height", "tile"),
    [(255, 257, (1, 1)), (17, 241, (1, 1)), (8193, 4097, (2, 4)), (50_000, 50_000, (64, 64))],
)
def test_a_jpeg2000_of_more_than_4096_tiles_is_refused(
    width: int, height: int, tile: tuple[int, int]
) -> None:
    # OpenJPEG keeps about 10 KB a tile from the main header on: 65,535 tiles of 3 components, an
    # 87-byte file of 255x257, cost 791 MB before OpenCV saw anything.
    data = codestream(width, height, components=3, tile=tile, written_tiles=1)
    with pytest.raises(CostlyImageError, match="tiles"):
        dimensions(data, "jpeg2000")
    with pytest.raises(CostlyImageError, match="tiles"):
        dimensions(jp2(data), "jpeg2000")


@pytest.mark.parametrize(
    ("width", "height", "tile"),
    [(64, 64, (1, 1)), (8192, 4096, (128, 128)), (7071, 7071, (1024, 512))],
)
def test_a_jpeg2000_of_up_to_4096_tiles_is_read(
    width: int, height: int, tile: tuple[int, int]
) -> None:
    data = codestream(width, height, components=4, tile=tile, written_tiles=1)
    assert dimensions(data, "jpeg2000") == Dimensions(width, height)


def test_jpeg2000_tiles_are_counted_from_the_tile_grid_origin() -> None:
    # A 128x128 image whose corner is at (1, 1): 2x2 tiles from (0, 0) make a grid of 65x65
    # tiles, the first of which holds one pixel of the image.
    data = bytearray(codestream(128, 128, tile=(2, 2), written_tiles=1))
    struct.pack_into(">4I", data, 8, 129, 129, 1, 1)  # Xsiz, Ysiz, XOsiz, YOsiz
    with pytest.raises(CostlyImageError, match="4225 tiles"):
        dimensions(data, "jpeg2000")
    struct.pack_into(">2I", data, 32, 1, 1)  # XTOsiz, YTOsiz: the grid starts at the image
    assert dimensions(data, "jpeg2000") == Dimensions(128, 128)
    struct.pack_into(">2I", data, 32, 2, 2)  # a grid that starts past the image's corner
    with pytest.raises(HeaderError, match="corner"):
        dimensions(data, "jpeg2000")


@pytest.mark.parametrize("components", [0, 5, 16, 16384])
def test_a_jpeg2000_of_more_components_than_opencv_decodes_is_refused(components: int) -> None:
    # OpenCV refuses them too, but only after OpenJPEG has read the main header and kept records
    # of every tile-component: 16 components in 65,535 tiles peaked at 1.7 GB.
    data = codestream(64, 64, components=components)
    with pytest.raises(HeaderError, match=f"{components} components") as info:
        dimensions(data, "jpeg2000")
    assert not isinstance(info.value, CostlyImageError)
    for fine in range(1, 5):
        assert dimensions(codestream(64, 64, components=fine), "jpeg2000") == Dimensions(64, 64)


def with_second_tile_header(data: bytes, segments: bytes) -> bytes:
    """`data` with `segments` added to the header of its second tile-part."""
    first = data.index(b"\xff\x90")  # SOT
    second = data.index(b"\xff\x90", first + struct.unpack_from(">I", data, first + 6)[0])
    (length,) = struct.unpack_from(">I", data, second + 6)  # Psot
    sot = data[second : second + 6] + struct.pack(">I", length + len(segments))
    return data[:second] + sot + data[second + 10 : second + 12] + segments + data[second + 12 :]


SMALL_CODE_BLOCKS = {
    # OpenJPEG keeps about 400 bytes a code-block whatever its size: a 94-byte 2000x2000
    # codestream of 4 components in 4x4 code-blocks peaked at 487 MB, 122 bytes a pixel.
    "4x4": codestream(256, 256, components=4, code_block=(4, 4)),
    "8x16": codestream(256, 256, code_block=(8, 16)),
    "4x32": codestream(256, 256, code_block=(4, 32)),
    # Precincts cut code-blocks down: to 2x2 in the lowest resolution level, to half the
    # precinct (8x8) in the sub-bands of the levels above it.
    "2x2 precincts": codestream(256, 256, precincts=(2, 2)),
    "16x16 precincts above the lowest level": codestream(256, 256, levels=1, precincts=(16, 16)),
    # Halved from 32x32 at the highest level, precincts make code-blocks of 16x16 or less in
    # every level: one for every 67 samples. 4 components at 2000x2000 peaked at 54 bytes a pixel.
    "precincts halved from 32x32": codestream(
        256, 256, levels=5, precincts=halved_precincts(32, 5)
    ),
    # A COD or COC segment sets the code-blocks of one component, or of one tile in a tile-part's
    # header.
    "in a COC": codestream(256, 256, components=3, main_header=coc(1, (4, 4))),
    "in a tile-part's COD": codestream(256, 256, components=4, tile_header=cod((4, 4))),
    "in a tile-part's COC": codestream(256, 256, components=4, tile_header=coc(3, (4, 4))),
    "in the second tile's COD": with_second_tile_header(
        codestream(256, 256, tile=(128, 256)), cod((4, 4))
    ),
}


@pytest.mark.parametrize("name", SMALL_CODE_BLOCKS)
def test_jpeg2000_code_blocks_under_256_samples_are_refused(name: str) -> None:
    data = SMALL_CODE_BLOCKS[name]
    with pytest.raises(CostlyImageError, match="code-blocks of"):
        dimensions(data, "jpeg2000")
    with pytest.raises(CostlyImageError, match="code-blocks of"):
        dimensions(jp2(data), "jpeg2000")
    # OpenJPEG would decode each (this one is small).
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.mark.parametrize(
    ("code_block", "precincts", "levels"),
    [
        ((64, 64), None, 5),  # OpenJPEG's default, and Kakadu's
        ((32, 32), None, 5),  # the cinema profiles'
        ((16, 16), None, 0),
        ((4, 64), None, 0),
        ((1024, 4), None, 0),  # low-latency HTJ2K's
        ((64, 64), (32, 32), 3),  # 16x16 in the sub-bands
        ((64, 64), (16, 16), 0),  # 16x16 in the one level
    ],
)
def test_jpeg2000_code_blocks_of_256_samples_or_more_are_read(
    code_block: tuple[int, int], precincts: tuple[int, int] | None, levels: int
) -> None:
    data = codestream(256, 256, code_block=code_block, precincts=precincts, levels=levels)
    assert dimensions(data, "jpeg2000") == Dimensions(256, 256)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.mark.parametrize("size", [256, 128, 64])
def test_jpeg2000_precincts_halved_toward_the_lowest_level_are_read(size: int) -> None:
    # OpenJPEG halves the precincts given for the highest resolution level at each level below
    # (opj_compress -c [256,256], Pillow's precinct_size): they cut code-blocks down to 8x8 or
    # 4x4 only in the lowest levels, which hold a few thousandths of the samples. 4 components at
    # 2000x2000 peaked at 20 (256), 22 (128) and 29 (64) bytes a pixel; 64x64 code-blocks at 20.
    data = codestream(512, 512, levels=5, precincts=halved_precincts(size, 5))
    assert dimensions(data, "jpeg2000") == Dimensions(512, 512)
    assert dimensions(jp2(data), "jpeg2000") == Dimensions(512, 512)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


@pytest.mark.parametrize(
    ("data", "planes"),
    [
        # One plane of 32-bit samples a component, the image OpenJPEG returns.
        (codestream(1000, 1000), 1),
        (codestream(1000, 1000, components=3), 3),
        (codestream(1000, 1000, components=4, bits=16), 4),
        # Tiled: each tile is decoded into planes of its own first (the largest is 1000x999).
        (codestream(1000, 1000, components=4, tile=(1000, 999)), 4 + 4 * 0.999),
        (codestream(1000, 1000, components=4, tile=(250, 250)), 4 + 4 / 16),
        # A palette's columns are planes of their own.
        (jp2(codestream(1000, 1000), palette=3), 1 + 3),
    ],
    ids=["gray", "rgb", "rgba 16-bit", "two tiles", "16 tiles", "palette"],
)
def test_jpeg2000_weighs_openjpeg_planes(data: bytes, planes: float) -> None:
    size = dimensions(data, "jpeg2000")
    records = size.decoder_bytes - 4 * planes * size.pixels  # of its tiles, about 10 KB each
    assert 0 < records <= 16 * 14_000


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("depth", [np.uint8, np.uint16])
def test_jpeg2000_written_by_opencv_is_read_and_weighs_its_components(
    channels: int, depth: type
) -> None:
    ok, encoded = cv2.imencode(".jp2", np.zeros((300, 400, channels), depth))
    assert ok
    size = dimensions(encoded.tobytes(), "jpeg2000")
    assert size == Dimensions(400, 300)
    assert 4 * channels * size.pixels < size.decoder_bytes < (4 * channels + 1) * size.pixels


@pytest.mark.parametrize(("parts", "refused"), [(3, False), (4, True)])
def test_a_jpeg2000_walk_visits_a_bounded_number_of_tile_parts(parts: int, refused: bool) -> None:
    # Every tile-part's header is read for the code-blocks it may set: 4096 tiles of 4 parts
    # each are more segments than one parse may visit.
    head = codestream(64, 64, tile=(1, 1), written_tiles=0)[:-2]  # no EOC
    tile_parts = b"".join(
        segment(SOT, struct.pack(">HIBB", tile, 15, part, parts)) + b"\xff\x93\x00"
        for tile in range(4096)
        for part in range(parts)
    )
    data = head + tile_parts + b"\xff\xd9"
    if refused:
        with pytest.raises(HeaderError, match="too many structures"):
            dimensions(data, "jpeg2000")
    else:
        assert dimensions(data, "jpeg2000") == Dimensions(64, 64)


def test_a_jpeg2000_of_many_different_coding_styles_is_refused() -> None:
    # Each segment of precincts for 33 levels was weighed level by level: 16,000 different ones
    # took about 230 ms to check, against 18 ms for the slowest JPEG header.
    sizes = [[(1 << (8 + (i >> b & 7)), 256) for b in range(33)] for i in range(16_000)]
    styles = b"".join(coc(i % 4, (64, 64), 32, sizes[i]) for i in range(16_000))
    data = codestream(4000, 4000, components=4, levels=5, main_header=styles, written_tiles=0)
    with pytest.raises(HeaderError, match="too many structures"):
        dimensions(data, "jpeg2000")


def test_a_jpeg2000_repeating_one_coding_style_in_every_tile_is_read() -> None:
    # Weighed once: 4096 tiles, each with the same COD of precincts for 6 levels.
    style = cod((64, 64), 5, halved_precincts(256, 5))
    data = codestream(4096, 4096, tile=(64, 64), levels=5, tile_header=style, written_tiles=4096)
    assert dimensions(data, "jpeg2000") == Dimensions(4096, 4096)

"""Hostile inputs and the answer each must get: shared by the tests and `make soak`."""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from gateway.core.errors import ErrorCode
from tests.bombs import BOMB_FORMATS, avif_sample, avif_sequence, bomb, tiff_directories
from tests.jpeg2000 import cod, codestream, jp2

DATA = Path(__file__).parent / "data"
IMAGES = DATA / "images"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    # None: the image is valid and must decode.
    error: ErrorCode | None
    shape: list[int] | None = None
    # Words the error message must hold, where the code alone does not tell why it came (the
    # header's refusal, or the decoder's after paying for it).
    reason: str | None = None


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_text_chunks(count: int) -> bytes:
    """A 1x1 gray PNG with `count` zTXt chunks, each inflating to 4 MB of text."""
    text = b"Comment\0\0" + zlib.compress(b"A" * 4_000_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
        + png_chunk(b"zTXt", text) * count
        + png_chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + png_chunk(b"IEND", b"")
    )


def progressive_jpeg_with_scans(extra: int, side: int = 64) -> bytes:
    """A gray progressive JPEG with `extra` more AC scans, each 14 bytes: one EOB run over every
    block, through a Huffman table of that one symbol. libjpeg decodes each over the image."""
    encoded = cv2.imencode(
        ".jpg", np.full((side, side), 128, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    )[1].tobytes()
    component = encoded[encoded.index(b"\xff\xc2") + 10]
    blocks = ((side + 7) // 8) ** 2
    assert blocks < 16384
    # AC table 1: one code of length 1, symbol 0xE0 (an EOB run of 2^14 + 14 more bits).
    table = b"\xff\xc4" + struct.pack(">HB", 20, 0x11) + bytes([1] + [0] * 15) + b"\xe0"
    run = int("0" + format(0, "014b") + "1", 2).to_bytes(2, "big")  # a run of 16384 blocks
    scan = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, component, 0x01, 1, 63, 0) + run
    return encoded[:-2] + table + scan * extra + b"\xff\xd9"


def _bomb_size(fmt: str) -> tuple[int, int]:
    # WebP's 14-bit fields stop at 16383; everything else can say 30000.
    return (16383, 16383) if fmt == "webp" else (30000, 30000)


def cases() -> list[Case]:
    out = [
        Case(f"bomb {fmt}", bomb(fmt, *_bomb_size(fmt)), ErrorCode.IMAGE_TOO_LARGE)
        for fmt in BOMB_FORMATS
    ]
    out.append(
        Case("png wider than OpenCV allows", bomb("png", 2**20 + 1, 1), ErrorCode.UNDECODABLE_IMAGE)
    )
    # libjpeg fills in what the scan data does not cover, so this decodes (mostly grey).
    out.append(
        Case(
            "jpeg whose header claims more than its data",
            bomb("jpeg", 2000, 1500),
            None,
            [1500, 2000, 3],
        )
    )
    for path in sorted(IMAGES.iterdir()):
        data = path.read_bytes()
        out.append(
            Case(f"truncated {path.name}", data[: len(data) // 2], ErrorCode.UNDECODABLE_IMAGE)
        )
    rng = random.Random(1234)
    out += [
        Case("empty", b"", ErrorCode.EMPTY_IMAGE),
        Case("random bytes", rng.randbytes(4096), ErrorCode.UNDECODABLE_IMAGE),
        Case("plain text", b"hello, this is not an image\n", ErrorCode.UNDECODABLE_IMAGE),
        Case("html", b"<!DOCTYPE html><html><body>hi</body></html>", ErrorCode.UNSUPPORTED_FORMAT),
        Case("json", b'{"image": "aGVsbG8="}', ErrorCode.UNSUPPORTED_FORMAT),
        Case("json array", b' [\n  [1, 2], {"a": null}]', ErrorCode.UNSUPPORTED_FORMAT),
        # Text that starts like JSON but is not: plain text, so undecodable.
        Case("toml", b'[build-system]\nrequires = ["x"]\n', ErrorCode.UNDECODABLE_IMAGE),
        Case("ini", b"[section]\nkey = value\n", ErrorCode.UNDECODABLE_IMAGE),
        Case("pdf", b"%PDF-1.7\n1 0 obj << >> endobj\n", ErrorCode.UNSUPPORTED_FORMAT),
        Case("zip", b"PK\x03\x04" + bytes(60), ErrorCode.UNSUPPORTED_FORMAT),
        Case("gzip", b"\x1f\x8b\x08\x00" + bytes(40), ErrorCode.UNSUPPORTED_FORMAT),
        Case(
            "heic",
            (DATA / "unsupported" / "hopper.heic").read_bytes(),
            ErrorCode.UNSUPPORTED_FORMAT,
        ),
        Case(
            "svg",
            (DATA / "unsupported" / "sdl_sample.svg").read_bytes(),
            ErrorCode.UNSUPPORTED_FORMAT,
        ),
        Case(
            "jpeg xl",
            (DATA / "unsupported" / "sdl_sample.jxl").read_bytes(),
            ErrorCode.UNSUPPORTED_FORMAT,
        ),
        # Cheap to send, dear to decode: libpng inflates every text chunk (4 MB each here),
        # libjpeg decodes every scan.
        Case(
            "png of 9 compressed text chunks", png_with_text_chunks(9), ErrorCode.UNDECODABLE_IMAGE
        ),
        Case("png of 8 compressed text chunks", png_with_text_chunks(8), None, [1, 1, 3]),
        Case(
            "progressive jpeg of 300 scans",
            progressive_jpeg_with_scans(300),
            ErrorCode.UNDECODABLE_IMAGE,
        ),
        Case("progressive jpeg of 200 scans", progressive_jpeg_with_scans(200), None, [64, 64, 3]),
        # A GIF/JavaScript polyglot: its "screen size" is the bytes of "=1;/": 12605x12091.
        Case("gif/js polyglot", b"GIF89a=1;/*" + bytes(20) + b"*/=1;", ErrorCode.IMAGE_TOO_LARGE),
        Case("png signature, nothing else", b"\x89PNG\r\n\x1a\n", ErrorCode.UNDECODABLE_IMAGE),
        Case("jpeg SOI, nothing else", b"\xff\xd8\xff", ErrorCode.UNDECODABLE_IMAGE),
        # Defined answers for valid images with something around them: the image decodes.
        Case(
            "jpeg followed by a zip (polyglot)",
            (IMAGES / "hopper.jpg").read_bytes() + b"PK\x03\x04" + bytes(200),
            None,
            [128, 128, 3],
        ),
        Case(
            "png with trailing garbage",
            (IMAGES / "hopper.png").read_bytes() + rng.randbytes(999),
            None,
            [128, 128, 3],
        ),
        # OpenCV has libtiff count (and record) every directory before it decodes the first.
        Case("tiff of 5000 directories", tiff_directories(5000), ErrorCode.UNDECODABLE_IMAGE),
        # libaom allocates the frame an AV1 sequence header declares, whatever ispe says (one
        # declaring 16384x16384 in a 314-byte file peaked at 3.6 GB).
        Case(
            "avif whose AV1 sequence header declares 8192x8192, its ispe 128x128",
            avif_sample("hopper.avif", (8192, 8192)),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
        # The same in an image sequence: libavif decodes its track's first sample.
        Case(
            "avif sequence whose first sample declares 8192x8192, all else 1x1",
            avif_sequence((8192, 8192)),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
    ]
    return out + _jpeg2000_cases()


def _jpeg2000_cases() -> list[Case]:
    """JPEG 2000 files within the pixel limit that cost OpenJPEG far more memory than their
    pixels: refused from the header."""
    return [
        # OpenJPEG expands the image into a 32-bit plane a palette column, 255 MB here, before
        # OpenCV keeps three of them.
        Case(
            "jp2 whose palette has 255 columns",
            jp2(codestream(500, 500), palette=255),
            ErrorCode.UNDECODABLE_IMAGE,
        ),
        # OpenJPEG keeps records of every tile from the main header on: this 90-byte file of
        # 255x257 in 1x1 tiles cost 791 MB before a pixel was decoded.
        Case(
            "jpeg2000 in 65,535 tiles",
            codestream(255, 257, components=3, tile=(1, 1), written_tiles=1),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
        # OpenCV refuses more than 4 components, once OpenJPEG has kept records of every
        # tile-component: 106 MB for this one.
        Case(
            "jpeg2000 of 16 components in 4,096 tiles",
            codestream(64, 64, components=16, tile=(1, 1), written_tiles=1),
            ErrorCode.UNDECODABLE_IMAGE,
            reason="16 components",
        ),
        # OpenJPEG keeps about 400 bytes a code-block: in 4x4 code-blocks, this 94-byte
        # 1000x1000 codestream cost 120 MB (122 bytes a pixel), where the image takes 16.
        Case(
            "jpeg2000 in 4x4 code-blocks",
            codestream(1000, 1000, components=4, code_block=(4, 4)),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
        Case(
            "jp2 whose tile-part header sets 4x4 code-blocks",
            jp2(codestream(1000, 1000, components=4, tile_header=cod((4, 4)))),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
        # Precincts of 2x2 samples make code-blocks of 2x2.
        Case(
            "jpeg2000 in 2x2 precincts",
            codestream(200, 200, components=4, precincts=(2, 2)),
            ErrorCode.IMAGE_TOO_LARGE,
        ),
    ]


BOUNDARY = "b0undary"


def multipart(parts: list[bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def file_part(name: str, data: bytes, filename: str = "f.bin") -> bytes:
    head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'
    return head.encode() + data


def text_part(name: str, value: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()


@dataclass(frozen=True)
class MultipartCase:
    name: str
    body: bytes
    error: ErrorCode


def _multipart_cases() -> list[MultipartCase]:
    png = (IMAGES / "hopper.png").read_bytes()
    return [
        MultipartCase(
            "missing closing boundary",
            multipart([file_part("0", png)], close=False),
            ErrorCode.MALFORMED_MULTIPART,
        ),
        MultipartCase(
            "a text field named as a file part",
            multipart([file_part("0", png), text_part("0", "1")]),
            ErrorCode.DUPLICATE_PART,
        ),
        MultipartCase(
            "two text fields of one name",
            multipart([file_part("0", png), text_part("q", "1"), text_part("q", "2")]),
            ErrorCode.DUPLICATE_PART,
        ),
        MultipartCase("only text fields", multipart([text_part("a", "1")]), ErrorCode.NO_IMAGES),
        MultipartCase("no parts at all", f"--{BOUNDARY}--\r\n".encode(), ErrorCode.NO_IMAGES),
        MultipartCase(
            "thousands of tiny parts",
            multipart([file_part(str(i), b"x") for i in range(5000)]),
            ErrorCode.TOO_MANY_PARTS,
        ),
        MultipartCase(
            "thousands of tiny parts of one name",
            multipart([file_part("f", b"x") for _ in range(5000)]),
            ErrorCode.TOO_MANY_PARTS,
        ),
        MultipartCase(
            "huge text field",
            multipart([file_part("0", png), text_part("t", "x" * 70000)]),
            ErrorCode.PAYLOAD_TOO_LARGE,
        ),
        MultipartCase("body that is not multipart", b"just bytes", ErrorCode.MALFORMED_MULTIPART),
        MultipartCase(
            "part header line of 8 KiB",
            multipart([b"X-Padding: " + b"a" * 8192 + b"\r\n" + file_part("0", png)]),
            ErrorCode.MALFORMED_MULTIPART,
        ),
        MultipartCase(
            "part with a hundred headers",
            multipart([b"X-Padding: a\r\n" * 100 + file_part("0", png)]),
            ErrorCode.MALFORMED_MULTIPART,
        ),
        MultipartCase(
            "part without Content-Disposition",
            multipart([b"Content-Type: image/png\r\n\r\n" + png]),
            ErrorCode.MALFORMED_MULTIPART,
        ),
    ]


MULTIPART_CASES = _multipart_cases()

"""Hostile inputs and the answer each must get: shared by the tests and `make soak`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from gateway.core.errors import ErrorCode
from tests.bombs import BOMB_FORMATS, bomb

DATA = Path(__file__).parent / "data"
IMAGES = DATA / "images"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    # None: the image is valid and must decode.
    error: ErrorCode | None
    shape: list[int] | None = None


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
    ]
    return out


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

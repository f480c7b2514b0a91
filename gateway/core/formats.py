"""Image format detection from magic bytes. The declared content type is never trusted."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.core.types import Buffer


@dataclass(frozen=True)
class Format:
    name: str
    # Whether OpenCV (the decoder behind the gateway) decodes this format.
    decodable: bool
    # Whether it is an image format at all (a PDF or ZIP is recognised only to be named).
    image: bool = True


JPEG = Format("jpeg", True)
PNG = Format("png", True)
WEBP = Format("webp", True)
GIF = Format("gif", True)
BMP = Format("bmp", True)
TIFF = Format("tiff", True)
JPEG2000 = Format("jpeg2000", True)
PNM = Format("pnm", True)
PFM = Format("pfm", True)
AVIF = Format("avif", True)
OPENEXR = Format("openexr", True)
RADIANCE_HDR = Format("hdr", True)
SUN_RASTER = Format("sun-raster", True)

# Recognised so that the error can name what was sent.
HEIC = Format("heic", False)
JPEG_XL = Format("jpeg-xl", False)
SVG = Format("svg", False)
QOI = Format("qoi", False)
ICO = Format("ico", False)
PSD = Format("psd", False)
XCF = Format("xcf", False)
PDF = Format("pdf", False, image=False)
ZIP = Format("zip", False, image=False)
GZIP = Format("gzip", False, image=False)
HTML = Format("html", False, image=False)
XML = Format("xml", False, image=False)
JSON = Format("json", False, image=False)

_PREFIXES: tuple[tuple[bytes, Format], ...] = (
    (b"\xff\xd8\xff", JPEG),
    (b"\x89PNG\r\n\x1a\n", PNG),
    (b"GIF87a", GIF),
    (b"GIF89a", GIF),
    (b"II*\x00", TIFF),
    (b"MM\x00*", TIFF),
    (b"II+\x00", TIFF),  # BigTIFF
    (b"MM\x00+", TIFF),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", JPEG2000),
    (b"\xff\x4f\xff\x51", JPEG2000),  # raw J2K codestream
    (b"v/1\x01", OPENEXR),
    (b"#?RADIANCE", RADIANCE_HDR),
    (b"#?RGBE", RADIANCE_HDR),
    (b"\x59\xa6\x6a\x95", SUN_RASTER),
    (b"\xff\x0a", JPEG_XL),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", JPEG_XL),
    (b"qoif", QOI),
    (b"8BPS", PSD),
    (b"gimp xcf", XCF),
    (b"%PDF-", PDF),
    (b"PK\x03\x04", ZIP),
    (b"\x1f\x8b", GZIP),
    (b"\x00\x00\x01\x00", ICO),
)

_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


# An object's first key or end, or an array's first value or end: "[" alone also starts a
# TOML or INI section ("[build-system]"), which is plain text, not JSON.
_JSON_START = re.compile(rb'\{\s*["}]|\[[\s\[]*(?:[{"\-0-9\]]|true|false|null)')


def sniff(data: Buffer) -> Format | None:
    """Return the format the bytes start with, or None when they match no known signature."""
    head = bytes(memoryview(data)[:64])
    for prefix, fmt in _PREFIXES:
        if head.startswith(prefix):
            return fmt
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith(b"BM") and len(head) >= 14:
        return BMP
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return PNM
    if head[:2] in (b"PF", b"Pf") and head[2:3].isspace():
        return PFM
    if head[4:8] == b"ftyp":
        # libavif takes a file whose major brand or any compatible brand is AVIF's: a HEIF
        # container ("mif1") that holds AV1 images says so among its compatible brands.
        size = int.from_bytes(head[:4], "big")
        box = bytes(memoryview(data)[: min(max(size, 16), 4096)])
        brands = {box[8:12]} | {box[i : i + 4] for i in range(16, len(box) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return AVIF
        if brands & _HEIF_BRANDS:
            return HEIC
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")):
        return SVG if b"<svg" in bytes(memoryview(data)[:4096]).lower() else XML
    if text.startswith((b"<!doctype html", b"<html")):
        return HTML
    if _JSON_START.match(text):
        return JSON
    return None

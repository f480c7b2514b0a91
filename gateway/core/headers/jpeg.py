"""JPEG: the size in the SOF segment, and the scans of a progressive JPEG."""

from __future__ import annotations

import re

from gateway.core.headers.bounds import _SCAN_LIMIT, _Budget, _dims, _int
from gateway.core.headers.declared import Dimensions, HeaderError

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

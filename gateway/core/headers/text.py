"""Text headers: PNM, PAM, PFM, Radiance HDR."""

from __future__ import annotations

import re
from dataclasses import replace

from gateway.core.headers.bounds import _Budget, _dims
from gateway.core.headers.declared import Dimensions, HeaderError

# Text headers are read from this prefix only. Real ones take a few hundred bytes, and matching
# many short comments costs far more a byte than a binary walk.
_TEXT_LIMIT = 1 << 16
# Numbers in text headers; more digits than this is not a real image size.
_MAX_DIGITS = 18


def _number(token: bytes) -> int:
    # int() would also take "+2", " 2", "1_000" and non-ASCII digits; bytes.isdigit() is ASCII.
    if not token.isdigit() or len(token) > _MAX_DIGITS:
        raise HeaderError(f"{token[:20]!r} is not a number")
    return int(token)


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

"""AVIF: the sizes its ispe properties, grid items and track headers state, and the frame sizes
the AV1 sequence headers in its data declare, read with an AV1 bit reader of its own."""

from __future__ import annotations

import bisect
import re
from collections.abc import Collection, Iterator

from gateway.core.headers.bounds import _Budget, _dims, _int
from gateway.core.headers.boxes import _boxes
from gateway.core.headers.declared import Dimensions, HeaderError

# The boxes walked into, to reach ispe and av1C properties (meta/iprp/ipco), image items
# (meta/iinf, meta/iloc, meta/idat) and tracks (moov/trak).
_AVIF_CONTAINERS = frozenset({b"meta", b"meta/iprp", b"meta/iprp/ipco", b"moov"})
# Within a track, the boxes walked into to reach its header (tkhd) and sample table
# (mdia/minf/stbl).
_AVIF_TRACK_CONTAINERS = frozenset({b"mdia", b"mdia/minf", b"mdia/minf/stbl"})
# The size of a VisualSampleEntry's own fields, before the boxes it holds (av1C).
_AVIF_VISUAL_SAMPLE_ENTRY = 78
# The item types whose data the decoder sizes an image by: an AV1 image, a grid of them.
_AVIF_AV1, _AVIF_GRID = b"av01", b"grid"


def _avif(view: memoryview) -> Dimensions:
    if bytes(view[4:8]) != b"ftyp":
        raise HeaderError("no ftyp box")
    budget = _Budget()
    boxes = _avif_boxes(view, 0, len(view), b"", _AVIF_CONTAINERS, budget)
    sizes = [_avif_ispe(view, start) for start, _ in boxes.get(b"meta/iprp/ipco/ispe", [])]
    if not sizes:
        raise HeaderError("no ispe property")
    # libavif sizes a grid image from the grid item's own fields and an image sequence from its
    # track header, and libaom allocates the frame an AV1 sequence header declares, whatever the
    # ispe properties say.
    sizes += _avif_items(view, boxes, budget)
    for start, end in boxes.get(b"meta/iprp/ipco/av1C", []):
        # Four bytes of fields, then any number of OBUs (a copy of the sequence header, say).
        if end - start < 4:
            raise HeaderError("an av1C box is truncated")
        sizes += _av1_frame_sizes(_Stream(view, [(start + 4, end - start - 4)]), budget)
    for start, end in boxes.get(b"moov/trak", []):
        sizes += _avif_track(view, start, end, budget)
    return _dims(max(w for w, _ in sizes), max(h for _, h in sizes))


def _avif_boxes(
    view: memoryview,
    start: int,
    end: int,
    parent: bytes,
    containers: frozenset[bytes],
    budget: _Budget,
) -> dict[bytes, list[tuple[int, int]]]:
    """Payload ranges of the boxes met on the way into `containers`, by path ("meta/iinf")."""
    found: dict[bytes, list[tuple[int, int]]] = {}
    for kind, payload, box_end in _boxes(view, start, end, budget):
        path = parent + kind
        found.setdefault(path, []).append((payload, box_end))
        if path in containers:
            if kind == b"meta":  # a full box: version and flags come first
                payload += 4
            inner = _avif_boxes(view, payload, box_end, path + b"/", containers, budget)
            for sub, ranges in inner.items():
                found.setdefault(sub, []).extend(ranges)
    return found


def _avif_ispe(view: memoryview, start: int) -> tuple[int, int]:
    return _int(view, start + 4, 4), _int(view, start + 8, 4)  # after version and flags


def _avif_tkhd(view: memoryview, start: int, end: int) -> tuple[int, int]:
    # Width and height as 16.16 fixed point, after fields whose size depends on the version.
    at = start + (88 if _int(view, start, 1) == 1 else 76)
    if at + 8 > end:
        raise HeaderError("a tkhd box is truncated")
    return _int(view, at, 4) >> 16, _int(view, at + 4, 4) >> 16


def _avif_track(view: memoryview, start: int, end: int, budget: _Budget) -> list[tuple[int, int]]:
    """The sizes a track states: its header's, and the frames the AV1 sequence headers in its
    sample entries' av1C and in its first sample (an image sequence's first frame) declare.

    libavif decodes a track whose sample entry is av01 (the image sequence of an "avis" file),
    its samples laid out by the sample table: the first chunk's offset (stco or co64, in order)
    and a size every sample has, or the first sample's own (stsz).
    """
    boxes = _avif_boxes(view, start, end, b"", _AVIF_TRACK_CONTAINERS, budget)
    sizes = [_avif_tkhd(view, tkhd, tkhd_end) for tkhd, tkhd_end in boxes.get(b"tkhd", [])]
    av1 = False
    for stsd, stsd_end in boxes.get(b"mdia/minf/stbl/stsd", []):
        for kind, entry, entry_end in _boxes(view, stsd + 8, stsd_end, budget):  # after count
            if kind != _AVIF_AV1:
                continue
            av1 = True
            children = entry + _AVIF_VISUAL_SAMPLE_ENTRY
            if children > entry_end:
                raise HeaderError("an av01 sample entry is truncated")
            for child, payload, child_end in _boxes(view, children, entry_end, budget):
                if child == b"av1C":
                    if child_end - payload < 4:
                        raise HeaderError("an av1C box is truncated")
                    config = _Stream(view, [(payload + 4, child_end - payload - 4)])
                    sizes += _av1_frame_sizes(config, budget)
    chunks = [  # (chunk offset box, the size of an offset), in the order libavif reads them
        (box, 8 if kind == b"co64" else 4)
        for kind in (b"stco", b"co64")
        for box, _ in boxes.get(b"mdia/minf/stbl/" + kind, [])
    ]
    chunks.sort()
    first = next(((at, size) for at, size in chunks if _int(view, at + 4, 4)), None)
    if not av1 or first is None:
        return sizes  # libavif decodes no sample of this track
    offset = _int(view, first[0] + 8, first[1])
    length = None
    for stsz, _ in boxes.get(b"mdia/minf/stbl/stsz", []):
        every, count = _int(view, stsz + 4, 4), _int(view, stsz + 8, 4)
        if every:
            length = every  # the last such box sets it for every sample
        elif count and length is None:
            length = _int(view, stsz + 12, 4)
    if length is None:
        raise HeaderError("a track's first sample has no size")
    found = _av1_frame_sizes(_Stream(view, [(offset, length)]), budget)
    if not found:
        raise HeaderError("the first sample of an AV1 track has no sequence header")
    return sizes + found


def _avif_items(
    view: memoryview, boxes: dict[bytes, list[tuple[int, int]]], budget: _Budget
) -> list[tuple[int, int]]:
    """Output sizes of the grid items, and the frame sizes the AV1 items' data declares."""
    for path in (b"meta", b"meta/iinf", b"meta/iloc", b"meta/idat"):
        if len(boxes.get(path, [])) > 1:
            raise HeaderError(f"more than one {path.decode()} box")
    if b"meta/iinf" not in boxes:
        return []
    types = _avif_item_types(view, *boxes[b"meta/iinf"][0], budget)
    if not types:
        return []
    if b"meta/iloc" not in boxes:
        raise HeaderError("image items but no iloc box")
    idat = boxes[b"meta/idat"][0] if b"meta/idat" in boxes else None
    sizes = []
    for item, method, extents in _avif_locations(view, *boxes[b"meta/iloc"][0], types, budget):
        if method == 0:  # offsets into the file
            source = (0, len(view))
        elif method == 1 and idat is not None:  # offsets into the idat box
            source = idat
        else:
            raise HeaderError(f"item {item} is stored in a way this reader does not follow")
        data = _Stream.of_extents(view, source, extents)
        if types[item] == _AVIF_GRID:
            # version, flags, rows - 1, columns - 1, then 16-bit sizes, or 32-bit if flags & 1
            head = data.read(0, 12)
            size = 4 if len(head) > 1 and head[1] & 1 else 2
            if len(head) < 4 + 2 * size:
                raise HeaderError(f"grid item {item} is truncated")
            sizes.append((_int(head, 4, size), _int(head, 4 + size, size)))
        else:
            found = _av1_frame_sizes(data, budget)
            if not found:
                raise HeaderError(f"the AV1 data of item {item} has no sequence header")
            sizes += found
    return sizes


def _avif_item_types(view: memoryview, start: int, end: int, budget: _Budget) -> dict[int, bytes]:
    """The AV1 and grid items listed in an iinf box: their IDs and types."""
    version = _int(view, start, 1)
    entries = start + (6 if version == 0 else 8)  # after version, flags and the entry count
    types, seen = {}, set()
    for kind, payload, _ in _boxes(view, entries, end, budget):
        if kind != b"infe" or _int(view, payload, 1) < 2:  # item types came with version 2
            continue
        id_size = 2 if _int(view, payload, 1) == 2 else 4
        item = _int(view, payload + 4, id_size)
        item_type = bytes(view[payload + 6 + id_size : payload + 10 + id_size])
        if item in seen:
            raise HeaderError(f"item {item} is listed twice")
        seen.add(item)
        if item_type in (_AVIF_AV1, _AVIF_GRID):
            types[item] = item_type
    return types


def _avif_locations(
    view: memoryview, start: int, end: int, items: Collection[int], budget: _Budget
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(item, construction method, [(offset, length)] of its extents) of each of `items`, from
    iloc."""
    version = _int(view, start, 1)
    if version > 2:
        raise HeaderError(f"iloc version {version}")
    sizes = _int(view, start + 4, 2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 15
    base_size, index_size = (sizes >> 4) & 15, sizes & 15 if version else 0
    if any(size not in (0, 4, 8) for size in (offset_size, length_size, base_size, index_size)):
        raise HeaderError("iloc field sizes other than 0, 4 or 8")
    id_size = 4 if version == 2 else 2
    count, pos = _int(view, start + 6, id_size), start + 6 + id_size
    remaining = set(items)
    for _ in range(count):
        budget.spend()
        item, pos = _int(view, pos, id_size), pos + id_size
        method = 0
        if version:
            method, pos = _int(view, pos, 2) & 15, pos + 2
        pos += 2  # data reference index
        base, pos = _int(view, pos, base_size), pos + base_size
        extents, pos = _int(view, pos, 2), pos + 2
        if item in items:
            if item not in remaining:
                raise HeaderError(f"item {item} has two locations")
            remaining.discard(item)
            if extents == 0:
                raise HeaderError(f"item {item} has no data")
            found = []
            for _ in range(extents):
                budget.spend()
                pos += index_size
                offset, pos = _int(view, pos, offset_size), pos + offset_size
                length, pos = _int(view, pos, length_size), pos + length_size
                found.append((base + offset, length))
            yield item, method, found
        else:
            pos += extents * (index_size + offset_size + length_size)
        if pos > end:
            raise HeaderError("the iloc box is truncated")
    if remaining:
        raise HeaderError(f"item {min(remaining)} has no location")


class _Stream:
    """Ranges of the data read as one run of bytes: an item's data, which may be in pieces."""

    def __init__(self, view: memoryview, ranges: list[tuple[int, int]]) -> None:
        self.view = view
        self.starts: list[int] = []  # where each range starts in the view
        self.ends: list[int] = []  # where each range ends in the run
        self.length = 0
        for start, length in ranges:
            if start < 0 or length < 0 or start + length > len(view):
                raise HeaderError("data lies outside the file")
            if length:
                self.starts.append(start)
                self.length += length
                self.ends.append(self.length)

    @classmethod
    def of_extents(
        cls, view: memoryview, source: tuple[int, int], extents: list[tuple[int, int]]
    ) -> _Stream:
        """An item's extents, (offset, length) into view[source[0]:source[1]], joined in order
        as libavif joins them (a length of 0 is no data)."""
        start, end = source
        if any(start + offset + length > end for offset, length in extents):
            raise HeaderError("item data lies outside its file or idat box")
        return cls(view, [(start + offset, length) for offset, length in extents])

    def _locate(self, pos: int) -> tuple[int, int]:
        """The range that holds byte pos of the run (len(ranges) past the end), and where in
        the view that byte is."""
        index = bisect.bisect_right(self.ends, pos)
        if index == len(self.ends):
            return index, len(self.view)
        return index, self.starts[index] + pos - (self.ends[index - 1] if index else 0)

    def read(self, pos: int, size: int) -> memoryview:
        """Up to `size` bytes from pos: fewer at the end of the run."""
        index, at = self._locate(pos)
        if index < len(self.ends) and pos + size <= self.ends[index]:
            return self.view[at : at + size]  # within one range: no copy
        out = bytearray()
        while len(out) < size and index < len(self.ends):
            take = min(size - len(out), self.ends[index] - pos)
            out += self.view[at : at + take]
            pos += take
            index += 1
            at = self.starts[index] if index < len(self.ends) else len(self.view)
        return memoryview(out)

    def skip_zeros(self, pos: int, budget: _Budget) -> int:
        """The position of the first byte other than 0 from pos on, or the end of the run.
        Every _ZEROS_A_STEP bytes passed cost one more step of the budget."""
        index, at = self._locate(pos)
        while index < len(self.ends):
            end = min(at + self.ends[index] - pos, at + _ZEROS_A_STEP * (budget.left + 1))
            found = _NONZERO.search(self.view, at, end)
            stop = end if found is None else found.start()
            budget.spend(1 + (stop - at) // _ZEROS_A_STEP)
            if found is not None:
                return pos + stop - at
            pos = self.ends[index]
            index += 1
            at = self.starts[index] if index < len(self.ends) else len(self.view)
        return self.length


_NONZERO = re.compile(rb"[^\x00]")
_ZEROS_A_STEP = 64

# AV1 -------------------------------------------------------------------------------------------

_AV1_SEQUENCE_HEADER = 1
# Enough of a sequence header OBU to reach the frame size, whatever comes before it: 32
# operating points with every optional field take 3,076 bits.
_AV1_SEQUENCE_HEADER_PREFIX = 512


def _av1_frame_sizes(data: _Stream, budget: _Budget) -> list[tuple[int, int]]:
    """The largest frame size of each sequence header among the OBUs of an AV1 stream.

    The OBUs are walked as libaom reads them (with their size fields, which it requires), up to
    the end of the data: a sequence header anywhere before a frame sizes that frame.
    """
    sizes = []
    pos = 0
    while pos < data.length:
        budget.spend()
        head = data.read(pos, 10)  # the header, its extension, a size of up to 8 bytes
        if head[0] == 0:  # libaom skips zero bytes after a frame
            pos = data.skip_zeros(pos, budget)
            continue
        if head[0] & 0x80:
            raise HeaderError("an AV1 OBU has its forbidden bit set")
        if not head[0] & 2:
            raise HeaderError("an AV1 OBU has no size field")
        kind, at = (head[0] >> 3) & 15, 2 if head[0] & 4 else 1
        size = 0
        for i in range(8):  # LEB128, at most 8 bytes
            if at >= len(head):
                raise HeaderError("an AV1 OBU header is truncated")
            byte, at = head[at], at + 1
            size |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        else:
            raise HeaderError("an AV1 OBU size is longer than 8 bytes")
        pos += at
        if pos + size > data.length:
            raise HeaderError("an AV1 OBU runs past the end of its data")
        if kind == _AV1_SEQUENCE_HEADER:
            budget.spend(3)  # reading its bits costs about as much as three structures
            body = data.read(pos, min(size, _AV1_SEQUENCE_HEADER_PREFIX))
            sizes.append(_av1_sequence_header(_Bits(body), budget))
        pos += size
    return sizes


def _av1_sequence_header(bits: _Bits, budget: _Budget) -> tuple[int, int]:
    """max_frame_width and max_frame_height of a sequence header OBU (AV1 5.5.1)."""
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)  # seq_level_idx
    else:
        decoder_model, delay_bits = 0, 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(64)  # num_units_in_display_tick, time_scale
            if bits.read(1):  # equal_picture_interval: num_ticks_per_picture_minus_1, uvlc()
                zeros = 0
                while not bits.read(1):
                    zeros += 1
                    if zeros == 32:  # libaom refuses the value this would make
                        raise HeaderError("an AV1 uvlc() value of 32 bits or more")
                bits.read(zeros)
            decoder_model = bits.read(1)
            if decoder_model:  # decoder_model_info()
                delay_bits = bits.read(5) + 1  # buffer_delay_length_minus_1
                bits.read(32 + 5 + 5)
        display_model = bits.read(1)  # initial_display_delay_present_flag
        for _ in range(bits.read(5) + 1):  # operating_points_cnt_minus_1
            budget.spend(2)
            bits.read(12)  # operating_point_idc
            if bits.read(5) > 7:  # seq_level_idx, then seq_tier
                bits.read(1)
            if decoder_model and bits.read(1):  # operating_parameters_info()
                bits.read(2 * delay_bits + 1)
            if display_model and bits.read(1):
                bits.read(4)  # initial_display_delay_minus_1
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1


class _Bits:
    """The bits of a few bytes, read from the most significant one on."""

    def __init__(self, data: memoryview) -> None:
        self.value = int.from_bytes(data, "big")
        self.left = 8 * len(data)

    def read(self, count: int) -> int:
        if count > self.left:
            raise HeaderError("an AV1 sequence header is truncated")
        self.left -= count
        return (self.value >> self.left) & ((1 << count) - 1)

"""TIFFs whose channels are stored in separate planes decode to the same pixels as their
interleaved twins, or are refused: never to memory the decoder did not write.

OpenCV (4.14.0 and 5.0.0 at least) reads separate planes deeper than 8 bits as interleaved
samples in `unchanged` mode, and fills the rest of the image from whatever memory it gets,
another request's pixels included. The images are built here so that each has an interleaved twin
holding the same pixels.
"""

from __future__ import annotations

import struct

import cv2
import grpc
import numpy as np
import pytest

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.errors import ErrorCode
from tests.wire import grpc_code, grpc_result, post_octet

_SHORT, _LONG = 3, 4
_MODES = {
    "color": pb.COLOR_MODE_COLOR,
    "grayscale": pb.COLOR_MODE_GRAYSCALE,
    "unchanged": pb.COLOR_MODE_UNCHANGED,
}


def tiff(pixels: np.ndarray, separate: bool, tile: int | None = None) -> bytes:
    """A little-endian, uncompressed TIFF of `pixels` (height, width, samples), RGB or RGBA,
    its samples interleaved or in separate planes, in strips of 3 rows or in square tiles."""
    height, width, samples = pixels.shape
    planes = [pixels[:, :, i] for i in range(samples)] if separate else [pixels]
    blocks: list[bytes] = []
    for plane in planes:
        if tile is None:
            blocks += [plane[row : row + 3].tobytes() for row in range(0, height, 3)]
            continue
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                block = np.zeros((tile, tile, *plane.shape[2:]), plane.dtype)
                part = plane[top : top + tile, left : left + tile]
                block[: part.shape[0], : part.shape[1]] = part
                blocks.append(block.tobytes())
    data = b"".join(blocks)
    offsets = [8 + sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    bits = pixels.dtype.itemsize * 8
    sample_format = 3 if pixels.dtype.kind == "f" else 1
    entries: list[tuple[int, int, list[int]]] = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [bits] * samples),
        (259, _SHORT, [1]),
        (262, _SHORT, [2]),
        (277, _SHORT, [samples]),
        (284, _SHORT, [2 if separate else 1]),
        (339, _SHORT, [sample_format] * samples),
    ]
    if samples == 4:
        entries.append((338, _SHORT, [2]))  # unassociated alpha
    if tile is None:
        entries += [
            (273, _LONG, offsets),
            (278, _LONG, [3]),
            (279, _LONG, [len(b) for b in blocks]),
        ]
    else:
        entries += [
            (322, _LONG, [tile]),
            (323, _LONG, [tile]),
            (324, _LONG, offsets),
            (325, _LONG, [len(b) for b in blocks]),
        ]
    # Arrays longer than an entry's 4 bytes go after the data, the directory after them.
    arrays = b""
    fields = []
    for tag, kind, values in sorted(entries):
        packed = struct.pack(f"<{len(values)}{'H' if kind == _SHORT else 'I'}", *values)
        if len(packed) > 4:
            fields.append((tag, kind, len(values), struct.pack("<I", 8 + len(data) + len(arrays))))
            arrays += packed
        else:
            fields.append((tag, kind, len(values), packed.ljust(4, b"\0")))
    directory = struct.pack("<H", len(fields))
    directory += b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in fields) + bytes(4)
    return b"II*\0" + struct.pack("<I", 8 + len(data) + len(arrays)) + data + arrays + directory


def _pixels(dtype: str, samples: int) -> np.ndarray:
    rng = np.random.default_rng(samples)
    # Whole numbers, so that the spy model's integer checksum sees every float sample too.
    return rng.integers(1, 60000, size=(20, 18, samples)).astype(dtype)


def _checksums(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, data: bytes, mode: str
) -> tuple[object, object]:
    """What each protocol answered: the spy model's checksum, or the error code."""
    resp = post_octet(http_url, "spy", data, params={"color_mode": mode})
    http = resp.json()["result"]["output"]["checksum"] if resp.ok else resp.json()["error"]["code"]
    request = pb.InferRequest(model="spy", image=pb.Image(data=data), color_mode=_MODES[mode])
    try:
        rpc: object = grpc_result(stub.Infer(request, timeout=10).result)["output"]["checksum"]
    except grpc.RpcError as exc:
        code, error = grpc_code(exc)
        rpc = error
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error)
    if not resp.ok:
        assert resp.status_code == ErrorCode.UNDECODABLE_IMAGE.http_status, resp.text
    return http, rpc


def _opencv_decodes_right(separate: bytes, interleaved: bytes) -> bool:
    """Whether the OpenCV these tests run with gives the same pixels for both."""
    a, b = (
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        for data in (separate, interleaved)
    )
    return a is not None and b is not None and a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("tile", [None, 16], ids=["strips", "tiles"])
@pytest.mark.parametrize(
    ("dtype", "samples"), [("<u2", 3), ("<u2", 4), ("<f4", 3), ("<f8", 3), ("<f8", 4)]
)
def test_deep_separate_planes_give_their_pixels_or_are_refused_in_unchanged_mode(
    http_url: str,
    stub: pb_grpc.ImageGatewayServiceStub,
    dtype: str,
    samples: int,
    tile: int | None,
) -> None:
    pixels = _pixels(dtype, samples)
    separate, interleaved = tiff(pixels, True, tile), tiff(pixels, False, tile)
    twin = _checksums(http_url, stub, interleaved, "unchanged")
    assert twin[0] == twin[1] == int(pixels.astype(np.uint64).sum())
    got = _checksums(http_url, stub, separate, "unchanged")
    # Where OpenCV misreads the planes it must be refused; where it reads them, decoded.
    if _opencv_decodes_right(separate, interleaved):
        assert got == twin
    else:
        assert got == (ErrorCode.UNDECODABLE_IMAGE.code,) * 2
        resp = post_octet(http_url, "spy", separate, params={"color_mode": "unchanged"})
        assert "separate planes" in resp.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["color", "grayscale"])
def test_deep_separate_planes_decode_in_color_and_grayscale(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, mode: str
) -> None:
    pixels = _pixels("<u2", 3)
    separate = _checksums(http_url, stub, tiff(pixels, True), mode)
    assert separate == _checksums(http_url, stub, tiff(pixels, False), mode)
    assert isinstance(separate[0], int)


def test_8_bit_separate_planes_decode_in_unchanged_mode(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    pixels = _pixels("<u2", 3).astype(np.uint8)
    separate = _checksums(http_url, stub, tiff(pixels, True), "unchanged")
    assert separate == _checksums(http_url, stub, tiff(pixels, False), "unchanged")
    assert separate[0] == int(pixels.astype(np.uint64).sum())

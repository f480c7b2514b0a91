"""Animated PNGs: the first frame, as OpenCV returns it, and malformed ones that used to kill the
process inside OpenCV's animation reader are refused while the gateway goes on serving."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import requests

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.errors import ErrorCode
from tests.conftest import DATA
from tests.hostile import png_chunk
from tests.test_process import Served, launch
from tests.wire import grpc_code, grpc_result, post_octet

APNG = DATA / "apng"
_MODES = {"color": pb.COLOR_MODE_COLOR, "unchanged": pb.COLOR_MODE_UNCHANGED}
_FLAGS = {"color": cv2.IMREAD_COLOR, "unchanged": cv2.IMREAD_UNCHANGED}


def rgba_data(pixels: np.ndarray) -> bytes:
    """Zlib data of 8-bit RGBA rows, each with filter type 0."""
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    return zlib.compress(rows)


def frame_control(sequence: int, width: int, height: int, x: int, y: int) -> bytes:
    # 1/10 s delay, dispose none, blend over.
    return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, x, y, 1, 10, 0, 1))


def hidden_default_apng(frame: np.ndarray, at: tuple[int, int], size: tuple[int, int]) -> bytes:
    """An 8-bit RGBA APNG of `size` (width, height) whose default image (red) is not a frame,
    and whose first frame is `frame` at `at` (x, y); a second frame covers the image."""
    width, height = size
    red = np.zeros((height, width, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 255
    green = red[..., [1, 0, 2, 3]]
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
        + png_chunk(b"acTL", struct.pack(">II", 2, 0))
        + png_chunk(b"IDAT", rgba_data(red))
        + frame_control(0, frame.shape[1], frame.shape[0], *at)
        + png_chunk(b"fdAT", struct.pack(">I", 1) + rgba_data(frame))
        + frame_control(2, width, height, 0, 0)
        + png_chunk(b"fdAT", struct.pack(">I", 3) + rgba_data(green))
        + png_chunk(b"IEND", b"")
    )


def checksums(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, data: bytes, mode: str
) -> list[object]:
    """The spy model's checksum and the image size over each protocol, or the error code."""

    def seen(result: dict[str, Any]) -> tuple[int, int, int]:
        info = result["info"]
        return result["output"]["checksum"], info["width"], info["height"]

    out: list[object] = []
    resp = post_octet(http_url, "spy", data, params={"color_mode": mode})
    out.append(seen(resp.json()["result"]) if resp.ok else resp.json()["error"]["code"])
    request = pb.InferRequest(model="spy", image=pb.Image(data=data), color_mode=_MODES[mode])
    try:
        out.append(seen(grpc_result(stub.Infer(request, timeout=10).result)))
    except grpc.RpcError as exc:
        out.append(grpc_code(exc)[1])
    return out


def local(data: bytes, mode: str) -> tuple[int, int, int]:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS[mode])
    assert array is not None
    return int(array.astype(np.uint64).sum()), array.shape[1], array.shape[0]


@pytest.mark.parametrize("mode", ["color", "unchanged"])
@pytest.mark.parametrize("name", ["delay_hidden_default.png", "mode_16bit.png"])
def test_an_animated_png_gives_the_first_frame_opencv_gives(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, name: str, mode: str
) -> None:
    # OpenCV's own animation reader is safe on a well-formed file: it is the reference.
    data = (APNG / name).read_bytes()
    assert checksums(http_url, stub, data, mode) == [local(data, mode)] * 2


def test_a_first_frame_smaller_than_the_image_is_placed_on_a_transparent_canvas(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    blue = np.zeros((4, 8, 4), np.uint8)
    blue[..., 2], blue[..., 3] = 255, 200
    data = hidden_default_apng(blue, (3, 2), (20, 10))
    expected = np.zeros((10, 20, 4), np.uint8)
    expected[2:6, 3:11] = blue[..., [2, 1, 0, 3]]
    assert local(data, "unchanged") == (int(expected.astype(np.uint64).sum()), 20, 10)
    assert checksums(http_url, stub, data, "unchanged") == [local(data, "unchanged")] * 2


def malformed() -> Iterator[tuple[str, bytes]]:
    """Animated PNGs that OpenCV 5.0.0's animation reader dies on, or that are close to one."""
    delay = (APNG / "delay_hidden_default.png").read_bytes()
    second_control = delay.index(b"fcTL", delay.index(b"fcTL") + 4)
    for kind in (b"UcTL", b"zzzz"):
        yield (
            f"second fcTL renamed {kind.decode()}",
            delay[:second_control] + kind + delay[second_control + 4 :],
        )
    first_data = delay.index(b"fdAT") + 12
    yield "first frame data corrupt", delay[:first_data] + bytes(20) + delay[first_data + 20 :]
    blue = np.zeros((4, 8, 4), np.uint8)
    blue[..., 2] = 255
    good = hidden_default_apng(blue, (0, 0), (8, 4))
    first = good.index(b"fdAT") - 4
    yield (
        "unknown critical chunk in the first frame",
        (good[:first] + png_chunk(b"XXXX", b"1234") + good[first:]),
    )
    bad_filter = zlib.compress(b"\x07" + bytes(32) * 4)
    yield (
        "bad filter type in the first frame",
        good.replace(
            good[first : good.index(b"fcTL", first) - 4],
            png_chunk(b"fdAT", struct.pack(">I", 1) + bad_filter),
        ),
    )
    control = good.index(b"fcTL")
    yield (
        "first frame outside the image",
        (good[: control - 4] + frame_control(0, 8, 4, 1, 0) + good[control + 30 :]),
    )
    yield (
        "frame control chunk cut short",
        (good[: control - 4] + png_chunk(b"fcTL", bytes(20)) + good[control + 30 :]),
    )


MALFORMED = list(malformed())


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A gateway process of its own: a decoder that kills its process must not take pytest."""
    served = launch(
        tmp_path_factory.mktemp("apng"),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--workers",
        "1",
    )
    yield served
    served.proc.kill()
    served.proc.wait()


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=[name for name, _ in MALFORMED])
def test_a_malformed_animated_png_gets_an_answer_and_the_gateway_goes_on(
    own_gateway: Served, name: str, data: bytes
) -> None:
    for mode in ("color", "grayscale", "unchanged"):
        resp = requests.post(
            f"{own_gateway.http_url}/v1/infer",
            params={"color_mode": mode},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=10,
        )
        assert resp.status_code in (200, ErrorCode.UNDECODABLE_IMAGE.http_status), resp.text
        if not resp.ok:
            assert resp.json()["error"]["code"] == ErrorCode.UNDECODABLE_IMAGE.code
    with grpc.insecure_channel(own_gateway.grpc_target) as channel:
        stub = pb_grpc.ImageGatewayServiceStub(channel)
        try:
            stub.Infer(pb.InferRequest(image=pb.Image(data=data)), timeout=10)
        except grpc.RpcError as exc:
            assert grpc_code(exc) == (grpc.StatusCode.INVALID_ARGUMENT, "undecodable_image")
        png = (DATA / "images" / "hopper.png").read_bytes()
        reply = stub.Infer(pb.InferRequest(image=pb.Image(data=png)), timeout=10)
        assert grpc_result(reply.result)["output"] == [128, 128, 3]
    assert own_gateway.proc.poll() is None

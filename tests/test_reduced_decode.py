"""A model that declares `min_input_size` gets JPEGs decoded at 1/2, 1/4 or 1/8 scale.

The expected scale is found here by decoding locally with each of OpenCV's reduced flags and
keeping the smallest result that still covers the model's 50x40, independently of how the
gateway computes it from the header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.models.base import JSONValue
from gateway.models.registry import ModelRegistry
from tests.conftest import DATA, IMAGES
from tests.wire import grpc_code, post_octet

MODEL = "small-input"
MIN_WIDTH, MIN_HEIGHT = 50, 40
JPEGS = [p for p in IMAGES if p.suffix == ".jpg"]
REDUCED = {
    "color": (
        cv2.IMREAD_COLOR,
        [cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_COLOR_2],
    ),
    "grayscale": (
        cv2.IMREAD_GRAYSCALE,
        [
            cv2.IMREAD_REDUCED_GRAYSCALE_8,
            cv2.IMREAD_REDUCED_GRAYSCALE_4,
            cv2.IMREAD_REDUCED_GRAYSCALE_2,
        ],
    ),
}
GRPC_MODES = {
    "color": pb.COLOR_MODE_COLOR,
    "grayscale": pb.COLOR_MODE_GRAYSCALE,
    "unchanged": pb.COLOR_MODE_UNCHANGED,
}


def local(data: bytes, flags: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    assert image is not None
    return image


def expected(data: bytes, mode: str) -> np.ndarray:
    """The smallest reduced decode covering 50x40, else the full decode."""
    if mode == "unchanged":
        return local(data, cv2.IMREAD_UNCHANGED)
    full, reduced = REDUCED[mode]
    for flags in reduced:
        image = local(data, flags)
        if image.shape[1] >= MIN_WIDTH and image.shape[0] >= MIN_HEIGHT:
            return image
    return local(data, full)


def report(image: np.ndarray) -> dict[str, object]:
    return {"shape": list(image.shape), "checksum": int(image.astype(np.uint64).sum())}


def test_the_test_images_cover_every_scale() -> None:
    # Otherwise the cases below would not show each of 1/8, 1/4, 1/2 and a full decode.
    scales = set()
    for p in JPEGS:
        full = local(p.read_bytes(), cv2.IMREAD_COLOR).shape[1]
        got = expected(p.read_bytes(), "color").shape[1]
        scales |= {k for k in (1, 2, 4, 8) if -(-full // k) == got}
    assert {1, 2, 4, 8} <= scales


@pytest.mark.parametrize("mode", ["color", "grayscale", "unchanged"])
@pytest.mark.parametrize("path", JPEGS, ids=[p.name for p in JPEGS])
def test_jpeg_reaches_the_model_reduced_over_both_protocols(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, path: Path, mode: str
) -> None:
    data = path.read_bytes()
    want = report(expected(data, mode))
    full = local(data, cv2.IMREAD_UNCHANGED if mode == "unchanged" else cv2.IMREAD_COLOR)
    http = post_octet(http_url, MODEL, data, params={"color_mode": mode}).json()["result"]
    assert http["output"] == want
    # The info describes the image as sent, whatever size the model got.
    assert (http["info"]["width"], http["info"]["height"]) == (full.shape[1], full.shape[0])
    reply = stub.Infer(
        pb.InferRequest(model=MODEL, image=pb.Image(data=data), color_mode=GRPC_MODES[mode]),
        timeout=30,
    )
    grpc_output = {k: v for k, v in reply.result.output.struct_value.items()}
    assert grpc_output["shape"] == want["shape"]
    assert grpc_output["checksum"] == want["checksum"]
    assert (reply.result.info.width, reply.result.info.height) == (full.shape[1], full.shape[0])


@pytest.mark.parametrize("name", ["hopper.png", "hopper.avif", "sdl_sample.bmp"])
def test_other_formats_decode_whole(http_url: str, name: str) -> None:
    # OpenCV only resizes after a full decode for these: no gain, so no reduction.
    data = (DATA / "images" / name).read_bytes()
    got = post_octet(http_url, MODEL, data).json()["result"]["output"]
    assert got == report(local(data, cv2.IMREAD_COLOR))


def test_a_truncated_jpeg_fails_alone_when_reduced(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    data = (DATA / "images" / "rocket.jpg").read_bytes()
    cut = data[: len(data) // 3]
    resp = post_octet(http_url, MODEL, cut)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "undecodable_image"
    with pytest.raises(Exception) as caught:
        stub.Infer(pb.InferRequest(model=MODEL, image=pb.Image(data=cut)), timeout=30)
    assert grpc_code(caught.value)[1] == "undecodable_image"
    assert post_octet(http_url, MODEL, data).status_code == 200


class _Declares:
    description = "declares min_input_size"

    def __init__(self, size: object) -> None:
        self.name = f"declares-{size!r}"
        self.min_input_size = size

    def predict(
        self, images: Sequence[np.ndarray], params: Mapping[str, Any]
    ) -> Sequence[JSONValue]:
        return []


@pytest.mark.parametrize("size", ["big", (0, 10), (10,), (1.5, 2), (True, 2), [64, 64, 3]])
def test_a_malformed_min_input_size_fails_at_start(size: object) -> None:
    with pytest.raises(ValueError, match="min_input_size"):
        ModelRegistry([_Declares(size)])


def test_a_well_formed_min_input_size_is_accepted() -> None:
    assert ModelRegistry([_Declares((224, 224)), _Declares([32, 16]), _Declares(None)])


def test_model_listings_give_the_declared_size(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    http = {
        m["name"]: m for m in requests.get(f"{http_url}/v1/models", timeout=10).json()["models"]
    }
    assert http[MODEL]["min_input_size"] == {"width": MIN_WIDTH, "height": MIN_HEIGHT}
    assert http["shape"]["min_input_size"] is None
    one = requests.get(f"{http_url}/v1/models/{MODEL}", timeout=10).json()
    assert one["min_input_size"] == {"width": MIN_WIDTH, "height": MIN_HEIGHT}
    grpc_models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    size = grpc_models[MODEL].min_input_size
    assert (size.width, size.height) == (MIN_WIDTH, MIN_HEIGHT)
    assert not grpc_models["shape"].HasField("min_input_size")
    got = stub.GetModel(pb.GetModelRequest(name=MODEL), timeout=10).model.min_input_size
    assert (got.width, got.height) == (MIN_WIDTH, MIN_HEIGHT)


@pytest.mark.parametrize(
    "params",
    [
        [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
        [cv2.IMWRITE_JPEG_RST_INTERVAL, 4],
        [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
        [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422],
    ],
    ids=["progressive", "restart-markers", "4:4:4", "4:2:2"],
)
def test_jpeg_variants_reduce_as_opencv_does(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, params: list[int]
) -> None:
    photo = local((DATA / "images" / "rocket.jpg").read_bytes(), cv2.IMREAD_COLOR)
    ok, encoded = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    data = encoded.tobytes()
    want = report(expected(data, "color"))
    assert want["shape"] == [54, 80, 3]  # 1/8 of 640x427
    assert post_octet(http_url, MODEL, data).json()["result"]["output"] == want
    reply = stub.Infer(pb.InferRequest(model=MODEL, image=pb.Image(data=data)), timeout=30)
    assert reply.result.output.struct_value["checksum"] == want["checksum"]

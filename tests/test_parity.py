"""The same image gives the same result through every entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from tests.conftest import IMAGES
from tests.wire import grpc_result, post_multipart, post_octet

MODELS = ["shape", "qrcode", "spy", "small-input"]


def without_name(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "name"}


def all_entry_points(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, model: str, data: bytes
) -> dict[str, dict[str, Any]]:
    octet = post_octet(http_url, model, data)
    assert octet.status_code == 200, octet.text
    multipart = post_multipart(http_url, model, [data])
    assert multipart.status_code == 200, multipart.text
    image = pb.Image(data=data, name="0")
    infer = stub.Infer(pb.InferRequest(model=model, image=image), timeout=30)
    batch = stub.InferBatch(pb.InferBatchRequest(model=model, images=[image]), timeout=30)
    (streamed,) = list(
        stub.InferStream(iter([pb.InferStreamRequest(model=model, image=image)]), timeout=30)
    )
    return {
        "http octet-stream": without_name(octet.json()["result"]),
        "http multipart": without_name(multipart.json()["results"][0]),
        "grpc Infer": without_name(grpc_result(infer.result)),
        "grpc InferBatch": without_name(grpc_result(batch.results[0])),
        "grpc InferStream": without_name(grpc_result(streamed.result)),
    }


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_every_entry_point_agrees(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, model: str, path: Path
) -> None:
    results = all_entry_points(http_url, stub, model, path.read_bytes())
    reference = results["http octet-stream"]
    assert "output" in reference and "info" in reference
    for entry, result in results.items():
        assert result == reference, entry


def test_shape_output_is_numpy_shape_of_the_decoded_image(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    import cv2
    import numpy as np

    for path in IMAGES:
        data = path.read_bytes()
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        reference = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        assert reference is not None, path
        expected = list(reference.shape)
        assert post_octet(http_url, "shape", data).json()["result"]["output"] == expected


def test_batches_agree_with_single_calls(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    datas = [p.read_bytes() for p in IMAGES]
    singles = [without_name(post_octet(http_url, "spy", d).json()["result"]) for d in datas]
    http_batch = post_multipart(http_url, "spy", datas).json()["results"]
    grpc_batch = stub.InferBatch(
        pb.InferBatchRequest(
            model="spy", images=[pb.Image(data=d, name=str(i)) for i, d in enumerate(datas)]
        ),
        timeout=60,
    ).results
    assert [r["name"] for r in http_batch] == [str(i) for i in range(len(datas))]
    assert [without_name(r) for r in http_batch] == singles
    assert [without_name(grpc_result(r)) for r in grpc_batch] == singles

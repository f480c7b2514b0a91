"""Every hostile input gets its documented code over HTTP and gRPC, and the server goes on."""

from __future__ import annotations

import cv2
import grpc
import pytest
import requests

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.errors import ErrorCode
from tests.bombs import bomb
from tests.conftest import DATA
from tests.hostile import (
    BOUNDARY,
    MULTIPART_CASES,
    Case,
    MultipartCase,
    cases,
    file_part,
    multipart,
    text_part,
)
from tests.wire import grpc_code, grpc_result, post_octet

CASES = cases()
JPEG = (DATA / "images" / "rocket.jpg").read_bytes()
PNG = (DATA / "images" / "hopper.png").read_bytes()


def assert_still_serving(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    assert post_octet(http_url, "shape", PNG).json()["result"]["output"] == [128, 128, 3]
    reply = stub.Infer(pb.InferRequest(image=pb.Image(data=PNG)), timeout=10)
    assert grpc_result(reply.result)["output"] == [128, 128, 3]


# "small-input" (tests.models) may get a JPEG decoded at a reduced scale: the same answers.
@pytest.mark.parametrize("model", ["shape", "small-input"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_image(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, case: Case, model: str
) -> None:
    resp = post_octet(http_url, model, case.data)
    request = pb.InferRequest(model=model, image=pb.Image(data=case.data))
    if case.error is None:
        assert resp.status_code == 200, resp.text
        output = grpc_result(stub.Infer(request, timeout=10).result)["output"]
        if model == "shape":
            assert resp.json()["result"]["output"] == output == case.shape
    else:
        assert (resp.status_code, resp.json()["error"]["code"]) == (
            case.error.http_status,
            case.error.code,
        ), resp.text
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=10)
        assert grpc_code(info.value) == (grpc.StatusCode[case.error.grpc_status], case.error.code)
        if case.reason is not None:
            assert case.reason in resp.json()["error"]["message"], resp.text
            assert case.reason in (info.value.details() or ""), info.value.details()
    assert_still_serving(http_url, stub)


def test_all_hostile_images_in_one_batch_fail_only_themselves(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    small = [c for c in CASES if not c.name.startswith("bomb")]
    images = [PNG] + [c.data for c in small[:40]] + [JPEG]
    request = pb.InferBatchRequest(
        images=[pb.Image(data=d, name=str(i)) for i, d in enumerate(images)]
    )
    results = [grpc_result(r) for r in stub.InferBatch(request, timeout=30).results]
    assert results[0]["output"] == [128, 128, 3]
    assert results[-1]["output"] == [427, 640, 3]
    for case, result in zip(small[:40], results[1:-1], strict=True):
        if case.error is None:
            assert result["output"] == case.shape
        else:
            assert result["error"]["code"] == case.error.code, case.name


def test_lying_content_type_is_ignored(http_url: str) -> None:
    resp = requests.post(
        f"{http_url}/v1/infer", data=PNG, headers={"Content-Type": "image/jpeg"}, timeout=10
    )
    assert resp.json()["result"]["info"]["format"] == "png"


def test_request_pixel_budget(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    # Three 40-megapixel headers: each under the per-image limit, together over the request's.
    # Nothing is decoded: the headers alone refuse it.
    big = bomb("png", 8000, 5000)
    files = {str(i): (f"{i}.png", big) for i in range(3)}
    resp = requests.post(f"{http_url}/v1/infer", files=files, timeout=10)
    assert (resp.status_code, resp.json()["error"]["code"]) == (413, "too_many_pixels")
    with pytest.raises(grpc.RpcError) as info:
        stub.InferBatch(pb.InferBatchRequest(images=[pb.Image(data=big)] * 3), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_pixels")
    assert_still_serving(http_url, stub)


def test_too_many_images(http_url: str, stub: pb_grpc.ImageGatewayServiceStub) -> None:
    files = [(str(i), (f"{i}.png", PNG)) for i in range(65)]
    resp = requests.post(f"{http_url}/v1/infer", files=files, timeout=10)
    assert (resp.status_code, resp.json()["error"]["code"]) == (413, "too_many_images")
    with pytest.raises(grpc.RpcError) as info:
        stub.InferBatch(pb.InferBatchRequest(images=[pb.Image(data=PNG)] * 65), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_images")


def post_multipart_body(http_url: str, body: bytes, path: str = "/v1/infer") -> requests.Response:
    return requests.post(
        f"{http_url}{path}",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=10,
    )


@pytest.mark.parametrize("case", MULTIPART_CASES, ids=[c.name for c in MULTIPART_CASES])
def test_multipart_edge_cases(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, case: MultipartCase
) -> None:
    resp = post_multipart_body(http_url, case.body)
    assert (resp.status_code, resp.json()["error"]["code"]) == (
        case.error.http_status,
        case.error.code,
    )
    assert_still_serving(http_url, stub)


def test_multipart_defined_answers(http_url: str) -> None:
    # Non-index names keep the order sent; text fields are model parameters; an empty file
    # part fails only itself.
    body = multipart(
        [file_part("b", PNG), text_part("note", "hi"), file_part("a", JPEG), file_part("c", b"")]
    )
    results = post_multipart_body(http_url, body).json()["results"]
    assert [r["name"] for r in results] == ["b", "a", "c"]
    assert results[0]["output"] == [128, 128, 3]
    assert results[1]["output"] == [427, 640, 3]
    assert results[2]["error"]["code"] == "empty_image"
    spy = post_multipart_body(http_url, body, "/v1/models/spy/infer").json()
    assert [r["name"] for r in spy["results"]] == ["b", "a", "c"]


def test_non_index_names_are_not_sorted(http_url: str) -> None:
    # "\u0663" is a digit to Python's int(); to the gateway it is a name like any other.
    names = ["2", "\u0663", "1"]
    body = multipart([file_part(n, PNG) for n in names])
    results = post_multipart_body(http_url, body).json()["results"]
    assert [r["name"] for r in results] == names


def test_text_fields_reach_the_model_as_parameters(http_url: str) -> None:
    from tests.models import SPY

    before = len(SPY.calls)
    body = multipart([file_part("0", PNG), text_part("threshold", "0.5")])
    assert post_multipart_body(http_url, body, "/v1/models/spy/infer?x=1").status_code == 200
    assert SPY.calls[before]["params"] == {"x": "1", "threshold": "0.5"}


def test_every_error_code_is_reachable_and_documented() -> None:
    codes = {c.error.code for c in CASES if c.error}
    assert codes <= {e.code for e in ErrorCode}


def test_openexr_without_the_codec_is_an_unsupported_format(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # OpenEXR is optional in OpenCV's builds: without it, an OpenEXR image was answered as
    # corrupt (undecodable_image). A bomb is still refused for its size first.
    small = bomb("openexr", 10, 10)  # a header and no pixel data
    built_with = "OpenEXR: NO" not in " ".join(cv2.getBuildInformation().split())
    error = ErrorCode.UNDECODABLE_IMAGE if built_with else ErrorCode.UNSUPPORTED_FORMAT
    resp = post_octet(http_url, "shape", small)
    assert (resp.status_code, resp.json()["error"]["code"]) == (error.http_status, error.code)
    if not built_with:
        # Not offered as a format to send instead.
        assert "built without" in resp.json()["error"]["message"]
        assert "OpenEXR" not in resp.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(pb.InferRequest(image=pb.Image(data=small)), timeout=10)
    assert grpc_code(info.value) == (grpc.StatusCode.INVALID_ARGUMENT, error.code)
    assert post_octet(http_url, "shape", bomb("openexr", 30000, 30000)).status_code == 413

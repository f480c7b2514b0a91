"""The qrcode model finds codes made by OpenCV's own encoder, alone and inside a real photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from clients.client import GatewayClient
from gateway.serve import Gateway
from tests.conftest import DATA, IMAGES

PHOTO = DATA / "images" / "rocket.jpg"


def qr_image(text: str, module_px: int = 8) -> np.ndarray:
    code = cv2.QRCodeEncoder.create().encode(text)
    code = cv2.resize(code, None, fx=module_px, fy=module_px, interpolation=cv2.INTER_NEAREST)
    # The quiet zone of four modules that readers need.
    quiet = 4 * module_px
    return cv2.copyMakeBorder(code, quiet, quiet, quiet, quiet, cv2.BORDER_CONSTANT, value=255)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, gateway: Gateway) -> GatewayClient:
    url = gateway.http_url if request.param == "http" else f"grpc://{gateway.grpc_target}"
    return GatewayClient(url, model="qrcode")


def dark_box(code: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the code's dark modules: where its corners must be."""
    ys, xs = np.nonzero(code < 128)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def corners_match(
    points: list[list[float]], box: tuple[int, int, int, int], dx: int = 0, dy: int = 0
) -> bool:
    left, top, right, bottom = box
    expected = [
        [left + dx, top + dy],
        [right + dx, top + dy],
        [right + dx, bottom + dy],
        [left + dx, bottom + dy],
    ]
    return all(
        abs(p[0] - e[0]) <= 4 and abs(p[1] - e[1]) <= 4
        for p, e in zip(points, expected, strict=True)
    )


def test_clean_code(client: GatewayClient) -> None:
    image = qr_image("https://example.org/image-gateway")
    (found,) = client.infer(encode(image)).output
    assert found["text"] == "https://example.org/image-gateway"
    assert corners_match(found["points"], dark_box(image))


def test_code_pasted_into_a_photo(client: GatewayClient) -> None:
    photo = cv2.imdecode(np.frombuffer(PHOTO.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert photo is not None
    code = qr_image("pasted into a photo", module_px=5)
    x0, y0 = 400, 150
    h, w = code.shape
    photo[y0 : y0 + h, x0 : x0 + w] = cv2.cvtColor(code, cv2.COLOR_GRAY2BGR)
    for ext in (".png", ".jpg"):
        (found,) = client.infer(encode(photo, ext)).output
        assert found["text"] == "pasted into a photo"
        assert corners_match(found["points"], dark_box(code), x0, y0)


def test_two_codes_in_one_image(client: GatewayClient) -> None:
    a, b = qr_image("first"), qr_image("second")
    canvas = np.full((a.shape[0], a.shape[1] + b.shape[1] + 40), 255, np.uint8)
    canvas[:, : a.shape[1]] = a
    canvas[:, a.shape[1] + 40 :] = b
    texts = sorted(c["text"] for c in client.infer(encode(canvas)).output)
    assert texts == ["first", "second"]


def test_photos_without_a_code_give_an_empty_list(client: GatewayClient) -> None:
    photos = [p for p in IMAGES if p.suffix in (".jpg", ".png", ".webp")]
    results = client.infer_batch(photos)
    assert [r.output for r in results] == [[] for _ in photos]


@pytest.mark.parametrize("depth", ["16-bit", "float"])
def test_deep_images_in_unchanged_mode(client: GatewayClient, depth: str) -> None:
    # Stretched to 8 bits, darkest to black and lightest to white, whatever the depth's range.
    code = qr_image("deep pixels")
    if depth == "16-bit":
        data = encode((code.astype(np.uint16) * 200 + 1000).astype(np.uint16))
    else:
        data = encode(code.astype(np.float32) / 255 * 3 - 1, ".tiff")
    (found,) = client.infer(data, color_mode="unchanged").output
    assert found["text"] == "deep pixels"
    assert corners_match(found["points"], dark_box(code))

"""Valid images in less common encodings decode through the gateway as OpenCV decodes them: the
header checks that refuse bombs must not refuse these. Every image is made here, with OpenCV or
field by field."""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import pytest

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.headers import MAX_PNG_TEXT_CHUNKS, Dimensions, HeaderError, dimensions
from tests.hostile import png_chunk
from tests.jpeg2000 import codestream, halved_precincts, jp2
from tests.wire import grpc_result, post_octet

FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def picture(height: int, width: int) -> np.ndarray:
    """A BGR gradient, different in every channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], -1).astype(np.uint8)


def png_with_itxt(count: int, *, compressed: bool) -> bytes:
    """A 16x8 PNG with `count` iTXt chunks of 4 KB of text each, compressed or not."""
    png = cv2.imencode(".png", picture(8, 16))[1].tobytes()
    text = b"x" * 4096
    # Keyword, its NUL, the compression flag and method, an empty language tag and translated
    # keyword, then the text.
    body = b"Comment\0" + bytes([compressed, 0]) + b"\0\0"
    body += zlib.compress(text) if compressed else text
    ihdr_end = 8 + 25
    return png[:ihdr_end] + png_chunk(b"iTXt", body) * count + png[ihdr_end:]


def assert_decodes_as_opencv(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub, data: bytes
) -> None:
    """Both protocols answer the image as cv2.imdecode decodes it, checksum and shape."""
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), FLAGS)
    assert expected is not None
    checksum = int(expected.astype(np.uint64).sum())
    answer = post_octet(http_url, "spy", data)
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    assert result["output"] == {"checksum": checksum}
    assert [result["info"]["height"], result["info"]["width"]] == list(expected.shape[:2])
    image = pb.Image(data=data, name="0")
    infer = stub.Infer(pb.InferRequest(model="spy", image=image), timeout=30)
    assert grpc_result(infer.result)["output"] == {"checksum": checksum}


def test_uncompressed_itxt_chunks_are_not_counted_as_compressed_text() -> None:
    # libpng inflates only the iTXt chunks whose compression flag is set; Pillow writes its
    # iTXt uncompressed by default.
    many = MAX_PNG_TEXT_CHUNKS + 12
    assert dimensions(png_with_itxt(many, compressed=False), "png") == Dimensions(16, 8)
    assert dimensions(png_with_itxt(MAX_PNG_TEXT_CHUNKS, compressed=True), "png").width == 16
    with pytest.raises(HeaderError, match="text chunks"):
        dimensions(png_with_itxt(MAX_PNG_TEXT_CHUNKS + 1, compressed=True), "png")


def test_a_png_of_many_uncompressed_itxt_chunks_decodes(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    assert_decodes_as_opencv(
        http_url, stub, png_with_itxt(MAX_PNG_TEXT_CHUNKS + 12, compressed=False)
    )


def test_an_itxt_chunk_that_is_not_whole_counts_as_compressed() -> None:
    # A keyword without its NUL in the chunk, or a flag past the chunk's end, cannot be read as
    # uncompressed text: counted, as libpng's refusal of it is not relied on.
    png = cv2.imencode(".png", picture(8, 16))[1].tobytes()
    for body in (b"Comment", b"Comment\0", b"k" * 90 + b"\0\0\0\0\0"):
        data = png[:33] + png_chunk(b"iTXt", body) * (MAX_PNG_TEXT_CHUNKS + 1) + png[33:]
        with pytest.raises(HeaderError, match="text chunks"):
            dimensions(data, "png")


def test_a_jpeg2000_with_precincts_halved_by_level_decodes(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # As opj_compress -c [128,128] writes it: 4x4 precincts, and code-blocks, at the lowest of
    # six resolution levels.
    data = jp2(codestream(512, 384, components=3, levels=5, precincts=halved_precincts(128, 5)))
    assert_decodes_as_opencv(http_url, stub, data)


def pam(image: np.ndarray, tuple_type: str) -> bytes:
    """An 8-bit PAM of `image`'s samples as they are (cv2.imencode writes no 2-channel one)."""
    height, width = image.shape[:2]
    depth = image.shape[2] if image.ndim == 3 else 1
    header = f"P7\nWIDTH {width}\nHEIGHT {height}\nDEPTH {depth}\nMAXVAL 255\n"
    return f"{header}TUPLTYPE {tuple_type}\nENDHDR\n".encode() + image.tobytes()


def test_a_pam_that_opencv_would_convert_only_in_part_is_refused_in_that_mode(
    http_url: str, stub: pb_grpc.ImageGatewayServiceStub
) -> None:
    # OpenCV converts an RGBA PAM to 3 channels a quarter of each row at a time and leaves the
    # rest as the memory was (it changed from one call to the next); a gray and alpha one to 1
    # channel it writes past its rows.
    rgba = np.dstack([picture(48, 64), np.full((48, 64), 200, np.uint8)])
    gray_alpha = rgba[..., 1:3].copy()
    for data in (
        pam(rgba, "RGB_ALPHA"),
        pam(gray_alpha, "GRAYSCALE_ALPHA"),
    ):
        for mode in ("color", "grayscale"):
            answer = post_octet(http_url, "spy", data, params={"color_mode": mode})
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["code"] == "undecodable_image"
            assert "PAM" in answer.json()["error"]["message"]
        # Kept as they are, its channels are whole.
        answer = post_octet(http_url, "spy", data, params={"color_mode": "unchanged"})
        assert answer.status_code == 200, answer.text
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert expected is not None
        assert answer.json()["result"]["output"] == {"checksum": int(expected.sum())}
    # Gray and RGB PAMs convert whole, in every mode.
    for data in (
        pam(rgba[..., :3].copy(), "RGB"),
        pam(gray_alpha[..., 0].copy(), "GRAYSCALE"),
    ):
        assert_decodes_as_opencv(http_url, stub, data)

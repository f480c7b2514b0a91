"""Clients written for a plain Flask server doing `jsonify(img.shape)` work unchanged."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import requests

from tests.conftest import DATA

JPEG = (DATA / "images" / "rocket.jpg").read_bytes()
PNG = (DATA / "images" / "hopper.png").read_bytes()


def test_urllib_raw_octet_stream_to_root(http_url: str) -> None:
    req = urllib.request.Request(
        f"{http_url}/", data=JPEG, headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == [427, 640, 3]


def test_urllib_default_content_type_is_sniffed(http_url: str) -> None:
    # urllib sends application/x-www-form-urlencoded when no Content-Type is given.
    with urllib.request.urlopen(f"{http_url}/", data=PNG, timeout=30) as resp:
        assert json.loads(resp.read()) == [128, 128, 3]


def test_urllib_form_body_that_is_not_an_image_gets_415(http_url: str) -> None:
    try:
        urllib.request.urlopen(f"{http_url}/", data=b"name=value&x=1", timeout=30)
    except urllib.error.HTTPError as exc:
        assert exc.code == 415
        body = json.loads(exc.read())
        assert body["error"]["code"] == "unsupported_media_type"
        assert "application/octet-stream" in body["error"]["message"]
    else:
        raise AssertionError("a form body was taken as an image")


def test_requests_multipart_dict_keyed_by_index_to_multi(http_url: str) -> None:
    files = {"0": ("a.jpg", JPEG), "1": ("b.png", PNG)}
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.status_code == 200
    assert resp.json() == [[427, 640, 3], [128, 128, 3]]


def test_multi_orders_index_names_numerically(http_url: str) -> None:
    # Sent as 10, 2, 1: answered as 1, 2, 10.
    files = [("10", ("a.jpg", JPEG)), ("2", ("b.png", PNG)), ("1", ("c.jpg", JPEG))]
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.json() == [[427, 640, 3], [128, 128, 3], [427, 640, 3]]


def test_multi_keeps_send_order_for_other_names(http_url: str) -> None:
    files = [("b", ("b.png", PNG)), ("a", ("a.jpg", JPEG)), ("03", ("c.png", PNG))]
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.json() == [[128, 128, 3], [427, 640, 3], [128, 128, 3]]


def test_multi_fails_whole_request_naming_the_bad_part(http_url: str) -> None:
    files = {"0": ("a.jpg", JPEG), "1": ("junk.bin", b"not an image")}
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "undecodable_image"
    assert error["part"] == "1"
    assert error["index"] == 1
    assert "'1'" in error["message"]


def test_file_parts_of_one_name_are_images_in_the_order_sent(http_url: str) -> None:
    # What <input type="file" name="images" multiple> and repeated FormData.append send: they
    # were refused as duplicate_part, so such forms always failed.
    files = [("images", ("a.png", PNG)), ("images", ("b.jpg", JPEG)), ("images", ("c.png", PNG))]
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.json() == [[128, 128, 3], [427, 640, 3], [128, 128, 3]]
    full = requests.post(f"{http_url}/v1/infer", files=files, timeout=30).json()
    assert [(r["name"], r["output"]) for r in full["results"]] == [
        ("images", [128, 128, 3]),
        ("images", [427, 640, 3]),
        ("images", [128, 128, 3]),
    ]
    # Indices given twice keep the order sent too: there is no one numeric order of them.
    files = [("1", ("a.jpg", JPEG)), ("0", ("b.png", PNG)), ("1", ("c.png", PNG))]
    resp = requests.post(f"{http_url}/multi", files=files, timeout=30)
    assert resp.json() == [[427, 640, 3], [128, 128, 3], [128, 128, 3]]
    # A bad one among them is named by its place.
    files = [("images", ("a.png", PNG)), ("images", ("junk.bin", b"not an image"))]
    error = requests.post(f"{http_url}/multi", files=files, timeout=30).json()["error"]
    assert (error["part"], error["index"]) == ("images", 1)

"""The browser page and CORS, end to end in headless Chromium (Debian's chromium, driven by
Playwright with its executable_path; no browser download)."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from gateway.config import Settings
from gateway.serve import Gateway, start
from tests.conftest import DATA

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"
# As this machine's headless Chromium needs it: no sandbox as root, and no calls home.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium: .ci/run installs Debian's chromium package")
    pytest.skip("no chromium here: apt-get install chromium", allow_module_level=True)

from playwright.sync_api import Browser, Page, Route, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def qr_gateway() -> Iterator[Gateway]:
    gw = start(Settings(http_port=0, grpc_port=0, model=("qrcode", "shape")))
    yield gw
    gw.stop()


def qr_photo(path: Path) -> None:
    photo = cv2.imdecode(
        np.frombuffer((DATA / "images" / "rocket.jpg").read_bytes(), np.uint8), cv2.IMREAD_COLOR
    )
    assert photo is not None
    code = cv2.QRCodeEncoder.create().encode("hello from the browser")
    code = cv2.resize(code, None, fx=6, fy=6, interpolation=cv2.INTER_NEAREST)
    code = cv2.copyMakeBorder(code, 24, 24, 24, 24, cv2.BORDER_CONSTANT, value=255)
    h, w = code.shape
    photo[60 : 60 + h, 300 : 300 + w] = cv2.cvtColor(code, cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(path), photo)


def test_page_sends_two_images_and_shows_each_result(
    browser: Browser, qr_gateway: Gateway, tmp_path: Path
) -> None:
    qr = tmp_path / "with-qr.png"
    qr_photo(qr)
    plain = tmp_path / "plain.jpg"
    plain.write_bytes((DATA / "images" / "hopper.jpg").read_bytes())
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(qr_gateway.http_url + "/")
    page.wait_for_selector("#model option[value=qrcode]", state="attached")
    assert page.input_value("#model") == "qrcode"
    page.set_input_files("#files", [str(qr), str(plain)])
    page.click("#run")
    page.wait_for_selector(".card[data-index='1'] canvas[data-drawn='1']")
    page.wait_for_selector(".card[data-index='0'] canvas[data-drawn='1']")
    first = page.inner_text(".card[data-index='0'] pre")
    second = page.inner_text(".card[data-index='1'] pre")
    assert "QR: hello from the browser" in first
    assert "640x427 png" in first
    assert second.startswith("[]")
    # The outline of the code is drawn in green over the thumbnail.
    green = page.evaluate(
        """() => {
            const c = document.querySelector(".card[data-index='0'] canvas");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4)
                if (d[i] < 40 && d[i + 1] > 150 && d[i + 2] > 50 && d[i + 2] < 120) n++;
            return n;
        }"""
    )
    assert green > 50
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-page.png"), full_page=True)
    page.close()


def exif_jpeg(photo: np.ndarray, orientation: int) -> bytes:
    """`photo` as a JPEG whose EXIF Orientation tag is `orientation`."""
    ok, encoded = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_outlines_land_on_the_code_of_a_photo_the_browser_turns(
    browser: Browser, qr_gateway: Gateway, tmp_path: Path, orientation: int
) -> None:
    # The gateway finds the code in the pixels as stored; Chromium shows a JPEG turned by its
    # EXIF orientation, and the outline was drawn unturned, off the code.
    photo = np.full((300, 600, 3), 200, np.uint8)
    code = cv2.QRCodeEncoder.create().encode("turned")
    code = cv2.resize(code, None, fx=6, fy=6, interpolation=cv2.INTER_NEAREST)
    code = cv2.copyMakeBorder(code, 12, 12, 12, 12, cv2.BORDER_CONSTANT, value=255)
    h, w = code.shape
    photo[10 : 10 + h, 10 : 10 + w] = cv2.cvtColor(code, cv2.COLOR_GRAY2BGR)
    path = tmp_path / f"turned-{orientation}.jpg"
    path.write_bytes(exif_jpeg(photo, orientation))
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(qr_gateway.http_url + "/")
    page.wait_for_selector("#model option[value=qrcode]", state="attached")
    page.set_input_files("#files", [str(path)])
    page.click("#run")
    page.wait_for_selector(".card canvas[data-drawn='1']")
    assert "QR: turned" in page.inner_text(".card pre")
    boxes = page.evaluate(
        """() => {
            const c = document.querySelector(".card canvas");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const box = (test) => {
                let b = [1e9, 1e9, -1, -1];
                for (let y = 0; y < c.height; y++)
                    for (let x = 0; x < c.width; x++) {
                        const i = (y * c.width + x) * 4;
                        if (test(d[i], d[i + 1], d[i + 2]))
                            b = [Math.min(b[0], x), Math.min(b[1], y),
                                 Math.max(b[2], x), Math.max(b[3], y)];
                    }
                return b;
            };
            return {
                green: box((r, g, b) => r < 60 && g > 150 && b < 120),
                code: box((r, g, b) => r < 40 && g < 40 && b < 40),
            };
        }"""
    )
    green, dark = boxes["green"], boxes["code"]
    assert green[2] >= 0, "no outline drawn"
    # The outline goes round the code's dark modules, wherever the turn put them.
    centre = [(green[0] + green[2]) / 2, (green[1] + green[3]) / 2]
    assert dark[0] <= centre[0] <= dark[2] and dark[1] <= centre[1] <= dark[3], boxes
    page.close()


def test_page_shows_an_error_per_image(
    browser: Browser, qr_gateway: Gateway, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    good.write_bytes((DATA / "images" / "hopper.png").read_bytes())
    page = browser.new_page()
    page.goto(qr_gateway.http_url + "/")
    page.wait_for_selector("#model option[value=shape]", state="attached")
    page.select_option("#model", "shape")
    page.set_input_files("#files", [str(junk), str(good)])
    page.click("#run")
    page.wait_for_selector(".card[data-index='1'] pre")
    assert "undecodable_image" in page.inner_text(".card[data-index='0'] pre.error")
    assert page.inner_text(".card[data-index='1'] pre").startswith("[128,128,3]")
    page.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def other_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A page served from another origin (another loopback port) that POSTs with fetch()."""
    root = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text(
        """<!doctype html><script>
        async function send(url, bytes) {
          try {
            const r = await fetch(url, {method: "POST", body: new Uint8Array(bytes),
                                        headers: {"Content-Type": "application/octet-stream"}});
            return {ok: true, status: r.status, body: await r.json(),
                    id: r.headers.get("X-Request-ID")};
          } catch (e) { return {ok: false, error: String(e)}; }
        }
        </script>"""
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cross_origin_fetch_allowed_only_for_configured_origins(
    browser: Browser, other_origin: str
) -> None:
    png = list((DATA / "images" / "hopper.png").read_bytes())
    allowed = start(Settings(http_port=0, grpc_port=0, cors_origin=(other_origin,)))
    closed = start(Settings(http_port=0, grpc_port=0))
    try:
        page = browser.new_page()
        page.goto(other_origin + "/index.html")
        ok = page.evaluate("([u, b]) => send(u, b)", [allowed.http_url + "/v1/infer", png])
        assert ok["ok"] and ok["status"] == 200
        assert ok["body"]["result"]["output"] == [128, 128, 3]
        assert ok["id"]  # X-Request-ID is exposed to the page
        refused = page.evaluate("([u, b]) => send(u, b)", [closed.http_url + "/v1/infer", png])
        assert refused["ok"] is False and "Failed to fetch" in refused["error"]
        page.close()
    finally:
        allowed.stop()
        closed.stop()


def test_page_asks_a_gateway_that_takes_tokens_for_one(browser: Browser, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("browser-token-0123456789\n")
    gw = start(Settings(http_port=0, grpc_port=0, auth_token_file=str(tokens)))
    try:
        page = browser.new_page()
        page.goto(gw.http_url + "/")
        page.wait_for_function("document.querySelector('#status').textContent !== ''")
        assert page.inner_text("#status").startswith("unauthenticated:")
        page.set_input_files("#files", [str(DATA / "images" / "hopper.jpg")])
        # Typed, then straight to Run: the field's change event (the model list asked for
        # again) comes as the click takes the focus, and the run had gone to no model.
        page.fill("#token", "browser-token-0123456789")
        page.click("#run")
        page.wait_for_selector(".card[data-index='0'] canvas[data-drawn='1']")
        assert page.inner_text("#status").startswith("done")
        page.wait_for_selector("#model option[value=shape]", state="attached")
        page.click("#run")  # the same token: the list stays, the run goes to the model chosen
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
        page.close()
    finally:
        gw.stop()


@contextlib.contextmanager
def token_typed_list_held(browser: Browser, tmp_path: Path) -> Iterator[tuple[Page, list[Route]]]:
    """A page of a gateway that takes tokens, an image chosen and the token typed (the field
    still focused), whose model list asked for with the token is held: its routes, in the
    list yielded with the page, go on when the test says."""
    tokens = tmp_path / "tokens"
    tokens.write_text("browser-token-0123456789\n")
    gw = start(Settings(http_port=0, grpc_port=0, auth_token_file=str(tokens)))
    held: list[Route] = []

    def hold_the_list_with_a_token(route: Route) -> None:
        if route.request.headers.get("authorization"):
            held.append(route)
        else:
            route.continue_()

    try:
        page = browser.new_page()
        page.route("**/v1/models", hold_the_list_with_a_token)
        page.goto(gw.http_url + "/")
        page.wait_for_function("document.querySelector('#status').textContent !== ''")
        page.set_input_files("#files", [str(DATA / "images" / "hopper.jpg")])
        page.fill("#token", "browser-token-0123456789")
        yield page, held
        page.close()
    finally:
        gw.stop()


def test_a_model_list_answered_after_a_run_leaves_the_runs_status(
    browser: Browser, tmp_path: Path
) -> None:
    # The list asked for again as the token field lost focus to Run came back after the run's
    # answer, and blanked its "done".
    with token_typed_list_held(browser, tmp_path) as (page, held):
        page.click("#run")
        page.wait_for_selector(".card[data-index='0'] canvas[data-drawn='1']")
        assert page.inner_text("#status").startswith("done")
        assert len(held) == 1
        held[0].continue_()
        page.wait_for_selector("#model option[value=shape]", state="attached")
        assert page.inner_text("#status").startswith("done")


def test_run_stays_under_the_pointer_while_the_model_list_arrives(
    browser: Browser, tmp_path: Path
) -> None:
    # The list asked for again as the token field lost focus to Run (on the button's mousedown)
    # could arrive before the mouseup: it widened the model field, moved Run from under the
    # pointer, and the click went to no button, so the run never started.
    with token_typed_list_held(browser, tmp_path) as (page, held):
        box = page.locator("#run").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        for _ in range(300):  # the route's handler runs as the page is waited on
            if held:
                break
            page.wait_for_timeout(100)
        assert len(held) == 1
        held[0].continue_()
        page.wait_for_selector("#model option[value=shape]", state="attached")
        page.mouse.up()
        page.wait_for_selector(".card[data-index='0'] canvas[data-drawn='1']")
        assert page.inner_text("#status").startswith("done")

"""Property-based fuzzing: arbitrary bytes and headers never crash the decoder or the server."""

from __future__ import annotations

import itertools
import json
import re
import socket
import string

import cv2
import grpc
import numpy as np
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.decode import decode, probe
from gateway.core.errors import GatewayError
from gateway.core.types import ColorMode
from gateway.rest.heads import chunked_end, head_readable
from tests.conftest import IMAGES
from tests.hostile import file_part, multipart, text_part
from tests.wire import send_and_see_read

SEEDS = [p.read_bytes() for p in IMAGES if p.stat().st_size < 40_000]
MAX_PIXELS = 4_000_000
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def decoded_checksum(data: bytes) -> int | None:
    """What the spy model reports for an image the gateway decodes in color."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return None if image is None else int(image.astype(np.uint64).sum())


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        # Mutations near the start hit headers, where parsers are most fragile.
        pos = draw(st.integers(0, min(len(data), 512)))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


# None, or a model's smallest input: a JPEG may then decode reduced.
MIN_SIZES = st.none() | st.tuples(st.integers(1, 300), st.integers(1, 300))


def decode_or_refuse(data: bytes, mode: ColorMode, min_size: tuple[int, int] | None = None) -> None:
    try:
        probed = probe(data, MAX_PIXELS)
        decoded = decode(data, probed, mode, min_size)
    except GatewayError:
        return
    # What decoded must be no larger than the header said, and the array no larger than that.
    assert decoded.info.width * decoded.info.height <= probed.size.pixels
    height, width = decoded.array.shape[:2]
    assert width <= decoded.info.width and height <= decoded.info.height


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(list(ColorMode)), MIN_SIZES)
def test_decoder_on_arbitrary_bytes(
    data: bytes, mode: ColorMode, min_size: tuple[int, int] | None
) -> None:
    decode_or_refuse(data, mode, min_size)


@FUZZ
@given(mutated_images(), st.sampled_from(list(ColorMode)), MIN_SIZES)
def test_decoder_on_mutated_images(
    data: bytes, mode: ColorMode, min_size: tuple[int, int] | None
) -> None:
    decode_or_refuse(data, mode, min_size)


HEADER_NAMES = st.sampled_from(
    ["Content-Type", "X-Request-ID", "Content-Encoding", "Transfer-Encoding", "Accept", "X-Other"]
)
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
) | st.sampled_from(
    [
        "application/octet-stream",
        "image/png",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "gzip",
        "chunked",
    ]
)
PATHS = st.sampled_from(
    ["/", "/multi", "/v1/infer", "/v1/models/shape/infer", "/v1/models/x/infer"]
)


@FUZZ
@given(
    path=PATHS,
    body=st.binary(max_size=2048) | mutated_images(),
    headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4),
    query=st.dictionaries(st.sampled_from(["color_mode", "x", ""]), st.text(max_size=10)),
)
def test_http_front_never_answers_5xx(
    http_url: str, path: str, body: bytes, headers: dict[str, str], query: dict[str, str]
) -> None:
    headers.pop("Transfer-Encoding", None)  # requests frames the body itself
    try:
        resp = requests.post(
            f"{http_url}{path}", data=body, headers=headers, params=query, timeout=30
        )
    except requests.exceptions.InvalidHeader:
        return  # refused by the client library before sending
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) >= {"code", "message", "request_id"}


@FUZZ
@given(
    images=st.lists(st.binary(max_size=512) | mutated_images(), min_size=1, max_size=4),
    model=st.sampled_from(["", "shape", "qrcode", "nope"]),
    mode=st.integers(0, 5),
)
def test_grpc_front_never_answers_internal(
    stub: pb_grpc.ImageGatewayServiceStub, images: list[bytes], model: str, mode: int
) -> None:
    request = pb.InferBatchRequest(
        model=model,
        color_mode=mode,  # type: ignore[arg-type]  # unknown enum numbers on purpose
        images=[pb.Image(data=d) for d in images],
    )
    try:
        stub.InferBatch(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc


# Every decodable test image, the largest over the server's 64 KiB read so that its part comes
# in pieces; the spy model reports a checksum of the pixels, so a part one byte off shows.
INTACT = [d for d in (p.read_bytes() for p in IMAGES) if decoded_checksum(d) is not None]
BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(st.integers(0, len(INTACT) - 1), min_size=1, max_size=4),
    note=st.text(alphabet='-\r\n ab=X"', max_size=80),
    boundary=st.text(alphabet=BOUNDARY_CHARS, min_size=1, max_size=70).filter(
        lambda b: not b.endswith(" ")
    ),
    piece=st.integers(1, 70_000),
)
def test_multipart_parts_arrive_intact(
    http_url: str, picks: list[int], note: str, boundary: str, piece: int
) -> None:
    # Any boundary RFC 2046 allows, text full of CR, LF and dashes, the body sent chunked in
    # pieces of any size: every image and field reaches the model exactly as sent.
    from tests.models import SPY

    datas = [INTACT[i] for i in picks]
    delimiter = f"\r\n--{boundary}".encode()
    assume(all(delimiter not in d for d in datas) and delimiter not in f"\r\n{note}\r\n".encode())
    body = multipart(
        [file_part(str(i), d) for i, d in enumerate(datas)] + [text_part("note", note)],
        boundary=boundary,
    )
    # Small pieces of a large body cost about 11 us each on both sides (a 450 KB body in 1-byte
    # pieces took 5 s): past 4,096 pieces, larger ones split the delimiters as well.
    piece = max(piece, -(-len(body) // 4096))
    resp = requests.post(
        f"{http_url}/v1/models/spy/infer",
        data=(body[i : i + piece] for i in range(0, len(body), piece)),
        headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r.get("output") for r in results] == [
        {"checksum": decoded_checksum(d)} for d in datas
    ], results
    assert SPY.calls[-1]["params"] == {"note": note}


def _pipelined(*requests_: bytes) -> bytes:
    return b"".join(requests_)


_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
_SPY = b"POST /v1/models/spy/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: fuzz-%d\r\n"
_CLOSE = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
_SMALL = SEEDS[0]
# Requests on one connection, the last asking to close: whole heads, heads over the server's
# 4 KiB peek, bodies of known length and chunked, pipelined one after another.
SENT = [
    _pipelined(
        _SPY % 1 + b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % len(_SMALL) + _SMALL,
        _CLOSE,
    ),
    _pipelined(_HEALTH, _HEALTH, _CLOSE),
    _pipelined(
        *(
            _SPY % n + b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_SMALL) + _SMALL
            for n in (3, 4)
        ),
        _CLOSE,
    ),
    _pipelined(
        _SPY % 2 + b"X-Pad: " + b"p" * 6000 + b"\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(_SMALL), _SMALL),
        _HEALTH,
        _CLOSE,
    ),
]


def _answers_of(http_url: str, data: bytes, cuts: list[int]) -> list[tuple[int, object]]:
    """The answers to `data` sent in pieces cut at `cuts`, each piece read by the server before
    the next is sent; each as (status, body without its request id)."""
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        edges = [0, *sorted(set(cuts)), len(data)]
        for start, end in itertools.pairwise(edges):
            if end > start:
                send_and_see_read(sock, data[start:end])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    answers: list[tuple[int, object]] = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = int(dict(line.split(": ", 1) for line in lines[1:])["Content-Length"])
        body = json.loads(rest[:length])
        if isinstance(body, dict):
            body.pop("request_id", None)
        answers.append((int(lines[0].split()[1]), body))
        received = rest[length:]
    return answers


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, len(SENT) - 1), cuts=st.lists(st.floats(0, 1), max_size=6))
def test_requests_cut_anywhere_are_answered_as_sent_whole(
    http_url: str, which: int, cuts: list[float]
) -> None:
    # The server takes what comes of a head, or of a body of known length, into the
    # connection's reader while it waits for the rest (gateway.rest.heads): however the bytes
    # are cut, the requests read are the same.
    data = SENT[which]
    expected = _answers_of(http_url, data, [])
    assert [status for status, _ in expected] == [200] * data.count(b" HTTP/1.1\r\n")
    assert _answers_of(http_url, data, [int(c * len(data)) for c in cuts]) == expected


# What head_readable answers: a head ended, a line end without its CR, or a TLS handshake.
_READABLE = re.compile(rb"\A\x16|\r\n\r\n|(?<!\r)\n")


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=40).map(lambda b: bytes(b"\r\n\x16a"[x % 4] for x in b)),
    cut=st.integers(0, 45),
)
def test_whether_a_head_can_be_read_is_found_from_where_the_last_look_ended(
    data: bytes, cut: int
) -> None:
    # Looked at again from where a look found nothing, the answer is the one for all of it.
    assume(_READABLE.search(data[:cut]) is None)
    assert head_readable(data, cut) is (_READABLE.search(data) is not None)
    assert head_readable(bytearray(data), cut) is (_READABLE.search(data) is not None)


_chunked_bodies = st.builds(
    lambda chunks, extension, trailers: (
        b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks)
        + b"0\r\n"
        + b"".join(b"X-T%d: t\r\n" % i for i in range(trailers))
        + b"\r\n"
    ),
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    st.sampled_from([b"", b";a=b", b" ; x"]),
    st.integers(0, 2),
)


@settings(max_examples=300, deadline=None)
@given(body=_chunked_bodies, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_the_end_of_a_chunked_body_is_found_however_it_arrives(
    body: bytes, cuts: list[int]
) -> None:
    # The selector looks for where a chunked body ends each time more of it comes, from where
    # its last look stopped: the end is found exactly when the whole body has come, never
    # before (a thread would wait for the rest), and a look resumed gives what a look from the
    # start gives.
    at, total = 0, 0
    for cut in [*sorted(c for c in cuts if c < len(body)), len(body)]:
        ended, at, total = chunked_end(body[:cut], at, total, 1 << 20)
        assert ended is (cut == len(body))
        assert chunked_end(body[:cut], 0, 0, 1 << 20)[0] is ended
    # Framing the reader refuses at once is handed to it at once, not awaited.
    assert chunked_end(b"zz\r\n", 0, 0, 1 << 20)[0]
    assert chunked_end(b"%x\r\n" % (2 << 20), 0, 0, 1 << 20)[0]

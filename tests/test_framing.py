"""Where a request ends: header fields and bodies read strictly, so that no request is read as
two (request smuggling) and no declared size costs memory. Each case sends a request and then,
on the same connection, a GET /healthz that asks to close; the transcript tells whether the
connection stayed in step (both answered), or closed after the first answer."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any
from unittest.mock import ANY

import pytest

from gateway.serve import Gateway
from tests.conftest import DATA
from tests.hostile import BOUNDARY, file_part, multipart, text_part
from tests.wire import http_host_port

PNG = (DATA / "images" / "hopper.png").read_bytes()
FOLLOW_UP = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
OCTET = b"Content-Type: application/octet-stream\r\n"


def exchange(gw: Gateway, data: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """Send bytes, read until the server closes; every answer, parsed (JSON bodies)."""
    with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
        # The server may answer and close before it has read everything.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return parse_answers(received)


def parse_answers(received: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """Every answer in what a connection received, parsed (JSON bodies)."""
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers["Content-Length"])
        answers.append((int(lines[0].split()[1]), headers, json.loads(rest[:length])))
        received = rest[length:]
    return answers


def post(headers: bytes, body: bytes = b"", path: bytes = b"/v1/infer") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


def refused(answers: list[tuple[int, dict[str, str], Any]]) -> tuple[int, str]:
    """The one answer of a request refused with the connection closed after it."""
    assert len(answers) == 1, [a[0] for a in answers]
    status, headers, body = answers[0]
    assert headers["Connection"] == "close"
    return status, body["error"]["code"]


BAD_HEADERS = {
    "Content-Length and Transfer-Encoding": OCTET
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    "two different Content-Lengths": OCTET + b"Content-Length: 5\r\nContent-Length: 6\r\n",
    "a signed Content-Length": OCTET + b"Content-Length: +5\r\n",
    "an underscored Content-Length": OCTET + b"Content-Length: 1_0\r\n",
    "a space before the colon": OCTET + b"Content-Length : 5\r\n",
    "a folded line": OCTET + b"Content-Length: 5\r\n 30605\r\n",
    "a NUL in a value": b"X-Note: a\x00b\r\n",
    "a second Host": b"Host: y\r\n",
    # With a well-formed chunked body, so that only the header can be what is refused.
    "chunked twice": OCTET + b"Transfer-Encoding: chunked, chunked\r\n",
    "chunked twice, a tab between": OCTET + b"Transfer-Encoding: chunked,\tchunked\r\n",
}


@pytest.mark.parametrize("headers", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_ambiguous_framing_is_refused_and_the_connection_closed(
    gateway: Gateway, headers: bytes
) -> None:
    body = chunked(b"12345") if b"Transfer-Encoding" in headers else b"12345"
    answers = exchange(gateway, post(headers, body) + FOLLOW_UP)
    assert refused(answers) == (400, "invalid_request")


BAD_REQUEST_LINES = {
    # cheroot read the version's numbers with int(): signs, spaces, underscores and leading
    # zeros passed. HTTP/1.-5 was served as HTTP/1.0 (no Host needed), the others as HTTP/1.1.
    "a negative minor version": b"GET /healthz HTTP/1.-5\r\n",
    "an underscore in the version": b"GET /healthz HTTP/1.0_0\r\n",
    "a leading zero": b"GET /healthz HTTP/01.1\r\n",
    "a sign": b"GET /healthz HTTP/+1.1\r\n",
    "a space in the version": b"GET /healthz HTTP/ 1.1\r\n",
    # Any byte but SP passed in the method (answered 405) and the target (404).
    "a NUL before the method": b"\x00GET /healthz HTTP/1.1\r\n",
    "a method that is not a token": b"GE(T /healthz HTTP/1.1\r\n",
    "a NUL in the target": b"GET /heal\x00thz HTTP/1.1\r\n",
    "a DEL in the target": b"GET /healthz\x7f HTTP/1.1\r\n",
}


@pytest.mark.parametrize("line", BAD_REQUEST_LINES.values(), ids=BAD_REQUEST_LINES.keys())
def test_a_malformed_request_line_is_refused(gateway: Gateway, line: bytes) -> None:
    answers = exchange(gateway, line + b"Host: x\r\n\r\n" + FOLLOW_UP)
    assert refused(answers) == (400, "invalid_request")


def test_an_http_11_request_without_host_is_refused(gateway: Gateway) -> None:
    answers = exchange(gateway, b"GET /healthz HTTP/1.1\r\n\r\n" + FOLLOW_UP)
    assert refused(answers) == (400, "invalid_request")


def test_an_http_10_request_with_transfer_encoding_is_refused(gateway: Gateway) -> None:
    # cheroot reads no Transfer-Encoding from HTTP/1.0: the chunked body was framed as empty,
    # and the request inside it answered as the next one on the kept-alive connection.
    inner = b"GET /v1/models HTTP/1.0\r\n\r\n"
    request = b"POST /nope HTTP/1.0\r\nConnection: Keep-Alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert refused(exchange(gateway, request + inner)) == (400, "invalid_request")


def test_a_header_name_with_an_underscore_is_dropped(gateway: Gateway) -> None:
    # WSGI would name it as Content-Length (HTTP_CONTENT_LENGTH), and the app take 5 bytes of
    # a body the server framed at its real length.
    head = OCTET + b"Content-Length: %d\r\nContent_Length: 5\r\n" % len(PNG)
    answers = exchange(gateway, post(head, PNG) + FOLLOW_UP)
    assert [(status, body.get("result", {}).get("output")) for status, _, body in answers] == [
        (200, [128, 128, 3]),
        (200, None),
    ]


def test_a_chunked_body_with_extensions_and_trailers_keeps_the_connection_in_step(
    gateway: Gateway,
) -> None:
    body = chunked(PNG[:1000], PNG[1000:]).replace(b"\r\n", b";name=value\r\n", 1)
    body = body[:-2] + b"X-Checksum: 1\r\nX-More: 2\r\n\r\n"  # trailers before the final CRLF
    answers = exchange(gateway, post(OCTET + b"Transfer-Encoding: chunked\r\n", body) + FOLLOW_UP)
    assert [(status, body.get("result", {}).get("output")) for status, _, body in answers] == [
        (200, [128, 128, 3]),
        (200, None),
    ]


def test_a_trailer_that_is_not_a_header_field_is_refused(gateway: Gateway) -> None:
    body = chunked(PNG, trailers=b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    answers = exchange(gateway, post(OCTET + b"Transfer-Encoding: chunked\r\n", body))
    assert refused(answers) == (400, "invalid_request")


def test_a_chunked_body_takes_up_to_64_trailers(gateway: Gateway) -> None:
    # The empty line that ends the trailer section was counted as one of them: 64 trailers,
    # which README allows, were refused as "more than 64".
    head = post(OCTET + b"Transfer-Encoding: chunked\r\n")
    for count, statuses in ((64, [200, 200]), (65, [400])):
        trailers = b"".join(b"X-T%d: 1\r\n" % i for i in range(count))
        answers = exchange(gateway, head + chunked(PNG, trailers=trailers) + FOLLOW_UP)
        assert [status for status, _, _ in answers] == statuses


@pytest.mark.parametrize("size", [b"0x10", b"+10", b"-1", b"zz", b"1" * 17])
def test_a_bad_chunk_size_is_refused(gateway: Gateway, size: bytes) -> None:
    body = size + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
    answers = exchange(gateway, post(OCTET + b"Transfer-Encoding: chunked\r\n", body) + FOLLOW_UP)
    assert refused(answers) == (400, "invalid_request")


@pytest.mark.parametrize("extension", [b";a=\rb", b";a\x00", b";\x1b"], ids=repr)
def test_a_control_byte_in_a_chunk_extension_is_refused(gateway: Gateway, extension: bytes) -> None:
    # Extensions are ignored, and were not read at all: a bare CR in one, a line end to some
    # readers (RFC 9112 2.2), passed.
    body = b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(PNG), extension, PNG)
    answers = exchange(gateway, post(OCTET + b"Transfer-Encoding: chunked\r\n", body) + FOLLOW_UP)
    assert refused(answers) == (400, "invalid_request")


def test_a_chunk_over_the_body_limit_is_refused_from_its_size(gateway: Gateway) -> None:
    # Nothing of the terabyte is sent: the answer comes from the size line alone.
    answers = exchange(gateway, post(OCTET + b"Transfer-Encoding: chunked\r\n", b"ffffffffff\r\n"))
    assert refused(answers) == (413, "payload_too_large")


def test_an_unread_chunked_body_is_never_read_as_the_next_request(gateway: Gateway) -> None:
    # A route that does not exist reads no body; cheroot left it on the connection, where the
    # request inside it was answered as the next one.
    inner = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = exchange(
        gateway, post(b"Transfer-Encoding: chunked\r\n", inner, path=b"/nope") + FOLLOW_UP
    )
    assert refused(answers) == (404, "not_found")


def test_a_declared_body_over_the_limit_is_refused_on_any_route(gateway: Gateway) -> None:
    # cheroot read the rest of a body the app left unread in one piece: a terabyte declared to
    # a route that reads nothing was a MemoryError, and no answer.
    for path in (b"/nope", b"/v1/infer"):
        request = post(b"Content-Type: text/plain\r\nContent-Length: 1000000000000\r\n", path=path)
        assert refused(exchange(gateway, request)) == (413, "payload_too_large")


def test_a_small_unread_body_is_read_out_and_the_connection_kept(gateway: Gateway) -> None:
    body = b"x" * 100_000
    request = post(b"Content-Length: %d\r\n" % len(body), body, path=b"/nope")
    answers = exchange(gateway, request + FOLLOW_UP)
    assert [status for status, _, _ in answers] == [404, 200]


def test_expect_100_continue_refused_from_the_headers_sends_no_continue(gateway: Gateway) -> None:
    # cheroot answered 100 Continue at once, so a request refused from its headers alone still
    # had its body sent. Here nothing of the body is sent: the refusal comes first.
    for path, expected in (
        (b"/v1/models/nope/infer", (404, "model_not_found")),
        (b"/nope", (404, "not_found")),
    ):
        head = OCTET + b"Expect: 100-continue\r\nContent-Length: 1000000\r\n"
        answers = exchange(gateway, post(head, path=path))
        assert refused(answers) == expected


def first_answer(s: socket.socket) -> tuple[int, dict[str, str], Any]:
    """The first answer on a connection (an interim 100 Continue included), read without
    waiting for the connection to close."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = s.recv(65536)
        assert chunk, received
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if status == 100:
        return status, {}, None
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers["Content-Length"])
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, rest
        rest += chunk
    return status, headers, json.loads(rest[:length])


QUERY_ERRORS = {
    "an unknown color_mode": (b"?color_mode=rgb", "color_mode 'rgb' is not one of"),
    "a name given twice": (b"?q=1&q=2", "parameter 'q' is given twice"),
    "an escape that is not UTF-8": (b"?x=%FF", "a query parameter is not UTF-8"),
}
BODY_TYPES = {
    "octet-stream": b"application/octet-stream",
    "multipart": b"multipart/form-data; boundary=b0undary",
}


@pytest.mark.parametrize("content_type", BODY_TYPES.values(), ids=BODY_TYPES.keys())
@pytest.mark.parametrize(("query", "message"), QUERY_ERRORS.values(), ids=QUERY_ERRORS.keys())
def test_a_query_refused_on_its_own_is_answered_before_the_body(
    gateway: Gateway, content_type: bytes, query: bytes, message: str
) -> None:
    # The query was read only with the body: the server sent 100 Continue and read the whole
    # 20 MB before it answered 400. Here nothing of the body is sent.
    head = b"Content-Type: %s\r\nExpect: 100-continue\r\nContent-Length: 20000000\r\n"
    with socket.create_connection(http_host_port(gateway.http_url), timeout=10) as s:
        s.sendall(post(head % content_type, path=b"/v1/infer" + query))
        status, headers, body = first_answer(s)
    assert status == 400  # not 100 Continue
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["message"].startswith(message)
    assert headers["Connection"] == "close"


def test_expect_100_continue_is_answered_when_the_body_is_wanted(gateway: Gateway) -> None:
    head = post(OCTET + b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(PNG))
    with socket.create_connection(http_host_port(gateway.http_url), timeout=10) as s:
        s.sendall(head)
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += s.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(PNG + FOLLOW_UP)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2  # the follow-up, on the same connection


def half_closed(gw: Gateway, request: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """Send a request, end the sending side (the client waits for the answer), read the
    answers until the server closes."""
    with socket.create_connection(http_host_port(gw.http_url), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return parse_answers(received)


def test_a_body_shorter_than_its_content_length_is_invalid_request(gateway: Gateway) -> None:
    # The multipart reader took the end of input for the end of the body: the parts that came
    # were answered 200 as if they were all (a body cut inside a part, malformed_multipart),
    # where an octet-stream body was refused invalid_request.
    form = b"Content-Type: multipart/form-data; boundary=" + BOUNDARY.encode() + b"\r\n"
    whole = multipart([file_part("0", PNG), text_part("note", "hi")])
    for headers, body in (
        (OCTET, PNG),
        (form, whole),
        (form, whole[: len(whole) // 2]),
    ):
        declared = len(body) + 1000
        answers = half_closed(gateway, post(headers + b"Content-Length: %d\r\n" % declared, body))
        message = (
            f"the body ended after {len(body)} of the {declared} bytes its Content-Length says"
        )
        assert [(status, answer.get("error")) for status, _, answer in answers] == [
            (400, {"code": "invalid_request", "message": message, "request_id": ANY})
        ]
        assert answers[0][1]["Connection"] == "close"
    # A chunked body has no Content-Length: it ends at its last chunk, half-closed or not.
    answers = half_closed(gateway, post(form + b"Transfer-Encoding: chunked\r\n", chunked(whole)))
    assert [(status, body["results"][0]["output"]) for status, _, body in answers] == [
        (200, [128, 128, 3])
    ]


CONNECTION_OPTIONS = {
    # (protocol, Connection value): whether the connection stays open for the follow-up.
    "HTTP/1.1 Close": (b"HTTP/1.1", b"Close", False),
    "HTTP/1.1 keep-alive, close": (b"HTTP/1.1", b"keep-alive, close", False),
    "HTTP/1.1 none": (b"HTTP/1.1", None, True),
    "HTTP/1.0 keep-alive": (b"HTTP/1.0", b"keep-alive", True),
    "HTTP/1.0 Keep-Alive": (b"HTTP/1.0", b"Keep-Alive", True),
    "HTTP/1.0 none": (b"HTTP/1.0", None, False),
}


@pytest.mark.parametrize(
    ("protocol", "connection", "kept"), CONNECTION_OPTIONS.values(), ids=CONNECTION_OPTIONS.keys()
)
def test_connection_options_are_read_as_case_insensitive_tokens(
    gateway: Gateway, protocol: bytes, connection: bytes | None, kept: bool
) -> None:
    head = b"GET /healthz " + protocol + b"\r\nHost: x\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    answers = exchange(gateway, head + b"\r\n" + FOLLOW_UP)
    assert [status for status, _, _ in answers] == ([200, 200] if kept else [200])
    # What each protocol assumes unless told: HTTP/1.1 keeps the connection, HTTP/1.0 closes it.
    said = {(b"HTTP/1.1", False): "close", (b"HTTP/1.0", True): "keep-alive"}
    assert answers[0][1].get("Connection", "").lower() == said.get((protocol, kept), "")


def test_framing_the_server_does_not_speak_gets_its_own_code_from_the_table(
    gateway: Gateway,
) -> None:
    gzip = post(OCTET + b"Transfer-Encoding: gzip, chunked\r\n", chunked(b"12345"))
    assert refused(exchange(gateway, gzip)) == (501, "unsupported_transfer_coding")
    version = b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n"
    assert refused(exchange(gateway, version)) == (505, "unsupported_http_version")


@pytest.mark.parametrize("value", [b"", b" ", b",", b" , ,"], ids=repr)
def test_a_transfer_encoding_naming_no_coding_is_refused(gateway: Gateway, value: bytes) -> None:
    # An empty Transfer-Encoding was taken for none: the request was answered as bodiless and
    # the request inside its body as the next one, a request a proxy in front never saw.
    inner = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    request = post(b"Transfer-Encoding:" + value + b"\r\n", inner, path=b"/nope")
    assert refused(exchange(gateway, request + FOLLOW_UP)) == (501, "unsupported_transfer_coding")


@pytest.mark.parametrize("value", [b"\x0bchunked", b"chunked\x0c", b"gzip,\x0bchunked"], ids=repr)
def test_chunked_with_other_whitespace_beside_it_is_refused(gateway: Gateway, value: bytes) -> None:
    # A list's members are separated by SP and HTAB only (RFC 9110 5.6.1). cheroot strips
    # VT and FF too, and read this body as chunked; a proxy in front that reads an unknown
    # coding (no length) forwards the body as the next request.
    request = post(OCTET + b"Transfer-Encoding: " + value + b"\r\n", chunked(b"12345"))
    assert refused(exchange(gateway, request + FOLLOW_UP)) == (501, "unsupported_transfer_coding")


def test_errors_of_the_server_itself_carry_the_id_the_client_chose(gateway: Gateway) -> None:
    # Answers the HTTP server gives itself, not the app, had a fresh id whatever the client sent.
    gzip = post(OCTET + b"Transfer-Encoding: gzip\r\nX-Request-ID: te-1\r\n", b"12345")
    answers = exchange(gateway, gzip)
    assert refused(answers) == (501, "unsupported_transfer_coding")
    assert answers[0][1]["X-Request-ID"] == answers[0][2]["error"]["request_id"] == "te-1"
    # Refused at the request line, with the headers still unread.
    version = b"GET /healthz HTTP/1.2\r\nHost: x\r\nX-Request-ID: v-1\r\n\r\n"
    connect = b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\nX-Request-ID: c-1\r\n\r\n"
    for request, sent_id in ((version, "v-1"), (connect, "c-1")):
        answers = exchange(gateway, request)
        assert answers[0][1]["X-Request-ID"] == answers[0][2]["error"]["request_id"] == sent_id
    # An id that breaks the rules is replaced, as on any route.
    bad = post(OCTET + b"Transfer-Encoding: gzip\r\nX-Request-ID: caf\xe9\r\n", b"12345")
    assert len(exchange(gateway, bad)[0][2]["error"]["request_id"]) == 32


def test_a_tls_handshake_on_the_plain_http_port_is_closed_at_once(gateway: Gateway) -> None:
    # The start of a TLS ClientHello: no line end will come, and the client waits for the
    # server's handshake. The server used to wait for a line until its 10 s read timeout.
    hello = bytes.fromhex("16030100a5010000a10303") + bytes(32)
    with socket.create_connection(http_host_port(gateway.http_url), timeout=5) as s:
        s.sendall(hello)
        assert s.recv(65536) == b""
    # The next client is served as usual.
    assert exchange(gateway, FOLLOW_UP)[0][0] == 200

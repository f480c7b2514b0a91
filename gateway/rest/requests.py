"""The only module that reads flask.request: HTTP bodies -> core InferRequest objects.

- application/octet-stream or image/*: the body is one image;
- multipart/form-data: one image per file part, parsed as it streams in (no temporary files);
- no Content-Type or application/x-www-form-urlencoded (urllib's default): the body is taken as
  an image only when its bytes start like one, otherwise 415.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import numpy as np
from flask import current_app, g, request
from multipart import MultipartError, MultipartSegment, PushMultipartParser
from werkzeug.exceptions import ClientDisconnected

from gateway import allocator, metrics
from gateway.core import formats
from gateway.core.admission import WAITED_TOO_LONG
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.limits import check_image_bytes
from gateway.core.types import ColorMode, ImageInput, InferRequest
from gateway.rest.exchange import CLIENT_GONE_KEY

_CHUNK = 64 * 1024
_BODY_CHUNK = 1024 * 1024
# Text parts are model parameters: small by nature.
MAX_FIELD_BYTES = 64 * 1024
SETTINGS_KEY = "image_gateway.settings"
# Field names a client meant as indices: "0", "1", ... in ASCII digits, no sign, no padding.
_INDEX = re.compile(r"(?:0|[1-9][0-9]{0,8})\Z", re.ASCII)
_SNIFFED_TYPES = {"", "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


def request_id() -> str:
    return str(g.request_id)


def is_multipart() -> bool:
    return request.mimetype == "multipart/form-data"


def single_image_request(model: str) -> InferRequest:
    """The body as one image."""
    _check_waited()
    _check_content_coding()
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        raise GatewayError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "this route takes one image as the raw body (Content-Type: application/octet-stream); "
            "send multipart/form-data to /multi or /v1/models/<model>/infer",
        )
    declared_image = mimetype == "application/octet-stream" or mimetype.startswith("image/")
    if not declared_image and mimetype not in _SNIFFED_TYPES:
        raise _unsupported_media_type(mimetype)
    settings = current_app.extensions[SETTINGS_KEY]
    length = request.content_length
    if declared_image and length is not None and length <= settings.max_request_bytes:
        # The body is the image: one over the image cap is refused before it is read. (A body
        # over the request cap is Werkzeug's to refuse, payload_too_large as for any body.)
        try:
            check_image_bytes(length, settings.max_image_bytes)
        except GatewayError as exc:
            # Counted as the core counts every image it refuses, by whatever route it came.
            metrics.inc(metrics.IMAGE_ERRORS, (exc.code,))
            raise
    query = _query()
    data = _read_body()
    if mimetype in _SNIFFED_TYPES:
        fmt = formats.sniff(data)
        if fmt is None or not fmt.image:
            raise _unsupported_media_type(mimetype)
    image = ImageInput(data, name="", content_type=request.content_type or "")
    return _infer_request(model, (image,), query, {})


def multipart_request(model: str) -> InferRequest:
    """Every file part as one image, in index order when all names are indices."""
    _check_waited()
    _check_content_coding()
    if request.mimetype != "multipart/form-data":
        raise GatewayError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"this route takes multipart/form-data, one image per file part, not "
            f"{request.mimetype or 'a body without Content-Type'}",
        )
    boundary = _boundary()
    query = _query()
    parts = _read_parts(boundary)
    files = [p for p in parts if p.filename is not None]
    # Two text parts of one name are duplicate_part already (_read_parts).
    fields = {p.name: _text(p.data, f"text field {p.name!r}") for p in parts if p.filename is None}
    if not files:
        raise GatewayError(
            ErrorCode.NO_IMAGES, "the multipart body has no file part; send each image as a file"
        )
    if all(_INDEX.match(p.name) for p in files) and len({p.name for p in files}) == len(files):
        files.sort(key=lambda p: int(p.name))
    images = tuple(ImageInput(p.data, p.name, p.content_type) for p in files)
    return _infer_request(model, images, query, fields)


def _infer_request(
    model: str,
    images: tuple[ImageInput, ...],
    query: dict[str, str],
    form_fields: dict[str, str],
) -> InferRequest:
    # Query parameters and text fields are one set, color_mode among them (the decode mode,
    # not the model's).
    params: dict[str, Any] = dict(query)
    for key, value in form_fields.items():
        _add_parameter(params, key, value)
    mode = _color_mode(params.pop("color_mode", "color"))
    g.images = len(images)
    return InferRequest(
        model=model,
        images=images,
        parameters=params,
        color_mode=mode,
        request_id=request_id(),
        deadline=g.deadline,
        client_gone=request.environ.get(CLIENT_GONE_KEY),
        received=g.received,
    )


def _query() -> dict[str, str]:
    """The query's parameters, refused now if the query alone is wrong (not UTF-8, a name given
    twice, an unknown color_mode): before the body is read, so that a client that waits to be
    asked for its body (Expect: 100-continue) is not asked for one only to have it refused.
    Checked with the body, it was 100 Continue and a 20 MB upload for a 400."""
    params: dict[str, str] = {}
    for key, value in _query_parameters():
        _add_parameter(params, key, value)
    if "color_mode" in params:
        _color_mode(params["color_mode"])
    return params


def _color_mode(value: str) -> ColorMode:
    try:
        return ColorMode(value)
    except ValueError:
        raise GatewayError(
            ErrorCode.INVALID_REQUEST,
            f"color_mode {value!r} is not one of: {', '.join(m.value for m in ColorMode)}",
        ) from None


def _query_parameters() -> list[tuple[str, str]]:
    """The query's name=value pairs, strictly UTF-8. Werkzeug's parser puts an escape that does
    not decode back as it came, so `?x=%FF` and `?x=%25FF` both reached the model as "%FF"."""
    pairs = []
    for item in request.query_string.split(b"&"):
        if item:
            name, _, value = item.partition(b"=")
            pairs.append(
                (
                    _text(unquote_to_bytes(name.replace(b"+", b" ")), "a query parameter name"),
                    _text(unquote_to_bytes(value.replace(b"+", b" ")), "a query parameter"),
                )
            )
    return pairs


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError(ErrorCode.INVALID_REQUEST, f"{what} is not UTF-8 text") from None


def _add_parameter(params: dict[str, Any], key: str, value: str) -> None:
    # Twice (?q=1&q=2, or a query parameter and a text field): the model would get one of
    # them, the client meant something else.
    if key in params:
        raise _given_twice(key)
    params[key] = value


def _given_twice(key: str) -> GatewayError:
    return GatewayError(
        ErrorCode.INVALID_REQUEST,
        f"parameter {key!r} is given twice (query parameters and text fields are one set)",
    )


def _check_waited() -> None:
    # Past the deadline before its body is read: the request waited for a thread (its body
    # may have come long ago), which is the server's delay, not a body that stopped arriving.
    if time.monotonic() > g.deadline:
        raise GatewayError(ErrorCode.DEADLINE_EXCEEDED, WAITED_TOO_LONG)


def _check_content_coding() -> None:
    # A gzip body was decoded as what its bytes are (unsupported_format "gzip"), and a plain one
    # labelled gzip as an image: the label was not read at all. RFC 9110 15.5.16: 415.
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise GatewayError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {coding[:64]!r}: this gateway takes bodies without a content "
            "coding (images are compressed already)",
        )


def _check_deadline() -> None:
    if time.monotonic() > g.deadline:
        raise GatewayError(
            ErrorCode.REQUEST_TIMEOUT, "the request body did not arrive within the time limit"
        )


@contextlib.contextmanager
def _body_timeouts() -> Iterator[None]:
    """A body that stops arriving for longer than the connection's timeout is a 408. Werkzeug's
    stream reports the socket's TimeoutError as the client gone (a 400), raised while handling
    the timeout."""
    try:
        yield
    except (TimeoutError, ClientDisconnected) as exc:
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            raise GatewayError(
                ErrorCode.REQUEST_TIMEOUT,
                "the request body did not arrive in time: it stopped, or came too slowly to "
                "end within the request timeout",
            ) from None
        raise


@_body_timeouts()
def _read_body() -> bytes | memoryview:
    length = request.content_length
    if length is not None:
        # Werkzeug has already refused a Content-Length over the cap, before reading. The body
        # is read from the socket straight into one buffer of the announced size, a piece at a
        # time so the deadline is checked between pieces (get_data() would hold the pieces and
        # their join at once: twice the body). The buffer is not zeroed, as bytearray(length)
        # would: a large one is fresh pages (malloc maps it), taken as the body fills them, so a
        # client that announces 60 MB and sends nothing costs nothing (eight such held 458 MB
        # of a worker).
        view = body = np.empty(length, np.uint8).data
        # Werkzeug's stream is an io.RawIOBase; Flask types it as the narrower IO[bytes].
        stream = cast(io.RawIOBase, request.stream)
        pos = 0
        while pos < length:
            n = stream.readinto(view[pos : pos + _BODY_CHUNK])
            if not n:
                raise _ended_early(pos, length)
            pos += n
            _check_deadline()
        if length >= allocator.TRIM_THRESHOLD:
            allocator.release_free_memory()  # the pieces read, before decoding begins
        return body
    # A chunked body: Werkzeug's stream stops quietly at the cap and raises 413 only on the
    # next read, so read until it ends or raises (get_data() would return the body truncated).
    chunks = []
    while chunk := request.stream.read(_CHUNK):
        chunks.append(chunk)
        _check_deadline()
    return b"".join(chunks)


def _ended_early(received: int, length: int) -> GatewayError:
    # The server cannot tell a client that left from one that half-closed and waits: as nginx
    # logs it, a 400 (README, Errors).
    return GatewayError(
        ErrorCode.INVALID_REQUEST,
        f"the body ended after {received} of the {length} bytes its Content-Length says",
    )


def _boundary() -> bytes:
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise GatewayError(
            ErrorCode.MALFORMED_MULTIPART, "the multipart Content-Type has no boundary"
        )
    try:
        # Werkzeug decodes an RFC 2231 boundary*= to any character; a boundary is ASCII.
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise GatewayError(
            ErrorCode.MALFORMED_MULTIPART, "the multipart boundary is not ASCII"
        ) from None


@_body_timeouts()
def _read_parts(boundary: bytes) -> list[Part]:
    # multipart's push parser finds boundaries with bytes.find; Werkzeug's decoder runs a regex
    # over every body byte and cost about 1 ms per eight 69 KB JPEGs, more than the gateway's
    # whole per-request overhead elsewhere.
    max_parts: int = current_app.extensions[SETTINGS_KEY].max_parts
    parts: list[Part] = []
    names = _PartNames()
    current: MultipartSegment | None = None
    chunks: list[bytes] = []
    size = 0
    received = 0
    stream = request.stream
    try:
        parser = PushMultipartParser(boundary)
        while data := stream.read(_CHUNK):
            received += len(data)
            _check_deadline()
            for event in parser.parse(data):
                if isinstance(event, MultipartSegment):
                    if len(parts) >= max_parts:
                        raise GatewayError(
                            ErrorCode.TOO_MANY_PARTS,
                            f"the multipart body has more than {max_parts} parts",
                        )
                    names.add(event)
                    current, chunks, size = event, [], 0
                elif event is None:
                    assert current is not None
                    parts.append(_part(current, chunks))
                    current = None
                else:
                    size += len(event)
                    if current is not None and current.filename is None and size > MAX_FIELD_BYTES:
                        raise GatewayError(
                            ErrorCode.PAYLOAD_TOO_LARGE,
                            f"text field {current.name!r} is over {MAX_FIELD_BYTES} bytes; "
                            "send images as file parts",
                        )
                    chunks.append(event)
        # The stream ends quietly where the client stopped sending (a body of known length is
        # read through Werkzeug's stream for the body cap, which takes an early end for the
        # end): the parts got so far were answered 200 as if they were the whole body.
        length = request.content_length
        if length is not None and received < length:
            raise _ended_early(received, length)
        try:
            parser.close()
        except MultipartError:
            raise GatewayError(
                ErrorCode.MALFORMED_MULTIPART,
                "the multipart body ended before its closing boundary",
            ) from None
    except MultipartError as exc:
        # Its first argument is the message; a decoding failure adds the exception itself.
        reason = exc.args[0] if exc.args else "unreadable"
        raise GatewayError(ErrorCode.MALFORMED_MULTIPART, f"bad multipart body: {reason}") from None
    return parts


class _PartNames:
    """Field names seen so far. File parts may share one (`<input type="file" multiple>` and
    repeated FormData.append send every file under one name); a text part may not share its name
    with any other part, as the model would get one of two values."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.texts: set[str] = set()

    def add(self, segment: MultipartSegment) -> None:
        name = segment.name or ""
        is_text = segment.filename is None
        if name in self.texts or (is_text and name in self.files):
            raise GatewayError(
                ErrorCode.DUPLICATE_PART,
                f"the multipart body has two parts named {name!r}, one of them a text field",
            )
        (self.texts if is_text else self.files).add(name)


def _part(segment: MultipartSegment, chunks: list[bytes]) -> Part:
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return Part(segment.name or "", segment.filename, segment.header("Content-Type", ""), data)


def _unsupported_media_type(mimetype: str) -> GatewayError:
    sent = f"Content-Type {mimetype}" if mimetype else "no Content-Type"
    return GatewayError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"the body ({sent}) is not an image; send one image with "
        "Content-Type: application/octet-stream (or image/*), or several as multipart/form-data",
    )

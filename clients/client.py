"""GatewayClient: one API over grpc:// and http://, returning the same results from both.

client = GatewayClient("grpc://127.0.0.1:50051")   # or "http://127.0.0.1:5000"
client = GatewayClient("grpcs://gw.internal:50051", ca_cert="ca.pem")  # TLS
result = client.infer("photo.jpg")                  # a path, bytes or a numpy array
results = client.infer_batch(["a.jpg", b"...", array])
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, Union
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from google.protobuf import struct_pb2

from clients.results import ErrorInfo, GatewayClientError, ImageResult, Limits, ModelInfo
from clients.tls import TlsFiles

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, IO[bytes]]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC connections a client spreads its calls over (HTTP keeps a pool of its own): enough for
# calls from several threads to reach several worker processes of the gateway.
DEFAULT_CHANNELS = 4
# grpc takes message sizes as a C int; more connections than this to one gateway is a mistake.
MAX_MESSAGE_BYTES = 2**31 - 1
MAX_CHANNELS = 1024
COLOR_MODES = ("color", "grayscale", "unchanged")


def encode_image(image: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """The encoded bytes to send: bytes as they are, an array as PNG. (Files are read by the
    client when their request goes, within the gateway's limits.)"""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        import cv2  # only arrays need OpenCV on the client side

        _check_array(image)
        if not image.dtype.isnative:  # a big-endian uint16, say: the same values, swapped
            image = image.astype(image.dtype.newbyteorder("="))
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise ValueError(f"cannot encode an array of shape {image.shape} as PNG")
        return encoded.tobytes()
    raise _not_an_image(image)


def _not_an_image(image: object) -> TypeError:
    return TypeError(
        "an image is a path, bytes, a numpy array or a binary file object, not "
        f"{type(image).__name__}"
    )


def _check_array(image: np.ndarray) -> None:
    """What PNG holds without loss. OpenCV would turn any other array into 8 bits silently
    (float 0.7 becomes 1, int64 1000 becomes 255), and the answer would be for another image."""
    if image.dtype.newbyteorder("=") not in (np.uint8, np.uint16):
        raise ValueError(
            f"an array of {image.dtype} cannot be sent as it is: PNG holds uint8 or uint16 "
            "(convert it first, e.g. with np.clip and astype)"
        )
    channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else 0
    if channels not in (1, 3, 4) or image.size == 0:
        raise ValueError(
            f"an array of shape {image.shape} is not an image: use (height, width) or "
            "(height, width, 1, 3 or 4 channels), not empty"
        )


@dataclass(frozen=True)
class _Source:
    """An image of a batch: its size, and how to get its bytes when its request is sent. A
    file is read only then, so a batch of many files holds one request's worth at a time."""

    index: int
    size: int
    content: bytes | Path  # a file is its path until its request goes

    def load(self) -> bytes:
        return self.content if isinstance(self.content, bytes) else self.content.read_bytes()


@dataclass(frozen=True)
class _Stream:
    """An image whose size is known only by reading it: a pipe, a device, a file object such
    as standard input. stat() gives such a file no size (0 for a FIFO), and reading it to its
    end may never end (/dev/zero): it is read once the gateway's max_image_bytes is known, and
    no further than one byte past it."""

    index: int
    content: Path | IO[bytes]

    def read(self, max_image_bytes: int) -> _Source | ErrorInfo:
        if isinstance(self.content, Path):
            with self.content.open("rb", buffering=0) as file:
                data = _read_at_most(file, max_image_bytes + 1)
        else:
            data = _read_at_most(self.content, max_image_bytes + 1)
        if data is None:
            too_many = f"more than {max_image_bytes}"
            return ErrorInfo("image_too_large", _over_image_bytes(too_many, max_image_bytes))
        return _Source(self.index, len(data), data)


def _pending(index: int, image: ImageLike) -> _Source | _Stream:
    """What an image is before the gateway's limits are known: nothing is read yet but bytes
    and arrays, while a path's faults (missing, a directory) are found now, before any request
    of the batch is sent."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, not an image file")
        info = path.stat()
        # A regular file of no size may be one whose size the kernel does not know (/proc).
        if stat.S_ISREG(info.st_mode) and info.st_size > 0:
            return _Source(index, info.st_size, path)
        return _Stream(index, path)
    if isinstance(image, (bytes, bytearray, memoryview, np.ndarray)):
        data = encode_image(image)
        return _Source(index, len(data), data)
    if hasattr(image, "read"):
        return _Stream(index, image)
    raise _not_an_image(image)


# Bytes asked of a stream at a time: a pipe gives at most 64 KiB a read anyway.
_READ_CHUNK = 1024 * 1024


def _read_at_most(file: IO[bytes], most: int) -> bytes | None:
    """The stream's bytes to its end, or None once they are `most` or more."""
    chunks: list[bytes] = []
    size = 0
    while size < most:
        chunk = file.read(min(_READ_CHUNK, most - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    return None


class _Transport(Protocol):
    def infer(
        self, data: bytes, model: str, color_mode: str, params: Mapping[str, str]
    ) -> ImageResult: ...

    def infer_batch(
        self,
        images: Sequence[tuple[str, bytes]],
        model: str,
        color_mode: str,
        params: Mapping[str, str],
    ) -> list[ImageResult]: ...

    def extra_parts(self, params: Mapping[str, str]) -> int:
        """Parts of a multipart request the parameters take besides its images."""
        ...

    def list_models(self) -> list[ModelInfo]: ...

    def limits(self) -> Limits: ...

    def close(self) -> None: ...


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channels: int = DEFAULT_CHANNELS,
        ca_cert: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
    ) -> None:
        scheme, target = _parse_url(url)
        _check_timeout(timeout)
        _check_count("max_message_bytes", max_message_bytes, MAX_MESSAGE_BYTES)
        _check_count("channels", channels, MAX_CHANNELS)
        _check_token(token)
        tls = TlsFiles.of(ca_cert, client_cert, client_key)
        if tls is not None and scheme not in ("grpcs", "https"):
            # Sent in plaintext after all, and the files silently unused.
            raise ValueError(f"{url!r}: certificate files need a grpcs:// or https:// URL")
        if tls is not None:
            tls.check()
        self.model = model
        self._closed = False
        # Calls under way, so that close() while other threads call lets them finish, alike
        # on both protocols (a closed grpc channel cancels its calls; requests' do not).
        self._lock = threading.Lock()
        self._calls = 0
        self._transport: _Transport
        self._limits: Limits | None = None
        # What this client itself will send in one message; HTTP has no such cap.
        self._max_send: int | None = None
        if scheme in ("grpc", "grpcs"):
            from clients.grpc_transport import GrpcTransport

            if scheme == "grpcs" and tls is None:
                # No files: the system's CAs, as over https://. Left None, it was plaintext.
                tls = TlsFiles(None, None, None)
            self._transport = GrpcTransport(
                target,
                timeout,
                max_message_bytes,
                channels,
                tls if scheme == "grpcs" else None,
                token,
            )
            self._max_send = max_message_bytes
        else:
            from clients.http_transport import HttpTransport

            self._transport = HttpTransport(target, timeout, tls, token)

    def infer(
        self,
        image: ImageLike,
        *,
        model: str | None = None,
        color_mode: str = "color",
        params: Mapping[str, str] | None = None,
    ) -> ImageResult:
        """The model's result for one image; raises GatewayClientError if the image fails.

        An image over the gateway's per-image byte cap, or too large for any request, raises
        the error `infer_batch` would give it, without being sent (a regular file is not even
        read; a pipe, device or file object no further than a byte past the cap)."""
        with self._call():
            return self._infer(image, model, color_mode, params)

    def _infer(
        self,
        image: ImageLike,
        model: str | None,
        color_mode: str,
        params: Mapping[str, str] | None,
    ) -> ImageResult:
        _check_color_mode(color_mode)
        params = _checked_params(params)
        model = self._model(model)
        pending = _pending(0, image)
        limits = self._published_limits()
        source = _known_size(pending, limits.max_image_bytes)
        if isinstance(source, ErrorInfo):
            raise GatewayClientError(source.code, source.message, "")
        cap = self._cap(limits)
        # Over HTTP a raw image is the whole body, its parameters in the URL; over gRPC, or
        # with parameters in a multipart body, there are a few fields around it.
        framing = 0
        if self._max_send is not None or self._transport.extra_parts(params):
            framing = _IMAGE_OVERHEAD + len(model) + _size(params)
        error = _too_large(source.size, limits.max_image_bytes, cap - framing, cap)
        if error is not None:
            raise GatewayClientError(error.code, error.message, "")
        return self._transport.infer(source.load(), model, color_mode, params)

    def infer_batch(
        self,
        images: Sequence[ImageLike],
        *,
        model: str | None = None,
        color_mode: str = "color",
        params: Mapping[str, str] | None = None,
    ) -> list[ImageResult]:
        """One result per image, in order; a bad image fails only its own result; no images,
        no results.

        Any number of images: they go in as many requests, one after another, as the gateway's
        published limits (`limits()`: images, parts, bytes and pixels a request) need. Files are
        read when their request is sent; pipes, devices and file objects before the first, each
        no further than a byte past the per-image byte cap. An image over that cap fails as the
        gateway would fail it (`image_too_large`), and one too large for any request
        (`payload_too_large`), without being sent. An error of a whole request (an unknown
        model, an overloaded gateway, ...) raises GatewayClientError.
        """
        with self._call():
            return self._infer_batch(images, model, color_mode, params)

    def _infer_batch(
        self,
        images: Sequence[ImageLike],
        model: str | None,
        color_mode: str,
        params: Mapping[str, str] | None,
    ) -> list[ImageResult]:
        if (
            isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview))
            or (isinstance(images, np.ndarray) and images.ndim != 4)
            or hasattr(images, "read")
        ):
            # A path was sent as one image per character, an array as one per row (and a
            # file would be one per line).
            raise TypeError(
                f"infer_batch takes a list of images, not one {type(images).__name__}: "
                "use infer(image) or infer_batch([image])"
            )
        _check_color_mode(color_mode)
        params = _checked_params(params)
        pending = [_pending(i, image) for i, image in enumerate(images)]
        if not pending:
            return []
        call = _Call(self._transport, self._model(model), color_mode, params)
        limits = self._published_limits()
        cap = self._cap(limits)
        room = cap - _REQUEST_OVERHEAD - len(call.model) - _size(params)
        results: list[ImageResult | None] = [None] * len(pending)
        sendable = []
        for item in pending:
            source = _known_size(item, limits.max_image_bytes)
            error = (
                source
                if isinstance(source, ErrorInfo)
                else _too_large(source.size, limits.max_image_bytes, room - _IMAGE_OVERHEAD, cap)
            )
            if error is not None:
                results[item.index] = ImageResult(str(item.index), None, error=error)
            else:
                assert isinstance(source, _Source)
                sendable.append(source)
        # Parameters that travel as multipart text fields are parts of each request too.
        per_request = max(
            1, min(limits.max_images, limits.max_parts - self._transport.extra_parts(params))
        )
        for chunk in _chunks(sendable, per_request, room):
            for i, result in call.send_splitting([(s.index, s.load()) for s in chunk]):
                results[i] = result
        return [r for r in results if r is not None]

    def _cap(self, limits: Limits) -> int:
        """The most one request may carry: the gateway's cap, and this client's own over gRPC."""
        if self._max_send is None:
            return limits.max_request_bytes
        return min(limits.max_request_bytes, self._max_send)

    def _published_limits(self) -> Limits:
        # Asked once per client: a gateway's limits are fixed while it runs.
        if self._limits is None:
            self._limits = self._transport.limits()
        return self._limits

    def list_models(self) -> list[ModelInfo]:
        with self._call():
            return self._transport.list_models()

    def limits(self) -> Limits:
        """The gateway's limits: request and image bytes, images, parts, pixels, timeout."""
        with self._call():
            return self._transport.limits()

    def close(self) -> None:
        """No new calls; the calls other threads have under way finish first, then the
        connections close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._calls == 0
        if idle:
            self._transport.close()

    @contextmanager
    def _call(self) -> Iterator[None]:
        # Alike on both protocols: a closed requests session would quietly open new
        # connections, and a closed grpc channel raise its own ValueError. A grpc channel
        # closed under way also cancelled the calls of other threads, which requests let
        # finish: it now closes when the last of them ends.
        with self._lock:
            if self._closed:
                raise ValueError("the client is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                last = self._closed and self._calls == 0
            if last:
                self._transport.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self, model: str | None) -> str:
        return self.model if model is None else model


# What a request adds around its images, at most: multipart part headers or protobuf framing
# per image, and the request's own fields.
_IMAGE_OVERHEAD = 256
_REQUEST_OVERHEAD = 4096


# An image and its position in the caller's list, which names it on the wire.
_Item = tuple[int, bytes]


def _size(params: Mapping[str, str]) -> int:
    """Bytes the parameters take in a request at most: a multipart text field's headers, its
    name escaped, are the most framing around one."""
    return sum(3 * len(k.encode()) + len(v.encode()) + 128 for k, v in params.items())


# The most a gateway takes of a request's parameters: a gRPC request's `parameters` Struct,
# serialized, or one HTTP text field (gateway/rpc/wire.py, gateway/rest/requests.py).
MAX_PARAMETER_BYTES = 64 * 1024


def parameter_bytes(params: Mapping[str, str]) -> int:
    """The parameters' size as a gRPC request carries them, a Struct of string Values, which
    is what the gateway's 64 KiB bounds."""
    struct = struct_pb2.Struct()
    struct.update(params)
    return int(struct.ByteSize())


def _too_large(size: int, max_image_bytes: int, fits: int, cap: int) -> ErrorInfo | None:
    """The error an image gets without being sent: the gateway's own (gateway/core/limits.py)
    for one over its per-image cap, or payload_too_large for one over the `fits` bytes its
    request leaves it of the `cap` (over gRPC grpc itself would refuse the message, without
    the gateway's error code)."""
    if size > max_image_bytes:
        return ErrorInfo("image_too_large", _over_image_bytes(str(size), max_image_bytes))
    if size > fits:
        message = (
            f"the image is {size} bytes; with its request around it that is over the {cap} "
            "bytes a request may carry (the gateway's max_request_bytes, or this client's "
            "max_message_bytes)"
        )
        return ErrorInfo("payload_too_large", message)
    return None


def _over_image_bytes(size: str, max_image_bytes: int) -> str:
    # The gateway's words (gateway/core/limits.py); a stream cut off at the cap has no size.
    return (
        f"the image is {size} bytes; this gateway takes at most {max_image_bytes} bytes per image"
    )


def _known_size(item: _Source | _Stream, max_image_bytes: int) -> _Source | ErrorInfo:
    return item if isinstance(item, _Source) else item.read(max_image_bytes)


def _chunks(images: list[_Source], max_images: int, max_bytes: int) -> list[list[_Source]]:
    """Consecutive runs of images, each within max_images and max_bytes."""
    chunks: list[list[_Source]] = []
    size = 0
    for source in images:
        cost = source.size + _IMAGE_OVERHEAD
        if not chunks or len(chunks[-1]) >= max_images or size + cost > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(source)
        size += cost
    return chunks


@dataclass(frozen=True)
class _Call:
    transport: _Transport
    model: str
    color_mode: str
    params: Mapping[str, str]

    def send(self, images: Sequence[_Item]) -> list[ImageResult]:
        named = [(str(i), data) for i, data in images]
        return self.transport.infer_batch(named, self.model, self.color_mode, self.params)

    def send_splitting(self, images: list[_Item]) -> list[tuple[int, ImageResult]]:
        """Send; a request refused for the pixels of all its images together (read from their
        headers, which the client does not parse) is sent again as two halves, and a single
        image refused so is that image's own error."""
        try:
            return [(i, r) for (i, _), r in zip(images, self.send(images), strict=True)]
        except GatewayClientError as exc:
            if exc.code not in _IMAGE_CAUSED:
                raise
            if len(images) == 1:
                i = images[0][0]
                return [(i, ImageResult(str(i), None, error=ErrorInfo(exc.code, exc.message)))]
            half = len(images) // 2
            return self.send_splitting(images[:half]) + self.send_splitting(images[half:])


# Request errors that one image alone can cause: too many pixels in all, or a body too large.
_IMAGE_CAUSED = frozenset({"too_many_pixels", "payload_too_large"})


# RFC 6750's token68, what a gateway's --auth-token-file holds: anything else is refused by
# every gateway, and a line break would have ended the header (grpc refuses metadata with one
# only at the first call).
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MIN_TOKEN_LENGTH = 16


def _check_token(token: str | None) -> None:
    if token is not None and not (_TOKEN.fullmatch(token) and len(token) >= _MIN_TOKEN_LENGTH):
        raise ValueError(
            f"token must be at least {_MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
            "(then any '='), as a gateway's tokens are"
        )


_SCHEMES = ("grpc", "grpcs", "http", "https")


def _parse_url(url: str) -> tuple[str, str]:
    """The scheme, and what the transport connects to: host:port for grpc://, the base URL
    (a proxy's path prefix kept, trailing slashes not) for http:// and https://. What a
    transport would drop or misread is refused here, rather than sent somewhere else."""
    usage = "use grpc://host:port, grpcs://host:port (TLS), http://host:port or https://..."
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises for a port that is no number or out of range
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"{url!r}: {usage}")
    _check_port(port)
    if not parts.hostname:
        # grpc would fail each call as if a gateway had answered UNKNOWN.
        raise ValueError(f"{url!r} names no host: {usage}")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        # Over HTTP "?x=1" went before each path ("/?x=1/v1/infer": the browser page).
        raise ValueError(f"{url!r}: a gateway URL has no query or fragment")
    if scheme not in ("grpc", "grpcs"):
        return scheme, urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    if parts.path.strip("/"):
        # gRPC calls name their own paths: a prefix was dropped without a word.
        raise ValueError(f"{url!r}: a {scheme}:// URL has no path, only {scheme}://host:port")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: a {scheme}:// URL has no user or password")
    if port is None:
        # grpc went to 443, the port of TLS, in plaintext.
        raise ValueError(f"{url!r} names no port: use {scheme}://host:port")
    return scheme, parts.netloc


def _check_port(port: int | None) -> None:
    # grpc itself would take a port past 65535 modulo 65536: another service, silently.
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")


# Seconds: a deadline grpc and urllib3 can still compute (urllib3 overflowed at about 9e9).
MAX_TIMEOUT = 1_000_000.0


def _check_count(name: str, value: int, most: int) -> None:
    """A whole number from 1 to `most`, on both protocols alike (HTTP uses neither): "4" or 2.5
    had raised a bare TypeError from grpc, 2**40 an OverflowError, 0 for max_message_bytes
    failed every image as payload_too_large, and -1 is "no limit" to grpc."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be a whole number from 1 to {most}, not {value!r}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not (
        isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT
    ):
        raise ValueError(
            f"timeout must be a number of seconds over 0 and at most {MAX_TIMEOUT:g}, or None "
            f"for none, not {timeout!r}"
        )


def _checked_params(params: Mapping[str, str] | None) -> dict[str, str]:
    """Model parameters travel as text on both protocols (HTTP query parameters, gRPC string
    values), so a model reads the same values whichever way they came."""
    params = dict(params or {})
    for key, value in params.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"parameters are str -> str; {key!r}: {value!r} is not")
        if key == "color_mode":
            raise ValueError("color_mode is an argument of its own, not a model parameter")
    size = parameter_bytes(params)
    if size > MAX_PARAMETER_BYTES:
        # Refused alike on both protocols: over HTTP they may go as several text fields, each
        # within the gateway's cap, where gRPC's one Struct would be over it.
        raise GatewayClientError(
            "payload_too_large",
            f"the parameters take {size} bytes as a gRPC request carries them; a gateway takes "
            f"at most {MAX_PARAMETER_BYTES} (as one HTTP text field)",
            "",
        )
    return params


def _check_color_mode(color_mode: str) -> None:
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES}")

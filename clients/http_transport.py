"""The HTTP side of GatewayClient: octet-stream for one image, multipart for a batch."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus, urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from clients.results import (
    BAD_RESPONSE,
    GatewayClientError,
    ImageResult,
    Limits,
    ModelInfo,
    client_deadline,
    time_left,
    unreachable,
)
from clients.tls import TlsFiles

T = TypeVar("T")

# Connections kept open for reuse. requests keeps 10 by default; a client calling from more
# threads than that closed the extra ones after each call and opened new ones for the next.
POOL_SIZE = 32

# The most of the answer's body one read returns. Each read is one recv at most (read1), so
# that the clock is looked at again however slowly the bytes come.
READ_SIZE = 65536


# Bytes of the URL's query the client fills with parameters; the rest go as multipart text
# fields. The query had taken them all, and 40 KB of UTF-8, tripled by percent-encoding, went
# over the gateway's 64 KiB for a request's line and headers (headers_too_large) where gRPC
# took them. This is well under that, and under the 8 KiB nginx takes for a request line.
QUERY_BYTES = 4096

# Names that stay in the query whatever their size: a text field named as a file part ("" for
# a single image, "0", "1", ... in a batch) is duplicate_part, and a "%" in a field's name is
# read back as an escape (urllib3 writes '"' in a name as %22, which the parser decodes).
_QUERY_ONLY_NAME = re.compile(r"[0-9]*|.*%.*", re.DOTALL)

# The HTTP status the gateway answers a raw image's error with (README, Errors): a multipart
# answer gives an image's error in its result, and no status of its own.
_IMAGE_ERROR_STATUS = {
    "empty_image": "400",
    "undecodable_image": "422",
    "unsupported_format": "415",
    "image_too_large": "413",
}


def split_params(
    params: Mapping[str, str], color_mode: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The query parameters and the multipart text fields a call sends: one set to the gateway.
    The query takes the shortest first, so that many short parameters do not become parts
    (each counts against the gateway's max_parts)."""
    query = {"color_mode": color_mode}
    fields: dict[str, str] = {}
    room = QUERY_BYTES - len("color_mode=unchanged&")  # the longest, for any color_mode
    for key, value in sorted(params.items(), key=lambda kv: len(_encoded(*kv))):
        cost = len(_encoded(key, value)) + 1
        if cost <= room or _QUERY_ONLY_NAME.fullmatch(key):
            query[key] = value
            room -= cost
        else:
            fields[key] = value
    return query, fields


def _encoded(key: str, value: str) -> str:
    # As requests writes a query (urlencode).
    return f"{quote_plus(key)}={quote_plus(value)}"


def _closed_before_answer(exc: requests.ConnectionError) -> bool:
    """Whether the gateway closed or reset the connection before any byte of its answer came,
    which a reused keep-alive connection meets when the gateway closes it (idle for 10 s, its
    worker replaced, a restart) just as the request goes out on it.

    requests raises ConnectionError(ProtocolError("Connection aborted.", error)) for an error
    while urllib3 sends the request or waits for the answer's head: RemoteDisconnected (a
    ConnectionResetError) when the connection closed before the first byte of the status line,
    ConnectionResetError when it was reset. Failing to connect at all is another reason
    (MaxRetryError of NewConnectionError), a timeout is requests.Timeout, and a connection lost
    within the answer's body ChunkedEncodingError: none of these is the case.
    """
    reason = exc.args[0] if exc.args else None
    return isinstance(reason, ProtocolError) and any(
        isinstance(arg, ConnectionResetError) for arg in reason.args
    )


class _Bearer(AuthBase):
    def __init__(self, token: str) -> None:
        self.header = f"Bearer {token}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self.header
        return request


def error_from_body(body: Any, status: str) -> GatewayClientError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):  # not the gateway's error shape: a proxy's, say
        return GatewayClientError("unknown", str(body)[:200], status)
    return GatewayClientError(
        str(error.get("code", "unknown")),
        str(error.get("message", "")),
        status,
        str(error.get("request_id", "")),
    )


def _not_http1(base_url: str, exc: requests.ConnectionError) -> GatewayClientError | None:
    """bad_response for an answer that is not HTTP/1.x at all, None for any other failure. An
    http:// URL with a gRPC port got grpc's HTTP/2 SETTINGS frame back, reported as a gateway
    that did not answer, its bytes quoted."""
    reason = exc.args[0] if exc.args else None
    if not isinstance(reason, ProtocolError):
        return None
    bad = next((a for a in reason.args if isinstance(a, http.client.BadStatusLine)), None)
    if bad is None:
        return None
    line = str(bad.args[0]) if bad.args else ""
    # A frame header: a 3-byte length, then type 4 (SETTINGS), the first frame a server sends.
    if len(line) >= 4 and line[3] == "\x04":
        what = "HTTP/2 (a gRPC port? Its URL is grpc://, or grpcs:// with TLS)"
    else:
        what = f"{line[:60]!r}, not an HTTP/1.1 status line"
    return GatewayClientError(BAD_RESPONSE, f"{base_url} answered with {what}", "")


def _bad_response(response: requests.Response, body: bytes) -> GatewayClientError:
    return GatewayClientError(
        BAD_RESPONSE,
        f"not a gateway's answer ({response.headers.get('Content-Type', 'no Content-Type')}): "
        f"{body[:200].decode('utf-8', 'replace')}",
        str(response.status_code),
    )


def _refuse_redirected_post(response: requests.Response, **kwargs: Any) -> None:
    """A response hook: a 301, 302 or 303 answer to a POST raises bad_response naming where it
    points, rather than being followed. requests follows those with a GET to the new location
    (browsers' rule), which the gateway answered method_not_allowed, an error that said nothing
    of the redirect. 307 and 308 keep the method and body (ours are bytes, sent again as they
    are) and are followed, as are redirects of a GET."""
    request = response.request
    if request.method != "POST" or response.status_code not in (301, 302, 303):
        return
    if not response.is_redirect:  # no Location: not followed, read as any other answer
        return
    response.close()  # its body unread: the connection is closed, not reused
    location = urljoin(response.url, response.headers["Location"])
    raise GatewayClientError(
        BAD_RESPONSE,
        f"POST {urlsplit(response.url).path} was redirected to {location}, which the client "
        "does not follow (requests would send the call there as a GET): give the client "
        f"{_base_url(location, request.url)}",
        str(response.status_code),
    )


def _base_url(location: str, request_url: str | None) -> str:
    """What to give the client instead of its URL: `location` without the route the call was
    sent to (/v1/infer, /v1/models/NAME/infer) when it ends with it, else that URL."""
    route = urlsplit(request_url or "").path
    route = route[route.rfind("/v1/") :]  # a model's name has its slashes percent-encoded
    scheme, netloc, path, _, _ = urlsplit(location)
    if not route.startswith("/v1/") or not path.endswith(route):
        return "that URL"
    return f"the URL {urlunsplit((scheme, netloc, path[: -len(route)], '', ''))}"


class HttpTransport:
    def __init__(
        self,
        base_url: str,
        timeout: float | None,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.session = requests.Session()
        if token is not None:
            # As the session's auth, not one of its headers: requests fills in a call without
            # auth from ~/.netrc (or $NETRC) over the headers, and a netrc entry for the host,
            # or a default one, was sent instead of the token.
            self.session.auth = _Bearer(token)
        # Given with each request: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override
        # a session's `verify`, and a client given ca_cert checked the gateway against the
        # environment's CAs instead. None leaves requests' default (those variables, certifi).
        self._verify: str | None = None
        if tls is not None:
            for path in (tls.ca_cert, tls.client_cert, tls.client_key):
                if path is not None and not path.is_file():  # as over gRPC: found out now
                    raise FileNotFoundError(f"{path}: no such file")
            if tls.ca_cert is not None:
                self._verify = str(tls.ca_cert)
            if tls.client_cert is not None and tls.client_key is not None:
                self.session.cert = (str(tls.client_cert), str(tls.client_key))
        self.session.hooks["response"].append(_refuse_redirected_post)
        adapter = HTTPAdapter(pool_maxsize=POOL_SIZE)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _infer_url(self, model: str) -> str:
        if not model:
            return f"{self.base_url}/v1/infer"
        segment = quote(model, safe="")
        if segment in (".", ".."):
            # A dot segment would be resolved away ("/v1/models/../infer" is "/v1/infer", the
            # default model): sent percent-encoded, it stays a name the gateway can refuse.
            segment = segment.replace(".", "%2E")
        return f"{self.base_url}/v1/models/{segment}/infer"

    def _send(self, method: str, url: str, **kwargs: Any) -> tuple[requests.Response, bytes]:
        """The request and its answer's body, its failures to get an answer as
        GatewayClientError, as over gRPC; all within the client's timeout.

        A request whose connection the gateway closed before answering is sent once more, on
        a new connection and within what is left of the timeout: every call of the API is
        idempotent (the same image gives the same answer)."""
        started = time.monotonic()
        try:
            return self._attempt(method, url, started, **kwargs)
        except requests.ConnectionError as exc:
            if not _closed_before_answer(exc):
                raise _not_http1(self.base_url, exc) or unreachable(
                    self.base_url, str(exc)
                ) from None
        # urllib3 put the failed connection back in its pool as an empty slot, which this
        # thread takes next (unless another thread gave a connection back meanwhile, one that
        # has just answered): it connects anew.
        try:
            return self._attempt(method, url, started, **kwargs)
        except requests.ConnectionError as exc:
            raise unreachable(self.base_url, str(exc)) from None

    def _attempt(
        self, method: str, url: str, started: float, **kwargs: Any
    ) -> tuple[requests.Response, bytes]:
        """One request, with what is left of the call's timeout (from `started`), and its
        answer's body; requests.ConnectionError when no answer came."""
        # requests' timeout bounds connecting and each socket read, not their sum: it holds
        # for the request and the answer's head, and _body reads the rest against the clock.
        timeout = time_left(self.timeout, started)
        try:
            response = self.session.request(
                method, url, timeout=timeout, verify=self._verify, stream=True, **kwargs
            )
        except requests.Timeout:
            raise client_deadline(self.timeout) from None
        except requests.ConnectionError as exc:
            if exc.args and isinstance(exc.args[0], ReadTimeoutError):
                # A timeout within a redirect's body, which requests raises as ConnectionError.
                raise client_deadline(self.timeout) from None
            raise
        try:
            return response, self._body(response, started)
        finally:
            # Read to its end, the connection is back in the pool already and this does
            # nothing; cut short by an error, it closes the connection, whose next bytes
            # would be the rest of this answer, rather than letting it be used again.
            response.close()

    def _body(self, response: requests.Response, started: float) -> bytes:
        """The answer's body, read by the time the call's timeout is up. requests would apply
        the timeout to each socket read: a body arriving a byte at a time, each within the
        timeout, could take any time at all. Here each read gets what is left of the timeout,
        and returns whatever one recv brings, so the clock is seen again between bytes (and
        first once the head is in: a head that came too late is a timeout too)."""
        chunks: list[bytes] = []
        try:
            while True:
                left = time_left(self.timeout, started)
                connection = response.raw.connection  # None once read and back in the pool
                if left is not None and connection is not None and connection.sock is not None:
                    connection.sock.settimeout(left)
                chunk = response.raw.read1(READ_SIZE, decode_content=True)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        except ReadTimeoutError:
            raise client_deadline(self.timeout) from None
        except (ProtocolError, SSLError) as exc:
            # The connection lost within the answer's body: what requests raises as
            # ChunkedEncodingError (or SSLError), no answer to the caller.
            raise unreachable(self.base_url, str(exc)) from None
        except DecodeError:
            raise _bad_response(
                response, b"(a body its Content-Encoding does not decode)"
            ) from None

    def _read(self, response: requests.Response, body: bytes, read: Callable[[Any], T]) -> T:
        """`read` applied to the answer's JSON; an answer of another shape (another service
        on that port, a proxy's page) is bad_response, not a KeyError or TypeError."""
        try:
            parsed = json.loads(body)
        except ValueError:
            raise _bad_response(response, body) from None
        if response.status_code >= 400:
            raise error_from_body(parsed, str(response.status_code))
        try:
            return read(parsed)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise _bad_response(response, body) from None

    def infer(
        self, data: bytes, model: str, color_mode: str, params: Mapping[str, str]
    ) -> ImageResult:
        query, fields = split_params(params, color_mode)
        if fields:
            return self._infer_multipart(data, model, query, fields)
        response, body = self._send(
            "POST",
            self._infer_url(model),
            data=data,
            params=query,
            headers={"Content-Type": "application/octet-stream"},
        )
        return self._read(response, body, lambda answer: ImageResult.from_dict(answer["result"]))

    def _infer_multipart(
        self, data: bytes, model: str, query: Mapping[str, str], fields: Mapping[str, str]
    ) -> ImageResult:
        """One image with parameters a raw body's query cannot hold: a multipart body of one
        file part, named "" as a raw body's image is, its error raised as a raw body's is."""
        response, body = self._send(
            "POST",
            self._infer_url(model),
            params=query,
            data=fields,
            files=[("", ("", data, "application/octet-stream"))],
        )
        result, request_id = self._read(
            response,
            body,
            lambda answer: (ImageResult.from_dict(answer["results"][0]), answer["request_id"]),
        )
        if result.error is not None:
            status = _IMAGE_ERROR_STATUS.get(result.error.code, str(response.status_code))
            raise GatewayClientError(
                result.error.code, result.error.message, status, str(request_id)
            )
        return result

    def infer_batch(
        self,
        images: Sequence[tuple[str, bytes]],
        model: str,
        color_mode: str,
        params: Mapping[str, str],
    ) -> list[ImageResult]:
        query, fields = split_params(params, color_mode)
        files = [(name, (name, data, "application/octet-stream")) for name, data in images]
        response, body = self._send(
            "POST",
            self._infer_url(model),
            files=files,
            data=fields,
            params=query,
        )
        results = self._read(
            response, body, lambda answer: [ImageResult.from_dict(r) for r in answer["results"]]
        )
        if len(results) != len(images):
            raise _bad_response(response, body)
        return results

    def extra_parts(self, params: Mapping[str, str]) -> int:
        return len(split_params(params, "color")[1])  # the same split for every color_mode

    def list_models(self) -> list[ModelInfo]:
        response, body = self._send("GET", f"{self.base_url}/v1/models")
        return self._read(
            response, body, lambda answer: [ModelInfo.from_dict(m) for m in answer["models"]]
        )

    def limits(self) -> Limits:
        response, body = self._send("GET", f"{self.base_url}/v1/limits")
        return self._read(response, body, Limits.from_dict)

    def close(self) -> None:
        self.session.close()

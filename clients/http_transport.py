"""The HTTP side of GatewayClient: octet-stream for one image, multipart for a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from clients.results import UNREACHABLE, GatewayClientError, ImageResult, Limits, ModelInfo

# Connections kept open for reuse. requests keeps 10 by default; a client calling from more
# threads than that closed the extra ones after each call and opened new ones for the next.
POOL_SIZE = 32


def error_from_body(body: Any, status: str) -> GatewayClientError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return GatewayClientError(
        error.get("code", "unknown"),
        error.get("message", str(body)),
        status,
        error.get("request_id", ""),
    )


class HttpTransport:
    def __init__(self, base_url: str, timeout: float | None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.session = requests.Session()
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

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """The request, its failures to get an answer as GatewayClientError, as over gRPC."""
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise GatewayClientError("deadline_exceeded", str(exc), "") from None
        except requests.ConnectionError as exc:
            raise GatewayClientError(UNREACHABLE, str(exc), "") from None

    def _check(self, response: requests.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            raise GatewayClientError(
                "bad_response", response.text[:200], str(response.status_code)
            ) from None
        if response.status_code >= 400:
            raise error_from_body(body, str(response.status_code))
        return body

    def infer(
        self, data: bytes, model: str, color_mode: str, params: Mapping[str, str]
    ) -> ImageResult:
        response = self._send(
            "POST",
            self._infer_url(model),
            data=data,
            params={**params, "color_mode": color_mode},
            headers={"Content-Type": "application/octet-stream"},
        )
        return ImageResult.from_dict(self._check(response)["result"])

    def infer_batch(
        self,
        images: Sequence[tuple[str, bytes]],
        model: str,
        color_mode: str,
        params: Mapping[str, str],
    ) -> list[ImageResult]:
        files = {name: (name, data, "application/octet-stream") for name, data in images}
        response = self._send(
            "POST",
            self._infer_url(model),
            files=files,
            params={**params, "color_mode": color_mode},
        )
        return [ImageResult.from_dict(r) for r in self._check(response)["results"]]

    def list_models(self) -> list[ModelInfo]:
        response = self._send("GET", f"{self.base_url}/v1/models")
        return [ModelInfo.from_dict(m) for m in self._check(response)["models"]]

    def limits(self) -> Limits:
        response = self._send("GET", f"{self.base_url}/v1/limits")
        return Limits.from_dict(self._check(response))

    def close(self) -> None:
        self.session.close()

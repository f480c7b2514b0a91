"""The gRPC side of GatewayClient, over the generated stubs."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import grpc
from google.protobuf import json_format

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from clients.results import (
    ErrorInfo,
    GatewayClientError,
    ImageInfo,
    ImageResult,
    Limits,
    ModelInfo,
    client_deadline,
    time_left,
    unreachable,
)
from clients.tls import TlsFiles

_COLOR_MODES = {
    "color": pb.COLOR_MODE_COLOR,
    "grayscale": pb.COLOR_MODE_GRAYSCALE,
    "unchanged": pb.COLOR_MODE_UNCHANGED,
}


# Past this a double is not exact as an integer; the gateway sends integral numbers up to it
# as ints and larger ones as floats (1e16 goes over HTTP as 1e+16).
MAX_EXACT_INT = 2**53


def normalise_json(value: Any) -> Any:
    """gRPC carries every number as a double; the gateway sends integral numbers up to 2**53 as
    ints, so turning those doubles back into ints gives exactly what the HTTP front sends. Object
    keys come sorted, as `canonical_output` sorts them over HTTP, in the same pass."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
        return int(value)
    if isinstance(value, list):
        return [normalise_json(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise_json(value[k]) for k in sorted(value)}
    return value


def result_from_pb(result: pb.ImageResult) -> ImageResult:
    info = None
    if result.HasField("info"):
        i = result.info
        info = ImageInfo(i.width, i.height, i.channels, i.format)
    if result.WhichOneof("outcome") == "error":
        return ImageResult(
            result.name, info, None, ErrorInfo(result.error.code, result.error.message)
        )
    output = normalise_json(json_format.MessageToDict(result.output))
    return ImageResult(result.name, info, output)


# What grpc raises when no answer came: no gateway there, or the client's own deadline.
_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _error_code(exc: grpc.RpcError) -> str | None:
    """The gateway's error code in a failed call's trailers; None when the gateway gave none."""
    code = dict(exc.trailing_metadata() or ()).get("error-code")
    return None if code is None else str(code)


def error_from_rpc(exc: grpc.RpcError, target: str, timeout: float | None) -> GatewayClientError:
    trailing = dict(exc.trailing_metadata() or ())
    code = trailing.get("error-code")
    if code is None and exc.code() in _NO_ANSWER:
        # The gateway names its refusals in the trailers; without them, such a status is
        # grpc's own, made on this side, and no answer came: the error HTTP gives, status "".
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return client_deadline(timeout)
        return unreachable(target, exc.details() or "")
    if code is None:
        # grpc's own answer to a message over a size limit (the gateway's, or this client's).
        code = (
            "payload_too_large" if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "unknown"
        )
    return GatewayClientError(
        str(code),
        exc.details() or "",
        exc.code().name,
        str(trailing.get("x-request-id", "")),
    )


MAX_RECONNECT_BACKOFF_MS = 2000
# grpc's own retry (gRFC A6), for one case: a call the gateway's grpc cancelled before any
# handler saw it, because that worker was shutting down (replaced in a reload, say) as the call
# arrived (grpc/grpc#41785). The gateway's own CANCELLED goes only to clients that have left,
# grpc retries a call only before its answer has begun, and the gateway's calls are idempotent.
RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": pb.DESCRIPTOR.services_by_name["ImageGatewayService"].full_name}
                ],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["CANCELLED"],
                },
            }
        ]
    }
)


class GrpcTransport:
    """Calls go round `channels` channels, each its own TCP connection: a gateway with several
    worker processes gives each connection to one of them, so a client calling from several
    threads over one connection would keep all but one worker idle. A local subchannel pool
    per channel is what makes grpc open a connection for each instead of sharing one."""

    def __init__(
        self,
        target: str,
        timeout: float | None,
        max_message_bytes: int,
        channels: int = 1,
        # None for plaintext (grpc://); a TlsFiles of no files for TLS with the system's CAs.
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        # A TLS gateway that refuses this client's certificate, or its want of one, closes the
        # connection, which grpc reports as no answer ("Socket closed"): the words say TLS.
        self._where = target if tls is None else f"{target} over TLS"
        self.timeout = timeout
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            # Answers are not capped, as over HTTP: a model's large output refused on arrival
            # would have been computed for nothing (and a batch split and computed again).
            ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),
            # grpc's backoff between connection attempts grows to 120 s: a gateway back after
            # a 40 s restart stayed "unreachable" to this client for 26 s more.
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.service_config", RETRY_CONFIG),
            # A call is retried only while grpc holds all of its message (256 KiB by default).
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ]
        if tls is None:
            self.channels = [grpc.insecure_channel(target, options) for _ in range(channels)]
        else:
            ca, key, chain = tls.read()
            credentials = grpc.ssl_channel_credentials(ca, key, chain)
            self.channels = [
                grpc.secure_channel(target, credentials, options) for _ in range(channels)
            ]
        stubs = [pb_grpc.ImageGatewayServiceStub(channel) for channel in self.channels]
        # Each call takes the next stub: one C call, safe from several threads under the GIL.
        self._stub = itertools.cycle(stubs).__next__

    def _call(self, method: str, request: Any) -> Any:
        """The answer to a call on the next channel, its failures as GatewayClientError.

        A call that got no answer and no word from the gateway (UNAVAILABLE without its
        error-code) is sent once more, on the channel after, within what is left of the
        timeout, as HTTP sends again a call whose connection closed unanswered: above all a
        call whose new connection a worker retiring in a reload reset, which grpc fails, with
        every other call of that channel, until its reconnect backoff is over, while the
        client's other connections reach the workers that serve on. Every call of the API is
        idempotent. A gateway that is not there is still unreachable at once."""
        started = time.monotonic()
        try:
            return getattr(self._stub(), method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or _error_code(exc) is not None:
                raise error_from_rpc(exc, self._where, self.timeout) from None
        timeout = time_left(self.timeout, started)
        try:
            return getattr(self._stub(), method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._where, self.timeout) from None

    def _common(self, model: str, color_mode: str, params: Mapping[str, str]) -> dict[str, Any]:
        common: dict[str, Any] = {"model": model, "color_mode": _COLOR_MODES[color_mode]}
        if params:
            struct = pb.InferRequest().parameters
            struct.update(dict(params))
            common["parameters"] = struct
        return common

    def infer(
        self, data: bytes, model: str, color_mode: str, params: Mapping[str, str]
    ) -> ImageResult:
        request = pb.InferRequest(
            image=pb.Image(data=data), **self._common(model, color_mode, params)
        )
        return result_from_pb(self._call("Infer", request).result)

    def infer_batch(
        self,
        images: Sequence[tuple[str, bytes]],
        model: str,
        color_mode: str,
        params: Mapping[str, str],
    ) -> list[ImageResult]:
        request = pb.InferBatchRequest(
            images=[pb.Image(data=data, name=name) for name, data in images],
            **self._common(model, color_mode, params),
        )
        return [result_from_pb(r) for r in self._call("InferBatch", request).results]

    def extra_parts(self, params: Mapping[str, str]) -> int:
        return 0  # one Struct field, whatever the parameters

    def list_models(self) -> list[ModelInfo]:
        response = self._call("ListModels", pb.ListModelsRequest())
        return [
            ModelInfo(
                m.name,
                m.description,
                m.is_default,
                (
                    (m.min_input_size.width, m.min_input_size.height)
                    if m.HasField("min_input_size")
                    else None
                ),
                (
                    (m.batching.max_batch_size, m.batching.max_batch_wait_ms)
                    if m.HasField("batching")
                    else None
                ),
            )
            for m in response.models
        ]

    def limits(self) -> Limits:
        got = self._call("GetLimits", pb.GetLimitsRequest()).limits
        return Limits(**{f.name: getattr(got, f.name) for f in fields(Limits)})

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

"""Builds the gRPC server: grpc's examples' shape, a builder returning (server, port)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from gateway import tls
from gateway.config import Settings, published_limits, url_host
from gateway.core.access import started_at
from gateway.core.dataplane import DataPlane
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.tokens import Tokens
from gateway.rpc import wire
from gateway.rpc.arrival import arrived
from gateway.rpc.pool import WatchedPool
from gateway.rpc.servicer import (
    ERROR_CODE_KEY,
    REQUEST_ID_KEY,
    ImageGatewayServicer,
    OpenCalls,
    abort,
    call_request_id,
)

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ImageGatewayService"]
SERVICE_NAME = SERVICE.full_name
# Seconds (at most the request timeout) a new connection has to send the HTTP/2 preface and its
# SETTINGS, as the HTTP side gives a request line and headers. grpcio closed such a connection
# only after 60 s: a client that connected and sent nothing held a file descriptor six times as
# long over gRPC as over HTTP. Real clients send both at once; it does not end idle channels.
HANDSHAKE_SECONDS = 10.0
# Seconds a client has to answer a keepalive ping (at most --grpc-keepalive).
KEEPALIVE_TIMEOUT = 20.0

# grpc's handler factory for each (client streams, server streams).
_HANDLERS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _image_field(message: Descriptor) -> str | None:
    """The request's Image field (repeated or not), if it has one."""
    image = pb.Image.DESCRIPTOR.full_name
    return next(
        (f.name for f in message.fields if f.message_type and f.message_type.full_name == image),
        None,
    )


def _add_servicer(servicer: ImageGatewayServicer, server: grpc.Server, max_images: int) -> None:
    """What the generated add_ImageGatewayServiceServicer_to_server does, read from the service
    descriptor, except that a request with an Image field goes through gateway.rpc.wire, which
    leaves the image bytes where gRPC received them instead of copying them twice."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        field = _image_field(method.input_type)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        deserialize = (
            wire.detach(request_type, field, max_images) if field else request_type.FromString
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=wire.tolerant(deserialize, request_type),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _Tolerant:
    """A server as grpc's generated add_*_to_server functions see it: the handlers they register
    get request deserializers that hand the servicer a gateway.rpc.wire.Malformed for a message
    that is not valid protobuf. grpcio itself answers a deserializer that raises with INTERNAL
    ("Exception deserializing request!") and logs a traceback, as it did for a health check or
    reflection request of a few bad bytes."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers, and are added there

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        tolerant = {
            name: handler._replace(
                request_deserializer=wire.tolerant(
                    handler.request_deserializer, handler.request_deserializer.__self__
                )
            )
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, tolerant),)
        )
        self._server.add_registered_method_handlers(service, tolerant)


# grpc_health has no type stubs.
class GatewayHealth(health.HealthServicer):  # type: ignore[misc]
    """grpcio's health service, answering a request message that is not valid protobuf with
    INVALID_ARGUMENT and `invalid_request`, as the gateway's own methods do. Its unary calls
    are counted and logged by the gateway's servicer, as /healthz and /readyz are over HTTP
    (only the checks the gateway refused had been: a Check series of failures and none of its
    answers), and a Watch refused so, or ended by a stop (`end_watches`)."""

    def __init__(self, servicer: ImageGatewayServicer) -> None:
        super().__init__(experimental_non_blocking=True)
        self.servicer = servicer
        # The open Watch calls (what grpc's client-side health checking keeps open).
        self._watches = OpenCalls(servicer.log_stream_end)

    def _refuse_malformed(
        self, request: object, context: grpc.ServicerContext, method: str, started: float
    ) -> None:
        if isinstance(request, wire.Malformed):
            error = request.error()
            request_id = call_request_id(context)
            status = error.error.grpc_status
            self.servicer.log_call(method, request, None, status, request_id, started, error.code)
            abort(context, error.error, error.message, request_id)

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("Check", super().Check, request, context)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._unary("List", super().List, request, context)

    def _unary(
        self,
        method: str,
        answer: Callable[[Any, grpc.ServicerContext], Any],
        request: Any,
        context: grpc.ServicerContext,
    ) -> Any:
        started, request_id = started_at(arrived()), call_request_id(context)
        self._refuse_malformed(request, context, method, started)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        response = answer(request, context)
        code = context.code()
        status, error = "OK", ""
        if code == grpc.StatusCode.NOT_FOUND:
            # A service it does not know, set on the context with no word of why: the error
            # code and a message, as for any other call the gateway fails.
            status, error = code.name, ErrorCode.NOT_FOUND.code
            asked = request.service
            # Within the client's metadata limit (8 KiB by default), whatever it asked.
            shown = repr(asked) if len(asked) <= 100 else f"{asked[:100]!r}..."
            context.set_details(
                f"no health status for service {shown}; this gateway has one for "
                f"'' (the whole server) and {SERVICE_NAME!r}"
            )
            context.set_trailing_metadata(((ERROR_CODE_KEY, error), (REQUEST_ID_KEY, request_id)))
        elif code is not None:
            status = code.name
        self.servicer.log_call(method, request, response, status, request_id, started, error)
        return response

    def Watch(
        self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None
    ) -> Any:
        started = started_at(arrived())
        self._refuse_malformed(request, context, "Watch", started)
        request_id = call_request_id(context)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            self._watches.add(context, "Watch", request_id)
        except GatewayError as exc:
            status = exc.error.grpc_status
            self.servicer.log_call("Watch", request, None, status, request_id, started, exc.code)
            abort(context, exc.error, exc.message, request_id)
        context.add_callback(functools.partial(self._watches.discard, context))
        return super().Watch(request, context, send_response_callback)

    def serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING, for the whole server and its service alike: what a gRPC
        liveness probe (Kubernetes' `grpc:` probe) asks, as an HTTP one asks /healthz. Once a
        drain has begun it stays NOT_SERVING (grpcio ignores the change then)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in ("", SERVICE_NAME):
            self.set(name, status)

    def end_watches(self) -> None:
        """End the open Watch calls with `shutting_down`, as the gateway's own streams end, and
        refuse new ones so. Called as the server closes, after the drain's NOT_SERVING has gone
        out to them."""
        self._watches.end()


# grpc_reflection has no type stubs.
class _CountedReflection(reflection.ReflectionServicer):  # type: ignore[misc]
    """Reflection's stream holds a thread of the pool for as long as its client keeps it open,
    as an InferStream does, and takes one of the same stream slots. Uncounted, a few idle
    reflection streams held every thread of the worker."""

    def __init__(self, service_names: tuple[str, ...], servicer: ImageGatewayServicer):
        super().__init__(service_names)
        self._servicer = servicer

    def ServerReflectionInfo(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        # The client's x-request-id when usable, as an InferStream's: a refusal carries it.
        stream_id = call_request_id(context)
        with self._servicer.stream_slot("ServerReflectionInfo", context, stream_id):
            requests = self._servicer.messages(
                request_iterator, context, "ServerReflectionInfo", stream_id
            )
            yield from super().ServerReflectionInfo(map(_readable, requests), context)


def _readable(request: Any) -> Any:
    """A reflection request, or for one that was not valid protobuf an empty one, which the
    reflection service answers with an error response (INVALID_ARGUMENT), the stream going on,
    as in an InferStream only the malformed message fails."""
    return (
        reflection_pb2.ServerReflectionRequest() if isinstance(request, wire.Malformed) else request
    )


def build_grpc_server(
    settings: Settings,
    dataplane: DataPlane,
    reuse_port: bool = False,
    tokens: Tokens | None = None,
) -> tuple[grpc.Server, int, GatewayHealth, ImageGatewayServicer]:
    """Bind (port 0 picks a free port); return the server (not yet started), its port, its
    health service, which reports SERVING for the whole server ("") and for our service, and
    the gateway's servicer."""
    ping_timeout_ms = math.ceil(1000 * min(KEEPALIVE_TIMEOUT, settings.grpc_keepalive))
    server = grpc.server(
        WatchedPool(
            settings.grpc_threads,
            settings.max_streams,
            settings.request_timeout,
            thread_name_prefix="grpc-worker",
            draining=lambda: dataplane.admission.draining,
            calls=settings.grpc_calls,
            tokens=tokens,
        ),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            # Answers are not capped, as over HTTP. Capped, a large output was refused by grpc
            # after the model had run, logged as OK, and answered with grpc's own
            # RESOURCE_EXHAUSTED, which a client takes for a request too large.
            ("grpc.max_send_message_length", -1),
            # Workers share the port on purpose; a single process refuses a port already taken.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Identity only. Images are compressed already; a gzip message gained nothing and
            # let 58 KB on the wire cost 60 MB of decompressing, parsing and memory.
            ("grpc.compression_enabled_algorithms_bitset", 1),
            # As the HTTP side's 64 KiB of headers: grpc took 500 KB of metadata on a call.
            ("grpc.max_metadata_size", 64 * 1024),
            # Without pings, a stream whose client vanished (a host that died, a network cut)
            # held its slot and thread for grpc's default of two hours: eight such stopped
            # every InferStream of the worker.
            ("grpc.keepalive_time_ms", math.ceil(1000 * settings.grpc_keepalive)),
            # How long an answer may take: grpc 1.85 ends the connection after the second;
            # keepalive_timeout_ms alone left it open.
            ("grpc.keepalive_timeout_ms", ping_timeout_ms),
            ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
            # grpc stops pinging after two pings with no data between them; a stream idle that
            # long, and its client gone after, would never have been found out.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.absolute_max_metadata_size", 64 * 1024),
            (
                "grpc.server_handshake_timeout_ms",
                math.ceil(1000 * min(HANDSHAKE_SECONDS, settings.request_timeout)),
            ),
        ],
    )
    servicer = ImageGatewayServicer(
        dataplane, published_limits(settings), settings.max_streams, tokens
    )
    _add_servicer(servicer, server, settings.max_images)
    # Health checks are answered from the calling thread, never queued behind inference.
    health_servicer = GatewayHealth(servicer)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _Tolerant(server))
    health_servicer.serving(True)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _CountedReflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), servicer),
        _Tolerant(server),
    )
    address = f"{url_host(settings.host)}:{settings.grpc_port}"
    files = settings.grpc_tls
    if files is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, _credentials(tls.Reloader(files)))
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    return server, port, health_servicer, servicer


def _credentials(reloader: tls.Reloader) -> grpc.ServerCredentials:
    """TLS credentials that take rotated certificate files at the next connection."""

    def configuration(pems: tls.Pems) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(pems.key, pems.cert_chain)], root_certificates=pems.client_ca
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this before each handshake; an exception here would fail the handshake.
        try:
            pems = reloader.changed()
        except Exception:
            log.exception("reading the gRPC TLS files")
            return None
        return None if pems is None else configuration(pems)

    return grpc.dynamic_ssl_server_credentials(
        configuration(reloader.current),
        fetch,
        require_client_authentication=reloader.current.client_ca is not None,
    )

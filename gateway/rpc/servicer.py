"""The gRPC servicer: each method converts, calls the core, converts back."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.core.access import log_access, started_at
from gateway.core.admission import SHUTTING_DOWN
from gateway.core.dataplane import (
    MAX_NAME,
    MAX_REQUEST_ID,
    DataPlane,
    new_request_id,
    usable_request_id,
)
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.limits import PublishedLimits
from gateway.core.tokens import Tokens
from gateway.core.types import InferResponse, ItemError, ItemResult
from gateway.rpc import convert
from gateway.rpc.arrival import arrived
from gateway.rpc.ending import end_served
from gateway.rpc.wire import Detached, Malformed, Refused

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"
ERROR_CODE_KEY = "error-code"

Self = TypeVar("Self", bound="ImageGatewayServicer")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def call_request_id(context: grpc.ServicerContext, request: object = None) -> str:
    """The request message's own `request_id` when it is usable, else the x-request-id
    metadata when that is, else a fresh id (an unusable field had replaced usable metadata)."""
    message = request.message if isinstance(request, Detached) else request
    for given in (
        getattr(message, "request_id", None),
        dict(context.invocation_metadata()).get(REQUEST_ID_KEY),
    ):
        if usable_request_id(given):
            return given
    return new_request_id()


def authorization(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The `authorization` metadata of a call, None without one. Several are joined, as HTTP
    joins a repeated header into a list, which no token matches: the last of them had won."""
    given = [value for key, value in metadata if key == AUTHORIZATION_KEY]
    return ", ".join(given) if given else None


def _message_id(message: pb.InferStreamRequest, stream_id: str, index: int) -> str:
    """A stream message's id: its own when usable, else the stream's with its index, kept
    within the 128 characters an id may have."""
    if usable_request_id(message.request_id):
        return message.request_id
    suffix = f"-{index}"
    return stream_id[: MAX_REQUEST_ID - len(suffix)] + suffix


def _client_deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _client_gone(context: grpc.ServicerContext) -> Callable[[], bool]:
    return lambda: not context.is_active()


def abort(
    context: grpc.ServicerContext, error: ErrorCode, message: str, request_id: str
) -> NoReturn:
    context.set_trailing_metadata(((ERROR_CODE_KEY, error.code), (REQUEST_ID_KEY, request_id)))
    context.abort(grpc.StatusCode[error.grpc_status], message)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers honest


def unary(
    method: Callable[[Self, Req, grpc.ServicerContext, str], Resp],
) -> Callable[[Self, Req, grpc.ServicerContext], Resp]:
    """Give a unary method its request id and turn GatewayError into a status from the table."""

    @functools.wraps(method)
    def wrapper(self: Self, request: Req, context: grpc.ServicerContext) -> Resp:
        # From arrival: the wait for a thread is part of the call (gateway.rpc.arrival).
        started = started_at(arrived())
        request_id = call_request_id(context, request)
        status, error, response = "OK", "", None
        try:
            # The pool (gateway.rpc.pool) refuses such a call before its message is read, by
            # the shape of grpcio's own submit; this check holds should that shape change.
            self.authenticate(context)
            if isinstance(request, Malformed):
                raise request.error()
            response = method(self, request, context, request_id)
        except GatewayError as exc:
            status, error = exc.error.grpc_status, exc.error.code
            abort(context, exc.error, exc.message, request_id)
        except Exception:
            status, error = "INTERNAL", ErrorCode.INTERNAL.code
            log.exception("unhandled error, request id %s", request_id)
            abort(
                context,
                ErrorCode.INTERNAL,
                f"internal error (request id {request_id}); the server log has the details",
                request_id,
            )
        finally:
            self.log_call(method.__name__, request, response, status, request_id, started, error)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return response

    return wrapper


def _model_named(message: object) -> str | None:
    """The model a request message names (`model` of the inference requests, `name` of
    GetModel's), or None for a call about no model."""
    if isinstance(message, pb.GetModelRequest):
        return message.name
    model = getattr(message, "model", None)
    return model if isinstance(model, str) else None


# The generated servicer base has no type stubs.
class OpenCalls:
    """Calls that wait on their client (a stream for its next message, a health Watch for a
    change of status), which the server ends together, with `shutting_down` and the call's
    request id, and refuses so once it has. Left open, grpc cancelled them at its stop with
    UNAVAILABLE "Cancelling all calls", without an error code or request id."""

    def __init__(self, logged: Callable[[str, str, GatewayError], None]) -> None:
        # Told of each call ended: its method, request id, and the error it ended with.
        self._logged = logged
        # id(context) -> (context, method, request id).
        self._calls: dict[int, tuple[grpc.ServicerContext, str, str]] = {}
        self._lock = threading.Lock()
        self._ended = False

    def add(self, context: grpc.ServicerContext, method: str, call_id: str) -> None:
        """Keep the call until `discard`; raises `shutting_down` once `end` has run."""
        with self._lock:
            if self._ended:
                raise GatewayError(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN)
            self._calls[id(context)] = (context, method, call_id)

    def discard(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._calls.pop(id(context), None)

    def end(self) -> None:
        with self._lock:
            self._ended = True
            calls = list(self._calls.values())
        ended = GatewayError(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN)
        for context, method, call_id in calls:
            trailing = ((ERROR_CODE_KEY, ended.code), (REQUEST_ID_KEY, call_id))
            if end_served(context, ended.error, ended.message, trailing):
                self._logged(method, call_id, ended)


class ImageGatewayServicer(pb_grpc.ImageGatewayServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        limits: PublishedLimits,
        max_streams: int = 8,
        tokens: Tokens | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.tokens = tokens
        self.max_streams = max_streams
        self._limits = pb.GetLimitsResponse(limits=convert.limits(limits))
        # grpcio's threaded server gives an open stream a thread until it ends, even while the
        # client sends nothing; the server's pool has max_streams threads more than unary calls
        # need, and a stream past that count is refused at once.
        self._streams = threading.BoundedSemaphore(max_streams)
        # The streams waiting for their client's next message, which a drain (or a reload
        # retiring the worker) ends at once (`end_streams`).
        self._waiting = OpenCalls(self.log_stream_end)

    def log_call(
        self,
        method: str,
        request: object,
        response: object,
        status: str,
        request_id: str,
        started: float,
        error: str = "",
    ) -> None:
        if request is None:
            images, bytes_in, message = 0, 0, None
        elif isinstance(request, Malformed):
            images, bytes_in, message = 0, request.size, None
        elif isinstance(request, Detached):
            images, bytes_in, message = _images(request), request.size, request.message
        else:
            images = 0
            bytes_in = request.ByteSize() if isinstance(request, Message) else 0
            message = request
        named = request.model if isinstance(request, Refused) else _model_named(message)
        log_access(
            request_id=request_id,
            protocol="grpc",
            method=method,
            model="" if named is None else self.dataplane.registry.label(named),
            images=images,
            status=status,
            bytes_in=bytes_in,
            bytes_out=response.ByteSize() if isinstance(response, Message) else 0,
            started=started,
            error=error,
        )

    @unary
    def Infer(
        self, request: Detached[pb.InferRequest], context: grpc.ServicerContext, request_id: str
    ) -> pb.InferResponse:
        core = convert.single_request(
            request,
            request_id,
            self.dataplane.deadline(_client_deadline(context), since=arrived()),
            _client_gone(context),
            received=arrived(),
        )
        return convert.infer_response(self.dataplane.infer_one(core))

    @unary
    def InferBatch(
        self,
        request: Detached[pb.InferBatchRequest],
        context: grpc.ServicerContext,
        request_id: str,
    ) -> pb.InferBatchResponse:
        core = convert.batch_request(
            request,
            request_id,
            self.dataplane.deadline(_client_deadline(context), since=arrived()),
            _client_gone(context),
            received=arrived(),
        )
        return convert.batch_response(self.dataplane.infer(core))

    def InferStream(
        self,
        request_iterator: Iterator[Detached[pb.InferStreamRequest] | Malformed],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.InferStreamResponse]:
        stream_id = call_request_id(context)
        with self.stream_slot("InferStream", context, stream_id):
            yield from self._stream(
                self.messages(request_iterator, context, "InferStream", stream_id),
                context,
                stream_id,
            )
            # The stream's id, as a unary call's: its messages' ids are derived from it.
            context.set_trailing_metadata(((REQUEST_ID_KEY, stream_id),))

    def authenticate(self, context: grpc.ServicerContext) -> None:
        """Raise `unauthenticated` unless the call carries a token in force, when tokens are
        required."""
        if self.tokens is not None:
            self.tokens.check(authorization(context.invocation_metadata()))

    def messages(
        self, requests: Iterator[Req], context: grpc.ServicerContext, method: str, stream_id: str
    ) -> Iterator[Req]:
        """A stream's messages, each taken only while the stream's token is still in force: a
        token taken out of the file ends the streams opened with it at their next message (they
        had gone on for as long as their clients kept them open). Raises `unauthenticated`,
        which `stream_slot` answers, and `shutting_down` once the gateway drains, before the
        next message is taken; a stream already waiting for it then is ended by
        `end_streams`. (Left open, streams ended a second after the drain with grpc's
        own UNAVAILABLE "Cancelling all calls", without an error code or request id.)"""
        while True:
            self._waiting.add(context, method, stream_id)
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                self._waiting.discard(context)
            self.authenticate(context)
            yield request

    def end_streams(self) -> None:
        """End with `shutting_down` the streams waiting for their client's next message, as the
        gateway drains or the worker retires; the others end before they take their next one,
        and new ones at their first (`messages`)."""
        self._waiting.end()

    @contextlib.contextmanager
    def stream_slot(
        self, method: str, context: grpc.ServicerContext, stream_id: str
    ) -> Iterator[None]:
        """Hold one of the worker's stream slots for a stream's life (any stream of requests:
        InferStream, reflection), or refuse the stream at once: `unauthenticated` without a
        token in force (before it takes a slot), `overloaded` with no slot free. A
        GatewayError out of the stream (its token taken out, or a drain, `messages`) ends it with
        that error."""
        try:
            self.authenticate(context)
        except GatewayError as exc:
            self._refuse_stream(method, context, stream_id, exc)
        if not self._streams.acquire(blocking=False):
            # Counted and logged like any refused call: one record for the stream.
            refused = ErrorCode.OVERLOADED
            self.log_call(
                method,
                None,
                None,
                refused.grpc_status,
                stream_id,
                time.perf_counter(),
                refused.code,
            )
            abort(
                context,
                ErrorCode.OVERLOADED,
                f"{self.max_streams} streams are open on this worker, the most it takes; retry "
                "later or send InferBatch",
                stream_id,
            )
        try:
            yield
        except GatewayError as exc:
            self._refuse_stream(method, context, stream_id, exc)
        finally:
            self._streams.release()

    def _refuse_stream(
        self, method: str, context: grpc.ServicerContext, stream_id: str, exc: GatewayError
    ) -> NoReturn:
        self.log_stream_end(method, stream_id, exc)
        abort(context, exc.error, exc.message, stream_id)

    def log_stream_end(self, method: str, stream_id: str, exc: GatewayError) -> None:
        self.log_call(
            method, None, None, exc.error.grpc_status, stream_id, time.perf_counter(), exc.code
        )

    def _stream(
        self,
        request_iterator: Iterator[Detached[pb.InferStreamRequest] | Malformed],
        context: grpc.ServicerContext,
        stream_id: str,
    ) -> Iterator[pb.InferStreamResponse]:
        for index, request in enumerate(request_iterator):
            # Each message is its own request: its failure is its own response, and the stream
            # goes on.
            message = request.message if isinstance(request, Detached) else pb.InferStreamRequest()
            request_id = _message_id(message, stream_id, index)
            started = time.perf_counter()
            try:
                if isinstance(request, Malformed):
                    raise request.error()
                core = convert.single_request(
                    request,
                    request_id,
                    self.dataplane.deadline(_client_deadline(context)),
                    _client_gone(context),
                )
                response = self.dataplane.infer(core)
            except GatewayError as exc:
                name = message.image.name[:MAX_NAME]  # a name too long is what failed
                failed = ItemResult(name, error=ItemError(exc.error, exc.message))
                # Named as a served request's answer is: the default model for "". No model
                # ran for a name the gateway does not serve, and the name is the client's, of
                # any length: repeated, 5 MiB of it passed what a client receives by default.
                # Nor for a message refused before its model was read: its empty stand-in
                # named the default model, as if it had run.
                named = _stream_model(request)
                model = None if named is None else self.dataplane.registry.get(named)
                name = "" if model is None else model.name
                response = InferResponse(name, request_id, (failed,))
            reply = convert.stream_response(response)
            (result,) = response.results
            status = result.error.error.grpc_status if result.error is not None else "OK"
            error = result.error.code if result.error is not None else ""
            self.log_call("InferStream", request, reply, status, request_id, started, error)
            yield reply

    @unary
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info(m) for m in self.dataplane.list_models()]
        )

    @unary
    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model_info(self.dataplane.get_model(request.name)))

    @unary
    def GetLimits(
        self, request: pb.GetLimitsRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.GetLimitsResponse:
        return self._limits


def _stream_model(request: Detached[pb.InferStreamRequest] | Malformed) -> str | None:
    """The model a stream message named, "" for the default; None when it was refused before
    its model was read, or could not be read at all."""
    if isinstance(request, Detached):
        return str(request.message.model)
    return request.model if isinstance(request, Refused) else None


def _images(request: Detached[Any]) -> int:
    """Images a request holds: an Infer or stream message without its image has none, though
    its one data field reads as empty."""
    message = request.message
    single = isinstance(message, (pb.InferRequest, pb.InferStreamRequest))
    if single and not message.HasField("image"):
        return 0
    return len(request.datas)

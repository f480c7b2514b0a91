"""protobuf <-> core types: the only module that imports both the generated code and the core."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Union

from google.protobuf import struct_pb2

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.limits import PublishedLimits
from gateway.core.outputs import NotJSONError, to_json_value
from gateway.core.types import (
    ColorMode,
    ImageInput,
    InferRequest,
    InferResponse,
    ItemResult,
    ModelInfo,
)
from gateway.models.base import JSONValue
from gateway.rpc.wire import Detached

_COLOR_MODES: dict[int, ColorMode] = {
    pb.COLOR_MODE_UNSPECIFIED: ColorMode.COLOR,
    pb.COLOR_MODE_COLOR: ColorMode.COLOR,
    pb.COLOR_MODE_GRAYSCALE: ColorMode.GRAYSCALE,
    pb.COLOR_MODE_UNCHANGED: ColorMode.UNCHANGED,
}

SingleRequest = Union[pb.InferRequest, pb.InferStreamRequest]


def _image(image: pb.Image, data: memoryview) -> ImageInput:
    return ImageInput(data, image.name, image.content_type)


def _parameters(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The request's parameters as canonical JSON, by the rule outputs follow
    (gateway.core.outputs): 3 reaches a model as 3, not as the double 3.0, and a NaN is refused.
    Walked here because json_format.MessageToDict raises ValueError on a NaN, which would fail
    the call as `internal` and end an InferStream."""
    if "color_mode" in struct.fields:
        # Over HTTP a color_mode parameter is the decode mode, and never reaches the model.
        raise GatewayError(
            ErrorCode.INVALID_REQUEST,
            "color_mode is a field of the request, not a parameter (as over HTTP, where it is "
            "the decode mode)",
        )
    try:
        return {key: to_json_value(_python(value)) for key, value in struct.fields.items()}
    except NotJSONError as exc:
        raise GatewayError(
            ErrorCode.INVALID_REQUEST, f"a parameter has no JSON form: {exc}"
        ) from None


def _python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [_python(v) for v in value.list_value.values]
    if kind == "struct_value":
        return {k: _python(v) for k, v in value.struct_value.fields.items()}
    if kind == "null_value" or kind is None:
        return None
    return getattr(value, kind)


def _color_mode(value: int) -> ColorMode:
    # proto3 keeps a value it has no name for (one newer than this server). Decoding some other
    # way than asked would be a wrong answer that looks right, so it fails as over HTTP.
    mode = _COLOR_MODES.get(value)
    if mode is None:
        names = ", ".join(pb.ColorMode.Name(v) for v in _COLOR_MODES)
        raise GatewayError(ErrorCode.INVALID_REQUEST, f"color_mode {value} is not one of: {names}")
    return mode


def _set_value(target: struct_pb2.Value, value: JSONValue) -> None:
    """Fill a google.protobuf.Value from canonical JSON (see gateway.core.outputs).

    Written out because json_format.ParseDict goes through descriptors for every element and
    was a visible share of a small image's request time.
    """
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, (int, float)):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, list):
        values = target.list_value.values
        target.list_value.SetInParent()
        for item in value:
            _set_value(values.add(), item)
    else:
        fields = target.struct_value.fields
        target.struct_value.SetInParent()
        for key, item in value.items():
            _set_value(fields[key], item)


def single_request(
    detached: Detached[SingleRequest],
    request_id: str,
    deadline: float | None,
    client_gone: Callable[[], bool] | None = None,
    received: float | None = None,
) -> InferRequest:
    msg = detached.message
    # No image field is no image, which the core answers no_images after it has looked the
    # model up, as for InferBatch and HTTP; an image field set with no data is empty_image.
    has_image = msg.HasField("image")
    return InferRequest(
        model=msg.model,
        images=(_image(msg.image, detached.datas[0]),) if has_image else (),
        parameters=_parameters(msg.parameters),
        color_mode=_color_mode(msg.color_mode),
        request_id=request_id,
        deadline=deadline,
        client_gone=client_gone,
        **_received(received),
    )


def _received(received: float | None) -> dict[str, float]:
    return {} if received is None else {"received": received}


def batch_request(
    detached: Detached[pb.InferBatchRequest],
    request_id: str,
    deadline: float | None,
    client_gone: Callable[[], bool] | None = None,
    received: float | None = None,
) -> InferRequest:
    msg = detached.message
    return InferRequest(
        model=msg.model,
        images=tuple(_image(i, d) for i, d in zip(msg.images, detached.datas, strict=True)),
        parameters=_parameters(msg.parameters),
        color_mode=_color_mode(msg.color_mode),
        request_id=request_id,
        deadline=deadline,
        client_gone=client_gone,
        **_received(received),
    )


def image_result(result: ItemResult) -> pb.ImageResult:
    out = pb.ImageResult(name=result.name)
    if result.info is not None:
        out.info.CopyFrom(
            pb.ImageInfo(
                width=result.info.width,
                height=result.info.height,
                channels=result.info.channels,
                format=result.info.format,
            )
        )
    if result.error is not None:
        out.error.CopyFrom(pb.Error(code=result.error.code, message=result.error.message))
    else:
        _set_value(out.output, result.output)
    return out


def infer_response(response: InferResponse) -> pb.InferResponse:
    (result,) = response.results
    return pb.InferResponse(
        model=response.model, request_id=response.request_id, result=image_result(result)
    )


def stream_response(response: InferResponse) -> pb.InferStreamResponse:
    (result,) = response.results
    return pb.InferStreamResponse(
        model=response.model, request_id=response.request_id, result=image_result(result)
    )


def batch_response(response: InferResponse) -> pb.InferBatchResponse:
    return pb.InferBatchResponse(
        model=response.model,
        request_id=response.request_id,
        results=[image_result(r) for r in response.results],
    )


def model_info(info: ModelInfo) -> pb.ModelInfo:
    message = pb.ModelInfo(name=info.name, description=info.description, is_default=info.is_default)
    if info.min_input_size is not None:
        width, height = info.min_input_size
        message.min_input_size.CopyFrom(pb.ImageSize(width=width, height=height))
    if info.batching is not None:
        size, wait_ms = info.batching
        message.batching.CopyFrom(pb.BatchPolicy(max_batch_size=size, max_batch_wait_ms=wait_ms))
    return message


def limits(published: PublishedLimits) -> pb.Limits:
    # The message's fields are named as the dataclass's, so a field added to one and not the
    # other fails here at start.
    return pb.Limits(**asdict(published))

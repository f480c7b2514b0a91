"""The interface every model implements.

A model always receives a list of decoded images, even for a single-image request, so that the
gateway can batch requests without any change to model code.

Optional attributes a model may set (read with getattr, so a model without them is whole):
- `max_batch_size`, `max_batch_wait_ms`: dynamic batching (gateway.core.batching);
- `min_input_size`: (width, height), the smallest image the model needs. A model that scales
  its input down to a fixed size anyway can let the gateway decode a JPEG at 1/2, 1/4 or 1/8 of
  its size, which libjpeg does while decoding for a fraction of the cost and memory of a full
  decode, as long as the result still covers this size in both dimensions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

# What a model returns per image; the gateway serialises it as JSON over HTTP and as a
# google.protobuf.Value over gRPC.
JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]


class ParameterError(ValueError):
    """Raise from predict when the request's parameters are what is wrong (a threshold that is
    not a number, an unknown label set): the request fails with invalid_request (400 /
    INVALID_ARGUMENT) and this message, where anything else predict raises is model_error, a
    fault of the model, logged with its traceback. Batched requests share their parameters, so
    it fails every request of the call it is raised in."""


@runtime_checkable
class Model(Protocol):
    name: str
    description: str

    def predict(
        self, images: Sequence[np.ndarray], params: Mapping[str, Any]
    ) -> Sequence[JSONValue]:
        """Return one JSON-able output per image, in the same order."""
        ...


# Sizes travel as int32 in the proto.
_MAX_INT32 = 2**31 - 1
# Longest model name: names come back in every answer, label metrics and fill error messages.
MAX_NAME = 256
# The metrics and access-log label of a name no model has (gateway.models.registry).
UNKNOWN_LABEL = "-"
# What --batching takes too (gateway.config): at most 4 digits of batch size and 5 of ms.
MAX_BATCH_SIZE = 9999
MAX_BATCH_WAIT_MS = 100_000.0  # exclusive


def check_model(model: object, spec: str) -> Model:
    """`model` as a Model, or TypeError / ValueError naming what is wrong, so that a model
    declaring something wrongly fails at start, not on a request (or on a listing)."""
    if isinstance(model, type):
        raise TypeError(f"{spec!r} returned the class {model.__name__}; return an instance")
    missing = [a for a in ("name", "description", "predict") if not hasattr(model, a)]
    if missing or not callable(getattr(model, "predict", None)):
        raise TypeError(
            f"{spec!r} returned {type(model).__name__}, which lacks "
            f"{', '.join(missing) or 'a callable predict'}: a model has name, description and "
            "predict(images, params)"
        )
    _check_predict(getattr(model, "predict"), spec)  # noqa: B009
    name, description = getattr(model, "name"), getattr(model, "description")  # noqa: B009
    if not isinstance(name, str) or not isinstance(description, str):
        raise TypeError(f"{spec!r}: name and description are str, not {name!r}, {description!r}")
    _check_name(name)
    checked: Model = model  # type: ignore[assignment]
    min_input_size(checked)
    # Batching attributes are checked where they are used (gateway.core.dataplane), only when
    # --batching does not set the model's policy itself.
    return checked


def _check_predict(predict: Any, spec: str) -> None:
    """A predict the gateway can call as predict(images, params), and that answers: an async
    one returns a coroutine, never outputs, and one of another arity raises TypeError. Both
    loaded, and failed every request, a model_error each."""
    if inspect.iscoroutinefunction(predict) or inspect.isasyncgenfunction(predict):
        raise TypeError(
            f"{spec!r}: predict is async; the gateway calls it from threads, and awaits nothing"
        )
    try:
        signature = inspect.signature(predict)
    except (TypeError, ValueError):  # no signature to read (some builtins): left to the call
        return
    try:
        signature.bind(None, None)
    except TypeError:
        taken = ", ".join(_shown(p) for p in signature.parameters.values())
        raise TypeError(
            f"{spec!r}: predict({taken}) cannot be called as predict(images, params)"
        ) from None


def _shown(parameter: inspect.Parameter) -> str:
    if parameter.kind is parameter.VAR_POSITIONAL:
        return "*" + parameter.name
    if parameter.kind is parameter.VAR_KEYWORD:
        return "**" + parameter.name
    return parameter.name


def _check_name(name: str) -> None:
    # "/" is allowed ("org/model", as model hubs name them; HTTP routes take it), but no
    # segment a URL would resolve away or leave empty.
    segments = name.split("/")
    if (
        not 0 < len(name) <= MAX_NAME
        or not name.isprintable()
        or name == UNKNOWN_LABEL
        # What an HTTP route reads as "/", and its infer route's tail
        # (gateway.rest.routes.ModelName).
        or "%2f" in name.lower()
        or name.endswith("/infer")
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise ValueError(
            f"model name {name[:MAX_NAME]!r}: a name is 1 to {MAX_NAME} printable characters, "
            f"not {UNKNOWN_LABEL!r} (the label of unknown names), without '%2F' or a last "
            "segment 'infer', and with no empty, '.' or '..' segment between slashes"
        )


def batching_attributes(model: Model) -> tuple[int, float] | None:
    """The model's own `max_batch_size` and `max_batch_wait_ms` (default 2) as (size, wait in
    ms), None when it does not ask for batching; ValueError for values that are not a size and
    a wait the batcher can keep (not an infinite or NaN wait, nor a float or numpy size that
    would turn batching off without a word)."""
    size = getattr(model, "max_batch_size", None)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BATCH_SIZE:
        raise ValueError(
            f"model {model.name!r}: max_batch_size must be an int from 0 to {MAX_BATCH_SIZE} "
            f"(0 or 1: no batching), or None, not {size!r}"
        )
    wait = getattr(model, "max_batch_wait_ms", 2.0)
    if (
        isinstance(wait, bool)
        or not isinstance(wait, (int, float))
        or not 0 <= wait < MAX_BATCH_WAIT_MS
    ):
        raise ValueError(
            f"model {model.name!r}: max_batch_wait_ms must be a number of ms, at least 0 and "
            f"below {MAX_BATCH_WAIT_MS:g}, not {wait!r}"
        )
    return (size, float(wait)) if size > 1 else None


def min_input_size(model: Model) -> tuple[int, int] | None:
    """The model's `min_input_size` as (width, height), None when it has none; ValueError for
    anything else, so that a model declaring it wrongly fails at start, not on a request."""
    size = getattr(model, "min_input_size", None)
    if size is None:
        return None
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _MAX_INT32 for v in size
        )
    ):
        return (size[0], size[1])
    raise ValueError(
        f"model {model.name!r}: min_input_size must be (width, height) in integers from 1 to "
        f"{_MAX_INT32}, or None, not {size!r}"
    )

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

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

# What a model returns per image; the gateway serialises it as JSON over HTTP and as a
# google.protobuf.Value over gRPC.
JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]


@runtime_checkable
class Model(Protocol):
    name: str
    description: str

    def predict(
        self, images: Sequence[np.ndarray], params: Mapping[str, Any]
    ) -> Sequence[JSONValue]:
        """Return one JSON-able output per image, in the same order."""
        ...


def min_input_size(model: Model) -> tuple[int, int] | None:
    """The model's `min_input_size` as (width, height), None when it has none; ValueError for
    anything else, so that a model declaring it wrongly fails at start, not on a request."""
    size = getattr(model, "min_input_size", None)
    if size is None:
        return None
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return (size[0], size[1])
    raise ValueError(
        f"model {model.name!r}: min_input_size must be (width, height) in positive integers or "
        f"None, not {size!r}"
    )

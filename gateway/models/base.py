"""The interface every model implements.

A model always receives a list of decoded images, even for a single-image request, so that the
gateway can batch requests without any change to model code.
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

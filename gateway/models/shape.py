"""The default model: each image's shape, exactly as `img.shape` gives it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gateway.models.base import JSONValue


class ShapeModel:
    name = "shape"
    description = "The decoded image's shape as [height, width, channels], as numpy's img.shape."

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[JSONValue]:
        return [list(image.shape) for image in images]


def create() -> ShapeModel:
    return ShapeModel()

"""Model outputs -> canonical JSON values, identical whichever front serialises them.

gRPC carries numbers as doubles (google.protobuf.Value), JSON keeps 3 and 3.0 apart; making
integral numbers ints here, once, lets every client read the same value back from both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gateway.models.base import JSONValue


class NotJSONError(TypeError):
    pass


def to_json_value(value: Any) -> JSONValue:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, (bool, str)):
            return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJSONError(f"{value} has no JSON form")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [to_json_value(v) for v in value]
    raise NotJSONError(f"{type(value).__name__} has no JSON form")

"""Model outputs -> canonical JSON values, identical whichever front serialises them.

gRPC carries numbers as doubles (google.protobuf.Value), JSON keeps 3 and 3.0 apart; making
integral numbers ints here, once, lets every client read the same value back from both. What
one front could carry and the other not (an integer a double cannot hold exactly, a string that
is not Unicode, nesting deeper than protobuf parses) is refused here, for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from gateway.models.base import JSONValue

# protobuf parses at most 100 levels of messages, and one level of JSON objects is three there
# (Value, Struct, its map entry) below the answer's own few.
MAX_DEPTH = 24
# Past this an integer is not exact as a double: HTTP would give it exactly, gRPC rounded.
MAX_EXACT_INT = 2**53


class NotJSONError(TypeError):
    """A value with no JSON form, and where it is: `[0]["scores"][2]: nan has no JSON form`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        # The keys and indices from the value converted down to the one refused, outermost
        # first.
        self.path: list[str] = []

    def __str__(self) -> str:
        return f"{''.join(self.path)}: {self.reason}" if self.path else self.reason


def check_outputs(outputs: object, count: int) -> Sequence[Any]:
    """A model's `outputs` for `count` images, or ValueError saying what is wrong with them."""
    # A str, bytes or dict has a length too: one of 1 would pass for one image's output.
    if isinstance(outputs, (str, bytes, bytearray, Mapping)) or not isinstance(
        outputs, (Sequence, np.ndarray)
    ):
        raise ValueError(f"returned a {type(outputs).__name__}, not a list of outputs")
    if len(outputs) != count:
        raise ValueError(f"returned {len(outputs)} outputs for {count} images")
    return cast(Sequence[Any], outputs)  # an array indexes and slices as a sequence does


def to_json_value(value: Any, depth: int = 0) -> JSONValue:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _text(value)
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise NotJSONError(
                f"an integer of {value.bit_length()} bits is not exact as a double (gRPC's numbers)"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJSONError(f"{value} has no JSON form")
        return int(value) if value.is_integer() and abs(value) <= MAX_EXACT_INT else value
    if depth >= MAX_DEPTH:
        raise NotJSONError(f"lists and objects nested more than {MAX_DEPTH} deep")
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist(), depth)
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            name = _key(key)
            if name in out:
                raise NotJSONError(f"two keys of an object are {name!r} as text")
            out[name] = _within(f"[{name!r}]", item, depth)
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_within(f"[{i}]", v, depth) for i, v in enumerate(value)]
    raise NotJSONError(f"{type(value).__name__} has no JSON form")


def _within(step: str, value: Any, depth: int) -> JSONValue:
    try:
        return to_json_value(value, depth + 1)
    except NotJSONError as exc:
        exc.path.insert(0, step)
        raise


def _key(key: Any) -> str:
    """An object key as JSON writes one (Python's json module): a number as its text, True,
    False and None as true, false and null. str() made None "None", and a tuple "(1, 2)", where
    json refuses it."""
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, (bool, int, float)) or key is None:
        if isinstance(key, float) and not math.isfinite(key):
            raise NotJSONError(f"an object key {key} has no JSON form")
        return json.dumps(key)
    raise NotJSONError(f"an object key of type {type(key).__name__} has no JSON form")


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise NotJSONError("a string that is not valid Unicode (a lone surrogate)") from None
    return value

"""The model calls under way in a worker, and how long the oldest has run: a call that has hung
(a model waiting on a lock, a device, a network share) holds its requests' share of the pixel
budget and a thread for ever, as Python cannot interrupt it; found out, the worker can be
replaced (gateway.serve)."""

from __future__ import annotations

import itertools
import time


class ModelCalls:
    """No lock: a dict's item assignment, deletion and copy are each one step under the GIL.
    A request pays two dict operations (a context manager with a lock had cost 3 us a call)."""

    def __init__(self) -> None:
        self._running: dict[int, tuple[str, float]] = {}
        self._keys = itertools.count()

    def begin(self, model: str) -> int:
        """Before a `predict` call of `model`; give its key to `end` after it, however it ends."""
        key = next(self._keys)
        self._running[key] = (model, time.monotonic())
        return key

    def end(self, key: int) -> None:
        del self._running[key]

    def longest(self) -> tuple[str, float] | None:
        """The model of the call under way the longest, and its seconds so far; None if none."""
        running = self._running.copy()
        if not running:
            return None
        model, began = min(running.values(), key=lambda call: call[1])
        return model, time.monotonic() - began

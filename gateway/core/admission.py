"""A concurrency cap with a bounded queue, shared by both fronts.

At most `max_concurrency` requests decode and run the model at once; up to `max_queue` more wait
for a slot, each no longer than its own deadline. Past that the answer is `overloaded` (503 /
UNAVAILABLE), at once, so a burst costs a refusal instead of memory. While draining for shutdown
every new request is refused with `shutting_down`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.core.errors import ErrorCode, GatewayError


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._waiting = 0
        self._active = 0
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse every request from now on; those already admitted go on."""
        self._draining = True

    @property
    def active(self) -> int:
        return self._active

    @contextmanager
    def slot(self, deadline: float | None) -> Iterator[None]:
        if self._draining:
            raise GatewayError(ErrorCode.SHUTTING_DOWN, "the gateway is shutting down; retry")
        if not self._slots.acquire(blocking=False):
            self._wait_for_slot(deadline)
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
            self._slots.release()

    def _wait_for_slot(self, deadline: float | None) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise GatewayError(
                    ErrorCode.OVERLOADED,
                    f"the gateway is at capacity ({self.max_concurrency} running, "
                    f"{self._waiting} waiting); retry later",
                )
            self._waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            acquired = self._slots.acquire(timeout=timeout)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise GatewayError(
                ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed while it waited"
            )

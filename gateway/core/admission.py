"""A pixel budget with a bounded queue, shared by both fronts.

What a request costs in memory is its pixels, which the headers told us before anything was
decoded. The budget is `max_concurrency` full requests (`max_concurrency x max_request_pixels`
pixels); each request takes its own pixel count from it while it decodes and runs the model, so
`max_concurrency` requests at the pixel limit run at once, or many more small ones. Up to
`max_queue` requests wait for room, each no longer than its own deadline. Past that the answer
is `overloaded` (503 / UNAVAILABLE), at once, so a burst costs a refusal instead of memory.
While draining for shutdown every new request is refused with `shutting_down`.

Counting requests instead would make small images queue behind one another for no memory
reason: with a dozen request threads and two slots, waiting for a slot cost more than decoding
a 64x64 PNG.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from gateway.core.errors import ErrorCode, GatewayError

# Seconds between two checks of whether a waiting request should stop.
STOP_CHECK_INTERVAL = 0.1
# Requests of one protocol waiting for a thread of that protocol, per worker: a backstop behind
# the queue below, which a request joins only once it has a thread. Past it the answer is
# `overloaded` at once, from the HTTP server or the gRPC server.
THREAD_QUEUE = 256
# Why a request that waited for a thread past its deadline is answered deadline_exceeded.
WAITED_TOO_LONG = "the request waited for a server thread past its deadline (--request-timeout)"
SHUTTING_DOWN = "the gateway is shutting down; retry"


def waiting_verdict(
    arrived: float, *, gone: bool, draining: bool, timeout: float
) -> GatewayError | None:
    """What becomes of a request still waiting for a thread of its protocol (arrived at
    `arrived`, a time.monotonic()): None to wait on, else the error it ends with: `cancelled`
    when its client has gone (recorded, not answered), `shutting_down` while draining,
    `deadline_exceeded` past its deadline. Both fronts sweep their waiting requests with it."""
    if gone:
        return GatewayError(ErrorCode.CANCELLED, "the client left while it waited for a thread")
    if draining:
        return GatewayError(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN)
    if time.monotonic() - arrived > timeout:
        return GatewayError(ErrorCode.DEADLINE_EXCEEDED, WAITED_TOO_LONG)
    return None


class Held:
    """A request's hold on the budget, kept past the request by work still using its pixels."""

    def __init__(self) -> None:
        self.until: Future[Any] | None = None

    def keep_until(self, future: Future[Any]) -> None:
        """Count the pixels until `future` is done, not only until the request leaves: a
        batch that outlives its request's deadline still holds the request's images."""
        self.until = future


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, max_request_pixels: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.budget = max_concurrency * max(1, max_request_pixels)
        self._room = threading.Condition(threading.Lock())
        self._used = 0
        self._active = 0
        # Tickets of the waiting requests, oldest first: they are let in in that order.
        self._queue: deque[object] = deque()
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

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @contextmanager
    def slot(
        self,
        pixels: int,
        deadline: float | None,
        stopped: Callable[[], GatewayError | None] | None = None,
    ) -> Iterator[Held]:
        """Hold `pixels` of the budget (a request over the whole budget waits for all of it)
        until the block ends, or later if the block says so (Held.keep_until). A waiting
        request asks `stopped` every STOP_CHECK_INTERVAL, and leaves the queue with the error
        it returns (its client has gone, say)."""
        cost = min(max(1, pixels), self.budget)
        self._acquire(cost, deadline, stopped)
        held = Held()
        try:
            yield held
        finally:
            if held.until is None:
                self._release(cost)
            else:
                held.until.add_done_callback(lambda _: self._release(cost))

    def _release(self, cost: int) -> None:
        with self._room:
            self._used -= cost
            self._active -= 1
            if self._queue:
                self._room.notify_all()

    def _acquire(
        self,
        cost: int,
        deadline: float | None,
        stopped: Callable[[], GatewayError | None] | None,
    ) -> None:
        with self._room:
            if self._draining:
                raise GatewayError(ErrorCode.SHUTTING_DOWN, SHUTTING_DOWN)
            # Those already waiting go first, and in the order they came: a stream of small
            # requests must not starve a large one. (Woken together and let in by whoever fit
            # first, small ones overtook a waiting 36-megapixel image until its deadline.)
            if not self._queue and self._used + cost <= self.budget:
                self._used += cost
                self._active += 1
                return
            if len(self._queue) >= self.max_queue:
                raise GatewayError(
                    ErrorCode.OVERLOADED,
                    f"the gateway is at capacity ({self._active} running, {len(self._queue)} "
                    f"waiting); retry later",
                )
            ticket = object()
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._used + cost > self.budget:
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        raise GatewayError(
                            ErrorCode.DEADLINE_EXCEEDED,
                            "the request's deadline passed while it waited",
                        )
                    if stopped is not None:
                        # Abandoned requests must not hold places in the queue that live
                        # clients would be refused for.
                        error = stopped()
                        if error is not None:
                            raise error
                        if timeout is None or timeout > STOP_CHECK_INTERVAL:
                            timeout = STOP_CHECK_INTERVAL
                    self._room.wait(timeout)
            finally:
                self._queue.remove(ticket)
                if self._queue:
                    # The next in line may fit too, or is the head now.
                    self._room.notify_all()
            self._used += cost
            self._active += 1

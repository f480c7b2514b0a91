"""When the gRPC call a pool thread serves reached the server.

grpcio queues a call for a thread of its pool as soon as the call's headers arrive. The wait for
a thread is the caller's time as much as the serving is, so a call's deadline, its recorded
duration and the question whether its client is still there count from arrival, as over HTTP
(QUEUED_KEY in gateway.rest.exchange). gateway.rpc.pool sets it around each call it runs; the
servicer reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

_local = threading.local()


def arrived() -> float:
    """The monotonic time the current call reached the server (now, outside a pool thread)."""
    at: float | None = getattr(_local, "at", None)
    return time.monotonic() if at is None else at


def run_arrived(at: float, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), with `at` as the current call's arrival."""
    _local.at = at
    try:
        return fn(*args, **kwargs)
    finally:
        _local.at = None

"""One structured access-log record and one count in the metrics per request, the same for both
protocols.

Records are JSON lines on the `gateway.access` logger: {"ts", "request_id", "protocol", "method",
"model", "images", "status", "bytes_in", "bytes_out", "duration_ms"}; `--access-log off` turns
them off (the metrics still count every request).
"""

from __future__ import annotations

import json
import logging
import time

from gateway import metrics

log = logging.getLogger("gateway.access")
# One encoder for every record: json.dumps with any non-default argument builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def started_at(arrived: float | None) -> float:
    """The time.perf_counter() (the clock of log_access's `started`) of a request that arrived
    at `arrived`, a time.monotonic(); now when that is not known."""
    now = time.perf_counter()
    return now if arrived is None else now - (time.monotonic() - arrived)


def log_access(
    *,
    request_id: str,
    protocol: str,
    method: str,
    model: str,
    images: int,
    status: str,
    bytes_in: int,
    bytes_out: int,
    started: float,
    error: str = "",
) -> None:
    """Count the request in the metrics and write its access record. `started` is the
    request's time.perf_counter() at arrival; `status` the HTTP status or the gRPC status name;
    `error` the error table's code of a request that failed ("" otherwise): statuses alone do
    not tell `overloaded` from `shutting_down`."""
    elapsed = time.perf_counter() - started
    metrics.inc(metrics.REQUESTS, (protocol, method, model, status))
    if error:
        metrics.inc(metrics.REQUEST_ERRORS, (protocol, error))
    metrics.observe(metrics.REQUEST_SECONDS, elapsed, (protocol, method))
    if not log.isEnabledFor(logging.INFO):
        return
    record = {
        "ts": round(time.time(), 3),
        "request_id": request_id,
        "protocol": protocol,
        "method": method,
        "model": model,
        "images": images,
        "status": status,
        "error": error,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round(elapsed * 1000, 3),
    }
    log.info(_encode(record))

"""Prometheus metrics, the same series for HTTP and gRPC, correct across worker processes.

With several workers the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
spawning them (prometheus-client reads it at import), each worker writes its values there, and
/metrics on any worker aggregates them all with prometheus-client's MultiProcessCollector.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import fcntl
import logging
import math
import os
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests answered, by protocol, method or route, model and status code.",
    ["protocol", "method", "model", "code"],
)
REQUEST_ERRORS = Counter(
    "gateway_request_errors_total",
    "Requests that failed, by protocol and the error table's code.",
    ["protocol", "code"],
)
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds",
    "Time from arrival to answer.",
    ["protocol", "method"],
    buckets=_LATENCY,
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests inside the core (queued, decoding or in the model).",
    multiprocess_mode="livesum",
)
WAITING_FOR_THREAD = Gauge(
    "gateway_waiting_for_thread_requests",
    "Requests waiting for a thread of their protocol (gRPC: or for a --grpc-calls place), before "
    "the core (sampled twice a second).",
    ["protocol"],
    multiprocess_mode="livesum",
)
HTTP_ARRIVING = Gauge(
    "gateway_http_arriving_connections",
    "HTTP connections waiting without a thread for their request to arrive, by what they wait "
    "for: request (nothing sent yet), head, body (sampled twice a second).",
    ["waiting_for"],
    multiprocess_mode="livesum",
)
HTTP_ARRIVING_BODY_BYTES = Gauge(
    "gateway_http_arriving_body_bytes",
    "Bytes of HTTP requests whose body is still arriving, held without a thread (sampled twice "
    "a second).",
    multiprocess_mode="livesum",
)
HTTP_BODY_READING_THREADS = Gauge(
    "gateway_http_body_reading_threads",
    "HTTP threads reading a request body that had not all arrived when they took the request "
    "(Expect: 100-continue, chunked, past what the selector holds; sampled twice a second).",
    multiprocess_mode="livesum",
)
DECODE_SECONDS = Histogram("gateway_decode_seconds", "Time to decode one image.", buckets=_LATENCY)
IMAGE_BYTES = Histogram(
    "gateway_image_bytes",
    "Encoded size of each image received.",
    buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8),
)
IMAGE_PIXELS = Histogram(
    "gateway_image_pixels",
    "Pixels of each image, from its header.",
    buckets=(1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8),
)
IMAGES_PER_REQUEST = Histogram(
    "gateway_images_per_request", "Images in one request.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
BATCH_SIZE = Histogram(
    "gateway_model_batch_size",
    "Images in one model call (dynamic batching merges requests).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
IMAGE_ERRORS = Counter(
    "gateway_image_errors_total", "Images refused or failed, by error code.", ["code"]
)
HTTP_CONNECTIONS_HANDED = Counter(
    "gateway_http_connections_handed_total",
    "HTTP connections a worker handed to another worker holding fewer, new and unread or "
    "between two requests (the kernel's spread over the workers is uneven over a few "
    "long-lived connections).",
)
# Counted by each new worker as it serves: the supervisor, which imported prometheus-client
# before it set up the multiprocess directory, keeps its values in its own memory.
WORKER_REPLACEMENTS = Counter(
    "gateway_worker_replacements_total",
    "Worker processes started in the place of others, by why the other went: exited (unasked), "
    "hung (a model call), silent (not heard from), stopped (a stop signal of its own), reload.",
    ["reason"],
)
REPLACEMENT_REASONS = ("exited", "hung", "silent", "stopped", "reload")


def worker_started(replacing: str) -> None:
    """A worker of several serves, in the place of one that went for `replacing`, if any.
    Every reason's series shows from the first worker on, at 0: increase() over a series
    counts from its second sample, and missed the first replacement of each kind."""
    for reason in REPLACEMENT_REASONS:
        WORKER_REPLACEMENTS.labels(reason)
    if replacing:
        WORKER_REPLACEMENTS.labels(replacing).inc()


class SampledShare:
    """One server's part of a gauge its sweep samples (`WAITING_FOR_THREAD` and the HTTP
    arriving gauges): each sample moves the gauge by what changed since the last, so the gauge
    is the sum over the process's servers. Set outright, two servers in one process (a test's
    gateway beside another) overwrote each other's samples, and the gauge showed whichever
    swept last. `clear` takes the share out for good as its server stops."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._value = 0.0
        self._cleared = False
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            if not self._cleared:  # else a last sweep, running as the server stopped
                self._move_to(value)

    def clear(self) -> None:
        with self._lock:
            self._move_to(0.0)
            self._cleared = True

    def _move_to(self, value: float) -> None:
        change, self._value = value - self._value, value
        if change:
            self._gauge.inc(change)


# Request threads do not update the metrics themselves. Every prometheus-client update takes a
# lock (in multiprocess mode one lock for the whole process), and with a dozen request threads
# and cv2.imdecode releasing the GIL those locks convoy: on a 64x64 PNG over gRPC they cost more
# than the decode. Request threads only append to a deque (atomic under the GIL); one thread
# applies the updates every FLUSH_INTERVAL seconds, and /metrics applies what is pending before
# it answers, so a scrape counts every request this worker has answered.
FLUSH_INTERVAL = 0.05
_pending: deque[tuple[Any, tuple[str, ...], float, bool]] = deque()
_flush_lock = threading.Lock()


def inc(metric: Counter | Gauge, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
    _pending.append((metric, labels, amount, False))


def observe(metric: Histogram, value: float, labels: tuple[str, ...] = ()) -> None:
    _pending.append((metric, labels, value, True))


def flush() -> None:
    """Apply the pending updates, summed per series: one request's in-flight +1 and -1 cancel,
    and a histogram takes one write per bucket it gained rather than one per observation. In
    multiprocess mode every write locks, checks the pid and packs into a mapped file; applied
    one by one they held the GIL for a tenth of the time on small images."""
    with _flush_lock:
        amounts: dict[tuple[Any, tuple[str, ...]], float] = defaultdict(float)
        observed: dict[tuple[Any, tuple[str, ...]], list[float]] = defaultdict(list)
        while True:
            try:
                metric, labels, value, is_observation = _pending.popleft()
            except IndexError:
                break
            if is_observation:
                observed[metric, labels].append(value)
            else:
                amounts[metric, labels] += value
        for (metric, labels), amount in amounts.items():
            if amount:
                (metric.labels(*labels) if labels else metric).inc(amount)
        for (metric, labels), values in observed.items():
            _observe_all(metric.labels(*labels) if labels else metric, values)


def _observe_all(histogram: Histogram, values: list[float]) -> None:
    # Histogram.observe(v) is `_sum.inc(v)` plus `_buckets[i].inc(1)` for the first bound
    # >= v; this is the same, counted first. prometheus-client has no public call for it.
    bounds = histogram._upper_bounds
    counts = collections.Counter(bisect.bisect_left(bounds, v) for v in values)
    histogram._sum.inc(math.fsum(values))
    for index, count in counts.items():
        histogram._buckets[index].inc(count)


def _flush_forever() -> None:
    stop = threading.Event()
    while not stop.wait(FLUSH_INTERVAL):
        try:
            flush()
        except Exception:  # one bad update must not stop the metrics (or let the queue grow)
            log.exception("could not apply a metric update")


threading.Thread(target=_flush_forever, name="metrics-flush", daemon=True).start()


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, aggregated over all workers."""
    flush()
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        with _files_lock(directory, fcntl.LOCK_SH):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# Counts of workers that have exited are folded into one file of each kind (`counter_archive.db`,
# read as any other), instead of staying in a file of their own: prometheus-client reads every
# file at every scrape, so with workers replaced by restarts and reloads a scrape cost more and
# more (prometheus/client_python#367). Only the supervisor folds, as it learns a worker has died
# and before it starts another that could take the same pid.
_FOLDED = ("counter", "histogram")
_ARCHIVE = "archive"
# Held shared by a scrape (which globs the directory, then reads each file) and exclusively while
# a dead worker's file gives way to the archive that holds its counts: a scrape sees one or the
# other, never both or neither, so no counter seems to go back.
_LOCK_FILE = ".files.lock"


@contextlib.contextmanager
def _files_lock(directory: str, operation: int) -> Iterator[None]:
    with open(os.path.join(directory, _LOCK_FILE), "a") as lock:
        fcntl.flock(lock, operation)
        yield  # closing the file lets go of the lock


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges, and fold its counts into the archive."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    for kind in _FOLDED:
        dead = os.path.join(directory, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            continue
        try:
            _fold(directory, kind, dead)
        except Exception:  # the supervisor runs this: its metrics must never stop it
            log.exception("could not fold %s into the archive; it stays as it is", dead)


def _fold(directory: str, kind: str, dead: str) -> None:
    archive = os.path.join(directory, f"{kind}_{_ARCHIVE}.db")
    totals: dict[str, float] = defaultdict(float)
    for path in (archive, dead):
        if os.path.exists(path):
            values = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
            for key, value, _timestamp, _pos in values:
                totals[key] += value
    staged = os.path.join(directory, f".{kind}_{_ARCHIVE}.staged")  # not *.db: not read
    with contextlib.suppress(FileNotFoundError):  # left by a fold that failed: MmapedDict
        os.unlink(staged)  # would add to what it holds
    written = MmapedDict(staged)  # type: ignore[no-untyped-call]
    try:
        for key, value in totals.items():
            written.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        written.close()  # type: ignore[no-untyped-call]
    with _files_lock(directory, fcntl.LOCK_EX):
        os.replace(staged, archive)
        os.unlink(dead)

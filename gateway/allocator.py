"""glibc malloc settings for a long-running, many-threaded server of large short-lived buffers.

Each request allocates megabytes (bodies, decoded images) from one of many threads. Two glibc
defaults hurt such a server:
- busy threads get arenas of their own (up to 8 per core), and freed buffers stay in them: under
  a steady mixed load RSS climbed by 254 MiB in 60 s; two arenas keep it within tens of MiB;
- buffers over the mmap threshold (128 KiB, raised on the fly only for sizes already freed) are
  fresh mappings each time, page-faulted in and zeroed by the kernel: that doubled the cost of
  decoding a 640x480 JPEG (0.7 ms -> 1.4 ms here). A fixed 4 MiB threshold reuses heap memory
  for everything smaller (bodies and images up to about 1.3 megapixels) and still returns larger
  buffers to the system when freed; a 16 MiB trim threshold keeps the heap from being handed back
  and faulted in again between two requests. Larger thresholds (32 / 64 MiB) were faster on big
  images but left a 60 s soak 188 MiB larger; these keep it within 20 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024

# The same settings as environment variables, for processes started with them (benchmarks).
ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_ARENA_MAX": "2",
}


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc, not another C library
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (malloc_trim). grpc receives a large message
    as many small pieces, freed once Python has its bytes; they sit below the heap's top, where
    the trim threshold never reaches, and would keep the RSS of a 50 MB call up by 50 MB."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def tune() -> None:
    """Apply the settings (those the environment does not choose itself) on glibc."""
    if _LIBC is None:
        return
    mallopt = _LIBC.mallopt
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 2)
    log.debug("glibc malloc tuned for large short-lived buffers")

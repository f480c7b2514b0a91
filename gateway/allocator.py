"""glibc malloc settings for a long-running, many-threaded server of large short-lived buffers.

Each request allocates megabytes (bodies, decoded images) from one of many threads. By default
glibc gives busy threads their own arenas and raises its mmap threshold after the first large
free, so those buffers come from arenas that rarely shrink: under a steady mixed load RSS climbs
by hundreds of MiB and stays there. A fixed 128 KiB mmap threshold returns every large buffer to
the system when freed, and two arenas keep small allocations from spreading.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune() -> None:
    """Apply the settings, unless the environment already chooses them or libc is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 2)
    log.debug("glibc malloc tuned for large short-lived buffers")

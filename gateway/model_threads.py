"""The thread pools of native math libraries (BLAS, OpenMP), sized for a server of many callers.

OpenBLAS, MKL and OpenMP each start a pool of one thread per core, made for one caller at a
time. The gateway calls its models from many request threads at once, in one worker per core, so
those pools oversubscribe the cores many times over, and OpenBLAS's threads spin while they wait:
a numpy model doing one matrix product a request (benchmarks/models.py:embedding) served 52
requests/s at concurrency 16 on two workers with the pools as they come, and 358 with one
thread each. Serving systems' users meet the same with PyTorch (kserve/kserve#1031).

A worker therefore gives each library, and OpenCV's own pool (used by cv2.resize and the like
in model code), `--model-threads` threads (1 by default: the request threads and the workers
already use every core). If the environment names a thread count for any of them, the operator
has chosen: every pool is then left as the libraries set it from the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import cv2
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

# What the libraries read when they load: OpenMP, OpenBLAS, MKL, BLIS, Apple's Accelerate,
# numexpr, OpenCV.
VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


def limit(threads: int, environ: MutableMapping[str, str] = os.environ) -> None:
    """Size the pools of this process's math libraries: those loaded already (numpy's and
    OpenCV's OpenBLAS, OpenCV's own pool) at once, and those a model loads later through the
    environment they read."""
    # Empty is unset, to the libraries too.
    chosen = sorted(f"{name}={environ[name]}" for name in VARIABLES if environ.get(name))
    if chosen:
        log.info("model threads left to the environment (%s)", ", ".join(chosen))
        return
    if threads == 0:
        return
    for name in VARIABLES:
        environ[name] = str(threads)
    threadpool_limits(threads)
    cv2.setNumThreads(threads)

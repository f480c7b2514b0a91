"""A model's dynamic batching policy: its own module, so that reading the configuration (as the
supervisor does) imports no numpy and no metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    # Seconds the first request of a batch may wait for others.
    max_wait: float

"""What each request thread of the data plane is doing, told to whoever wants to know: a worker
of several keeps it where its supervisor can read it once the worker has died (gateway.inflight),
to name the requests a crash in native code (a decoder, a model) happened during.

Called on the hot path, from the request's own thread (and the decode helpers working for it):
an implementation must be a few memory stores, with no lock, system call or pipe write."""

from __future__ import annotations

from typing import Protocol


class Activity(Protocol):
    def decoding(self, request_id: str, model: str) -> None:
        """This thread decodes images of request `request_id`, for `model`."""

    def in_model(self, request_id: str, model: str) -> None:
        """This thread calls `model` (or waits for its batch) for request `request_id`."""

    def idle(self) -> None:
        """This thread is done with what it last said it did."""


class Unwatched:
    """Nobody wants to know (one process alone, which has no supervisor to tell)."""

    def decoding(self, request_id: str, model: str) -> None:
        pass

    def in_model(self, request_id: str, model: str) -> None:
        pass

    def idle(self) -> None:
        pass

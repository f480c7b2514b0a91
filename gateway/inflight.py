"""The requests a worker is decoding or running a model for, kept in memory its supervisor
shares, so that the supervisor can name them once the worker has died: a decoder or a model
that aborts or crashes in native code (SIGABRT, SIGSEGV) ends the whole process, and nothing
the worker could say or log after it.

The supervisor makes a table for each worker it starts, one slot per request thread; a request
thread takes a slot the first time it says what it does, and keeps it until it ends. Writing a
slot is a few plain stores into shared memory: no lock, no system call, no pipe write. The
slot is marked idle before its request id and model are written, and marked busy after, so a
worker that dies in the middle of a write leaves a slot that reads as idle, never a torn id.
Imported by the supervisor, it must stay light (no servers, no OpenCV).
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

from gateway.config import Settings

# What a slot says its thread does.
IDLE, DECODING, IN_MODEL = 0, 1, 2
# Request ids are at most 128 characters (gateway.core.dataplane.MAX_REQUEST_ID); model names
# are anyone's, and are kept to as many bytes as an error message shows of them.
ID_BYTES = 128
MODEL_BYTES = 64
_CUT = b"..."
# Request threads a worker may have beyond its HTTP, gRPC and decode threads (gRPC's spare
# stream threads, say); a thread that finds no slot free is counted, not recorded.
_SPARE_SLOTS = 16


class Slot(ctypes.Structure):
    _fields_ = [
        ("phase", ctypes.c_uint8),
        ("request_id", ctypes.c_char * ID_BYTES),
        ("model", ctypes.c_char * MODEL_BYTES),
    ]


@dataclass
class Table:
    """One worker's slots, and how many of its request threads found none free."""

    slots: Any  # a shared ctypes array of Slot
    missed: Any  # a shared ctypes c_uint32


@dataclass(frozen=True)
class UnderWay:
    request_id: str
    phase: int
    model: str

    def __str__(self) -> str:
        doing = "decoding its images for" if self.phase == DECODING else "in"
        return f"request {self.request_id!r} ({doing} model {self.model!r})"


def slot_count(settings: Settings) -> int:
    """Slots enough for every thread of a worker that may work on a request: its HTTP threads,
    its gRPC threads for unary calls and for streams, and its decode helpers (one per CPU, as
    gateway.core.dataplane makes them)."""
    return (
        settings.http_threads
        + settings.grpc_threads
        + settings.max_streams
        + (os.cpu_count() or 1)
        + _SPARE_SLOTS
    )


def make_table(context: BaseContext, slots: int) -> Table:
    """A table in shared memory, zeroed (every slot idle), to pass to a worker as it starts."""
    return Table(context.RawArray(Slot, slots), context.RawValue(ctypes.c_uint32, 0))


def _bounded(text: str, most: int, encoding: str) -> bytes:
    data = text.encode(encoding, "backslashreplace")
    if len(data) > most:
        data = data[: most - len(_CUT)] + _CUT
    return data


def under_way(table: Table) -> list[UnderWay]:
    """What the table says its worker's threads were doing (read once the worker has died)."""
    found = []
    for slot in table.slots:
        phase = slot.phase
        if phase in (DECODING, IN_MODEL):
            request_id = slot.request_id.decode("ascii", "backslashreplace")
            model = slot.model.decode("utf-8", "backslashreplace")
            found.append(UnderWay(request_id, phase, model))
    return found


def missed(table: Table) -> int:
    return int(table.missed.value)


class _Held:
    """A thread's hold on its slot: freed once the thread ends and its thread-local goes."""

    __slots__ = ("__weakref__", "slot")

    def __init__(self, slot: Slot | None) -> None:
        self.slot = slot


class Recorder:
    """Writes what each request thread does into its slot of `table` (gateway.core.activity's
    Activity)."""

    def __init__(self, table: Table) -> None:
        self._table = table
        slots = table.slots
        # Taken from the end: list.pop() and list.append() are each one step under the GIL.
        self._free = [slots[i] for i in range(len(slots) - 1, -1, -1)]
        self._local = threading.local()
        # The encoded name of each model served: names come from the registry, not clients.
        self._names: dict[str, bytes] = {}

    def _slot(self) -> Slot | None:
        try:
            return self._local.held.slot  # type: ignore[no-any-return]
        except AttributeError:
            return self._take()

    def _take(self) -> Slot | None:
        try:
            slot: Slot | None = self._free.pop()
        except IndexError:
            slot = None
            self._table.missed.value += 1  # once a thread: it holds its None from here on
        held = _Held(slot)
        if slot is not None:
            weakref.finalize(held, self._give_back, slot)
        self._local.held = held
        return slot

    def _give_back(self, slot: Slot) -> None:
        slot.phase = IDLE
        self._free.append(slot)

    def _mark(self, phase: int, request_id: str, model: str) -> None:
        slot = self._slot()
        if slot is None:
            return
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = _bounded(model, MODEL_BYTES, "utf-8")
        slot.phase = IDLE
        slot.request_id = _bounded(request_id, ID_BYTES, "ascii")
        slot.model = name
        slot.phase = phase

    def decoding(self, request_id: str, model: str) -> None:
        self._mark(DECODING, request_id, model)

    def in_model(self, request_id: str, model: str) -> None:
        self._mark(IN_MODEL, request_id, model)

    def idle(self) -> None:
        slot = self._slot()
        if slot is not None:
            slot.phase = IDLE

"""Stop and reload signals, acted on by a thread of their own instead of a Python handler.

Python runs a signal's handler on the main thread, between two bytecodes, wherever that thread
is. A handler that set the stop Event could land while the main thread held that Event's lock
(inside Event.wait, or inside the Event.set of a handler it interrupted) and then wait for the
lock for ever; one that logged could be interrupted inside its own logging by the next signal.
A worker of a gateway stopped by a signal to its whole process group (systemd's default, a
terminal's Ctrl-C) gets it twice within a millisecond, once more from its supervisor, and hung
in one stop of two here; a burst of signals hung a single process or ended it with a
RecursionError. (python/cpython#126434 is the same deadlock for multiprocessing.Event.)

Here Python's handler does nothing. Its C part writes the signal's number to a pipe
(signal.set_wakeup_fd) from whichever thread the kernel chose, and the "signals" thread reads it
and calls the action, holding no lock of anyone else's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping


def _nothing(_signum: int, _frame: object) -> None:
    """Python's handler: the pipe has the signal already."""


def handle(actions: Mapping[int, Callable[[int], None]]) -> None:
    """Call actions[signum](signum) on the "signals" thread for each of these signals the
    process gets from now on. From the main thread, once per process."""
    table = {int(signum): action for signum, action in actions.items()}
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd's rule: a full pipe drops, never blocks
    threading.Thread(target=_dispatch, args=(read_end, table), name="signals", daemon=True).start()
    # The pipe first: a signal between the two would otherwise reach a handler with no pipe.
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for signum in table:
        signal.signal(signum, _nothing)


def _dispatch(read_end: int, table: dict[int, Callable[[int], None]]) -> None:
    # This thread never takes these signals itself: the supervisor blocks SIGINT on the main
    # thread while it starts a worker with it ignored, so that one coming then waits for its
    # handler; taken by a thread that did not block it, it was dropped.
    signal.pthread_sigmask(signal.SIG_BLOCK, table)
    while True:
        for signum in os.read(read_end, 64):
            action = table.get(signum)
            if action is not None:
                action(signum)


def ignore(signums: Iterable[int]) -> None:
    """From the main thread, once the stop they ask for is under way: another changes nothing,
    and one coming while Python finalizes, which puts back their default actions, killed the
    process (exit code 143 after "image-gateway stopped").

    One that comes as its handler changes (in a burst of them) has been noted by Python's C
    handler, but finds no Python handler when its turn comes. CPython reports each such signal as
    an unraisable OSError, "Signal 15 ignored due to race condition", and the log had it as an
    ERROR with a traceback, after 3 of 40 bursts of SIGTERM to one process. Ignored is what these
    signals were asked to be, so those reports are dropped."""
    ours = frozenset(int(signum) for signum in signums)
    _drop_late_reports(ours)
    for signum in ours:
        signal.signal(signum, signal.SIG_IGN)


def _drop_late_reports(signums: frozenset[int]) -> None:
    """Drop CPython's reports of these signals coming too late for a Python handler; pass on
    every other unraisable exception. The report is told by its words: it carries no more."""
    late = {f"Signal {signum} ignored due to race condition" for signum in signums}
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        error = unraisable.exc_value
        if unraisable.object is None and type(error) is OSError and str(error) in late:
            return
        previous(unraisable)

    sys.unraisablehook = hook

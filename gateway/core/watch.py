"""Files read again when they change (certificates, tokens): rotated in place by cert-manager or
a Kubernetes Secret's volume, which swaps a symlink, they are never restarted for."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Signature = tuple[tuple[int, int, int], ...]


def signature(*paths: str) -> Signature | None:
    """The files' inode, size and modification time; None while one cannot be looked at."""
    try:
        stats = [os.stat(path) for path in paths if path]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class WatchedFiles(Generic[T]):
    """What `read` makes of some files, made again once they change and `read` takes them.

    `read` raises ValueError for files it cannot use; until they change again, what was made
    last stays in force, as it does while a file is missing (a rotation half done, or a
    delete-then-write). The files are looked at most once every `every` seconds."""

    def __init__(
        self, paths: tuple[str, ...], read: Callable[[], T], what: str, every: float = 0.0
    ) -> None:
        self._paths = tuple(p for p in paths if p)
        self._read = read
        self._what = what
        self._every = every
        self._seen = signature(*self._paths)
        self.current = read()
        self._next_look = time.monotonic() + every
        # Asked from several threads at once (handshakes, requests): one looks, the others go
        # on with what is in force rather than wait for it.
        self._looking = threading.Lock()

    def changed(self) -> T | None:
        """What the files make now, if they changed since last seen and are usable; else None.
        A stat per file when they did not."""
        now = time.monotonic()
        if now < self._next_look or not self._looking.acquire(blocking=False):
            return None
        try:
            self._next_look = now + self._every
            return self._look()
        finally:
            self._looking.release()

    def _look(self) -> T | None:
        seen = signature(*self._paths)
        if seen is None and self._seen is not None:
            # Said once, not at every look while it stays away.
            log.warning("%s cannot be looked at; keeping what is in force", self._what)
        if seen == self._seen:
            return None
        self._seen = seen
        if seen is None:
            return None
        try:
            made = self._read()
        except ValueError as exc:
            log.warning("%s changed but cannot be used (%s); keeping the old", self._what, exc)
            return None
        if signature(*self._paths) != seen:
            # Written to while read, and maybe read half-written: read at the next look.
            self._seen = None
            return None
        if made == self.current:
            return None
        self.current = made
        return made

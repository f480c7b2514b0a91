"""What identifies one version of a file that is read again when it changes (certificates,
tokens): rotated in place by cert-manager or a Kubernetes Secret's volume, which swaps a symlink,
such a file is never restarted for."""

from __future__ import annotations

import os

Signature = tuple[tuple[int, int, int], ...]


def signature(*paths: str) -> Signature | None:
    """The files' inode, size and modification time; None while one cannot be looked at."""
    try:
        stats = [os.stat(path) for path in paths if path]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

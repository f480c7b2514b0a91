"""The gateway's limit on open files: every connection a process holds is one.

systemd starts a service with a soft limit of 1024 open files and a hard limit of 524288: the soft
one for programs that wait on descriptors with select(), which cannot watch those from 1024 on.
Its manual (systemd.exec, LimitNOFILE=) asks programs that can to raise their soft limit to the
hard one themselves, as Go's runtime and QEMU do. The gateway's servers wait with epoll and poll,
never select(), so each process of it raises its soft limit at start, and the hard limit is the
bound that counts. At a soft limit of 1024, one worker with 1500 gRPC connections opened to it
held 1024 descriptors: the other connections waited in its listen queue, their calls unanswered,
while grpc logged "File descriptor limit reached. Retrying." once a second. Raised, it held all
1500.
"""

from __future__ import annotations

import resource


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (its workers inherit it);
    gives the soft limit before and after. Left as it is when the hard limit is none (another
    system's RLIM_INFINITY, which no soft limit may take) or the raise is refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # a sandbox that forbids it: the limit it set stands
        return soft, soft
    return soft, hard

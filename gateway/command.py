"""The `image-gateway` command (and `python -m gateway`), light enough to take a Ctrl-C.

Importing the servers takes the first 0.4 s or so of a start, before the gateway has any signal
handling of its own: a Ctrl-C then, at a start changed one's mind about, printed a
KeyboardInterrupt traceback of some thirty lines from inside whichever library was loading.
Nothing is serving yet, so there is nothing to drain either: it ends the command quietly, as a
shell reports SIGINT (130). From the gateway's own handling on, Ctrl-C drains as usual.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway import config

log = logging.getLogger("gateway")


# prometheus_client's multiprocess mode, read as the metrics are made (on import): the
# supervisor of several workers sets it to a directory of its own, and one process has no use
# for it. Taken from the environment before that import.
_PROMETHEUS_DIRS = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def main(argv: Sequence[str] | None = None) -> int:
    _open_standard_descriptors()
    # Set for another server in the same image (gunicorn's metrics), it was used before the
    # supervisor set its own: a directory that was not there stopped the start with a
    # traceback, and one that was carried a single process's counts over from run to run.
    ignored = {name: os.environ.pop(name) for name in _PROMETHEUS_DIRS if name in os.environ}
    try:
        from gateway import config

        parser = argparse.ArgumentParser(
            prog="image-gateway", description="Image inference gateway over HTTP and gRPC."
        )
        commands = parser.add_subparsers(dest="command", required=True)
        serve_parser = commands.add_parser("serve", help="serve models over HTTP and gRPC")
        config.add_arguments(serve_parser)
        args = parser.parse_args(argv)
        settings = config.from_namespace(args, os.environ, serve_parser)
        # A model given as package.module:factory is found from the working directory first,
        # as `python -m` would (and gunicorn and uvicorn do); an installed script starts
        # without it. Worker processes inherit the path.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return serve(settings, ignored)
    except KeyboardInterrupt:
        return 130


def _open_standard_descriptors() -> None:
    """File descriptors 0, 1 and 2 open, on /dev/null where they were closed. Started with them
    closed (`<&- >&- 2>&-`), the gateway's next files took their numbers: a shared-memory file
    of the supervisor became its workers' stderr, and their log was written into it; a
    metrics file became a worker's stdout."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            # Python opens descriptors close-on-exec: the workers' would be closed again.
            os.set_inheritable(fd, True)


def serve(settings: config.Settings, ignored: dict[str, str] | None = None) -> int:
    """Serve until a stop signal: as one process, or as a supervisor of workers. The supervisor
    imports none of the servers (grpc, OpenCV, Flask): it held as much memory as a worker,
    114 MB, for nothing it used."""
    from gateway import config, descriptors, logs, workers

    # One process only when asked (--workers 1). By default a supervisor runs even one worker
    # (one CPU to use, as in a container limited to one): it restarts the worker, replaces it
    # when silent or hung, and reloads, which one process cannot do on its own.
    alone = settings.workers == 1
    # Each process that decodes relays its native code's stderr: the one process here, or each
    # worker (gateway.serve.run_worker); the supervisor decodes nothing.
    logs.configure(settings, relay_native=alone)
    before, after = descriptors.raise_open_file_limit()
    if after != before:
        log.debug("open files: soft limit raised from %d to the hard limit, %d", before, after)
    for line in config.unknown_variables(os.environ):
        log.warning("%s", line)
    for name, value in (ignored or {}).items():
        log.warning(
            "%s=%s from the environment is ignored: the gateway keeps its workers' metrics in "
            "a directory of its own",
            name,
            value,
        )
    try:
        workers.check_host(settings.host)
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        return 1
    try:
        if alone:
            from gateway import serve as one_process

            return one_process.run_alone(settings)
        from gateway import supervisor

        return supervisor.supervise(settings)
    finally:
        logs.let_broken_streams_go()

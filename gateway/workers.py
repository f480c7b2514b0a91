"""Several worker processes serving both protocols on the same ports: what a worker and its
supervisor (gateway.supervisor) share, and the worker process's entry point.

Each worker is a whole gateway (core, HTTP server, gRPC server) in its own process, with its own
GIL; all bind their ports with SO_REUSEPORT, and the kernel spreads incoming connections across
them. Workers are spawned, not forked, so no gRPC or OpenCV state crosses a fork.

The supervisor binds each port first (SO_REUSEPORT, not listening) to learn it when the port is 0
and to fail early when it is taken, and passes the concrete ports to the workers.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

from gateway.config import Settings, url_host
from gateway.inflight import Table
from gateway.rest.balance import Place

log = logging.getLogger("gateway")

# Each drains the gateway. SIGHUP too (a closed terminal, or an operator's reload): its default
# killed the process at once, requests in flight and the metrics directory left behind.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Replaces the workers one at a time (a rolling reload: new model code and weights without a
# stop). Not SIGHUP: a closed terminal sends it to every process of the gateway, which must stop.
RELOAD_SIGNAL = signal.SIGUSR1
# What a worker and its supervisor tell each other over the worker's pipe: the worker serves; it
# has drained; all have, close; it is replaced, finish and exit. A worker waits for CLOSE at most
# CLOSE_SLACK seconds past its grace.
READY, DRAINED, CLOSE, RETIRE = "ready", "drained", "close", "retire"
# From a worker: a model call of mine has hung; replace me. I was sent a stop signal of my own,
# and finish my requests while the others serve: put another in my place.
HUNG, LEAVING = "hung", "leaving"
CLOSE_SLACK = 1.0


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (without listening) so that port 0 becomes a concrete port all workers share.

    First without SO_REUSEPORT, which fails while any other process listens on the port: with
    it alone, a second gateway started on the same ports joined the first one's, and the kernel
    split the connections between the two. SO_REUSEADDR on both lets a port whose last
    connections still wait out TIME_WAIT be taken again at once, as the single-process
    servers' own sockets do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{host}:{port} is taken ({exc.strerror})") from None
            raise OSError(exc.errno, f"cannot bind {host}:{port} ({exc.strerror})") from None
        port = int(probe.getsockname()[1])
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock, port


def check_host(host: str) -> None:
    """Raise OSError, naming --host, if `host` does not resolve or is no address of this
    machine: found here, the error is one line saying so, where the servers' own binds said
    "is taken" or "Failed to bind to address" after a line of grpc's own."""
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise OSError(f"--host {host!r} does not resolve ({reason})") from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(
                exc.errno, f"--host {host!r} is not an address of this machine ({exc.strerror})"
            ) from None


def log_ready(settings: Settings, http_port: int, grpc_port: int, count: int) -> None:
    """The one line that says the gateway serves, and where (tools wait for it)."""
    host = url_host(settings.host)
    files = settings.grpc_tls
    tls = "" if files is None else " grpc_tls=" + ("mutual" if files.client_ca else "on")
    if settings.auth_token_file:
        tls += " auth=tokens"
    log.info(
        "image-gateway ready: http=http://%s:%d grpc=%s:%d models=%s workers=%d pid=%d%s",
        host,
        http_port,
        host,
        grpc_port,
        ",".join(settings.model),
        count,
        os.getpid(),
        tls,
    )


# Signals the supervisor blocks while it starts a worker (see Supervisor.spawn). SIGHUP as
# SIGINT: a closed terminal sends it to the whole group, and a worker still importing died of it
# where the supervisor, which takes it too, stops it cleanly.
HELD_AT_SPAWN = (signal.SIGINT, signal.SIGHUP, RELOAD_SIGNAL)


def worker_main(
    settings: Settings,
    ready: Connection,
    parent: int,
    stopping: EventType,
    heard_at: ctypes.c_double,
    replacing: str,
    balance: Place | None,
    inflight: Table,
) -> None:
    # Runs in the spawned child: imports the servers only here. A child starts with its
    # parent's signal mask, and so with the signals the supervisor held back while it started
    # it blocked, in every thread it makes: its SIGINT was never taken, so that `kill -INT` of
    # any worker but the first the supervisor started (the resource tracker, started with the
    # first, had unblocked SIGINT for it) did nothing. They are still ignored here, until the
    # worker's own handlers are in place.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_AT_SPAWN)
    from gateway import serve

    try:
        code = serve.run_worker(
            settings, ready, parent, stopping, heard_at, replacing, balance, inflight
        )
    finally:
        from gateway import logs

        logs.let_broken_streams_go()
    raise SystemExit(code)

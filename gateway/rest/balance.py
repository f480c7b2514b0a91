"""HTTP connections spread evenly over the workers, however the kernel spreads them.

The kernel hands each new connection to one worker's listener (SO_REUSEPORT) by a hash of its
addresses and ports: even over many short connections, not over a few long ones. Eight
keep-alive connections to two workers split 2/6 or 1/7 in 7 runs of 18, which cost HTTP up to a
third of its throughput (docs/performance.md). So a worker that accepts a connection while it
holds more than the worker holding fewest hands the connection over, before reading a byte of
it: the socket goes to that worker over a Unix socket (SCM_RIGHTS), much as Envoy's exact
connection balancing hands one between its threads. A worker holding MOVE_MARGIN more hands
over a keep-alive connection between two of its requests the same way. gRPC's connections are
accepted inside grpcio's core, out of the gateway's reach, and stay where the kernel put them.

The supervisor makes one Unix datagram socket pair per place (a worker's place, which its
replacement takes over) and a table of the connections each place's worker holds, and gives
every worker the sending ends of all places and the receiving end of its own. Only the
supervisor and its workers hold them. What a worker was handed and had not yet taken when it
died or left goes to another worker (`Handover.vacate`); what a worker a reload replaced had not
taken is taken by its replacement, which gets the same receiving end.

Stdlib only: the supervisor, which imports none of the servers, makes these.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import threading
from dataclasses import dataclass
from typing import Any

# A worker hands a connection over while it holds at least this many more than the worker
# holding fewest; at 1, keep-alive connections end at most one apart. At 2, four wrk connections
# to two workers ended 1/3 in four runs of four (1509-1636 req/s on the 64x64 PNG, against
# 1952-2183 at 1, where they ended 2/2). Clients that open a connection per request (wrk with
# `Connection: close`, eight at a time) had a third of their connections handed over at 1, a
# fifth at 2, at no cost the runs could see (1013-1076 req/s, 1034-1350, and 1000-1155 before
# any were handed over).
MARGIN = 1
# A connection already open (between two of its requests) is handed over while its worker holds
# at least this many more than the worker holding fewest: counts at a connection's start can be
# wrong for a moment (those of connections whose clients have closed them and whose workers have
# not yet seen it), and wrk's eight connections, opened right after another run's had closed,
# ended 3/5 and 2/6 in 2 runs of 3 with MARGIN alone. At 1, connections would go back and forth
# between two workers holding 4 and 5.
MOVE_MARGIN = 2
# What a place's count reads while no worker takes connections there (its worker died, or left
# on a stop signal of its own): never the fewest.
VACANT = -1
# Sockets taken from the receiving end at a time.
_TAKE_MAX = 64


@dataclass(frozen=True)
class Place:
    """What one worker gets: its place, the table, and the Unix sockets."""

    index: int
    held: Any  # multiprocessing RawArray of c_int64, one per place
    senders: tuple[socket.socket, ...]
    receiver: socket.socket


class Handover:
    """The supervisor's side: the sockets and the table, for every place."""

    def __init__(self, context: Any, places: int) -> None:
        self.held = context.RawArray(ctypes.c_int64, [VACANT] * places)
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(places)]

    def place(self, index: int) -> Place:
        return Place(index, self.held, tuple(s for s, _ in self._pairs), self._pairs[index][1])

    def vacate(self, index: int) -> None:
        """No worker takes connections at place `index` until its next one serves (its worker
        died, or leaves). Those handed to it and not yet taken go to the place holding fewest:
        its replacement may be seconds away (minutes, when it cannot start), and their
        clients, who had connected and perhaps sent their request, would wait that long."""
        held = self.held
        held[index] = VACANT
        receiver = self._pairs[index][1]
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(receiver, 1, _TAKE_MAX, socket.MSG_DONTWAIT)
            except OSError:  # none left
                return
            for fd in fds:
                with socket.socket(fileno=fd):
                    taking = [i for i in range(len(self._pairs)) if held[i] != VACANT]
                    if taking:
                        target = min(taking, key=lambda i: held[i])
                        with contextlib.suppress(OSError):  # closed: its client tries again
                            socket.send_fds(
                                self._pairs[target][0], [b"c"], [fd], socket.MSG_DONTWAIT
                            )


class Balancer:
    """A worker's side: counts the connections this worker holds, publishes the count, and
    hands a connection over (just accepted, or between two of its requests) when another
    worker holds fewer."""

    def __init__(self, place: Place) -> None:
        self._place = place
        self._lock = threading.Lock()
        # Request threads hand over open connections while the selector thread hands over new
        # ones: one chooses at a time.
        self._choosing = threading.Lock()
        self._count = 0
        self._publishing = True
        places = len(place.senders)
        # Per place: the count last read there, and the connections handed to it since (the
        # count there does not show them until its worker has taken them).
        self._seen = [VACANT] * places
        self._in_flight = [0] * places
        self.receiver = place.receiver
        self.receiver.setblocking(False)

    def publish(self) -> None:
        """Say how many connections this worker holds (it takes connections at its place
        from its first say)."""
        with self._lock:
            self._publish()

    def opened(self) -> None:
        with self._lock:
            self._count += 1
            self._publish()

    def closed(self) -> None:
        with self._lock:
            self._count -= 1
            self._publish()

    def stop(self) -> None:
        """This worker is leaving: its place is its replacement's to publish (or the
        supervisor's to vacate), and it hands nothing over any more."""
        with self._lock:
            self._publishing = False

    def _publish(self) -> None:
        if self._publishing:
            self._place.held[self._place.index] = self._count

    def hand_over(self, sock: socket.socket, margin: int = MARGIN, close: bool = True) -> bool:
        """Send `sock` to the worker holding fewest, if this one holds at least `margin` more;
        whether it went (then this process's copy is closed, with `close`)."""
        if not self._publishing:
            return False
        with self._choosing:
            if not self._send_to_fewest(sock, margin):
                return False
        if close:
            sock.close()
        return True

    def _send_to_fewest(self, sock: socket.socket, margin: int) -> bool:
        held = self._place.held
        fewest, target = None, -1
        for index in range(len(self._seen)):
            if index == self._place.index:
                continue
            count = held[index]
            if count != self._seen[index]:
                self._seen[index], self._in_flight[index] = count, 0
            if count == VACANT:
                continue
            load = count + self._in_flight[index]
            if fewest is None or load < fewest:
                fewest, target = load, index
        if fewest is None or self._count < fewest + margin:
            return False
        try:
            socket.send_fds(
                self._place.senders[target], [b"c"], [sock.fileno()], socket.MSG_DONTWAIT
            )
        except OSError:  # its queue is full: it is not taking them fast enough anyway
            return False
        self._in_flight[target] += 1
        return True

    def take(self) -> list[socket.socket]:
        """The connections handed to this worker and not yet taken."""
        taken = []
        with contextlib.suppress(BlockingIOError):
            while True:
                _, fds, _, _ = socket.recv_fds(self.receiver, 1, _TAKE_MAX)
                taken += [socket.socket(fileno=fd) for fd in fds]
        return taken

"""The supervisor of several worker processes (gateway.workers): it starts them, restarts one
that dies unexpectedly (and kills one whose threads no longer run), waiting longer each time one
dies soon after its start or fails to start, replaces every worker one at a time on SIGUSR1 (a
reload), and stops them together.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path

from gateway import inflight, signals
from gateway.config import Settings, worker_count
from gateway.rest.balance import Handover
from gateway.workers import (
    CLOSE,
    CLOSE_SLACK,
    DRAINED,
    HELD_AT_SPAWN,
    HUNG,
    LEAVING,
    READY,
    RELOAD_SIGNAL,
    RETIRE,
    STOP_SIGNALS,
    log_ready,
    reserve_port,
    worker_main,
)

log = logging.getLogger("gateway")

# Seconds before a dead worker's replacement starts. The wait doubles with each worker of the
# same place that dies within _STABLE_AFTER seconds of its start, or fails to start, up to
# _RESTART_BACKOFF_MAX: a worker that cannot start (a model whose weights are gone, say) is
# retried ever more slowly instead of every second or two, each try a whole Python process
# importing and loading everything. A worker that served _STABLE_AFTER seconds starts the count
# again.
_RESTART_BACKOFF = 1.0
_RESTART_BACKOFF_MAX = 60.0
_STABLE_AFTER = 60.0
_METRICS_PREFIX = "image-gateway-metrics-"
# Seconds between two looks at a stop signal while a worker starts.
_START_POLL = 0.1
# Seconds between two looks at the workers (exited, hung, or stopped on a signal of their own:
# the sooner such a one is replaced, the sooner the gateway has all its workers again).
_LOOK = 0.1
# Exit codes of a worker stopped by a signal before it served: 0 once its handler is in place
# (it has nothing to drain, and exits at once), minus the signal's number before. And the
# seconds the supervisor then waits for a stop signal of its own, sent to the process group.
_STOPPED_WHILE_STARTING = frozenset([0, *(-signum for signum in STOP_SIGNALS)])
_STOP_SIGNAL_WAIT = 1.0
# A serving worker writes the time every second (gateway.serve.HUNG_LOOK) from a thread of its
# own. One not heard from for --request-timeout, and at least _SILENT_MIN seconds, is stopped
# (SIGSTOP, a debugger) or has a call that holds the GIL: it answers no one, cannot drain, and
# the kernel goes on handing it its share of new connections, whose clients wait for ever.
_SILENT_MIN = 5.0
# Seconds between two of the supervisor's looks past which it counts a silence afresh.
_AWAY = 1.0
# Seconds between two looks for adopted processes that have ended (see reap_adopted).
_ADOPTED_LOOK = 1.0


@dataclass
class _Worker:
    proc: multiprocessing.process.BaseProcess
    pipe: Connection
    # time.monotonic() once it served.
    started_at: float
    # time.monotonic() when it last said its threads run (written by the worker).
    heard_at: ctypes.c_double
    # What its request threads decode and run, for which request (written by the worker).
    requests: inflight.Table
    # time.monotonic() when a reload told it to retire, or it stopped on a signal of its own.
    retired_at: float | None = None
    # It has said DRAINED, and waits for CLOSE.
    drained: bool = False
    # Why it goes, once it goes without being asked to (gateway.metrics.REPLACEMENT_REASONS).
    gone_for: str = "exited"


@dataclass
class _Starting:
    """A worker spawned that has not yet said it serves."""

    proc: multiprocessing.process.BaseProcess
    pipe: Connection
    heard_at: ctypes.c_double
    requests: inflight.Table
    # time.monotonic() by which it must serve (--start-timeout from its spawn).
    deadline: float

    def due(self) -> bool:
        """Whether it is time to take it: it has said something (READY, or closed its pipe),
        or its start timeout is up."""
        return self.pipe.poll() or time.monotonic() >= self.deadline


def _end_starting(proc: multiprocessing.process.BaseProcess, stopping: threading.Event) -> None:
    """End a worker that has not served: SIGTERM, then SIGKILL if it is still there a second
    later (10 s outside a stop)."""
    if proc.is_alive():
        proc.terminate()
        proc.join(1 if stopping.is_set() else 10)
    if proc.is_alive():
        # Its handler, which exits a worker that has not served, runs only between two Python
        # steps of its main thread: a model loading in one long native call (reading its
        # weights, say) does not see it. It has served nothing yet.
        proc.kill()
        proc.join()


def restart_delay(failures: int) -> float:
    """Seconds before the next start in a worker's place, after `failures` workers in a row
    died soon after their start or did not start."""
    return min(_RESTART_BACKOFF * 2.0 ** min(failures, 32), _RESTART_BACKOFF_MAX)


def _answered(
    pipe: Connection, deadline: float, stopping: threading.Event, meanwhile: Callable[[], None]
) -> bool:
    """Whether a starting worker has sent on its pipe by `deadline` (time.monotonic(); past it a
    start that hangs, a model waiting on a network share, say, stops the gateway rather than
    leaving it half up), calling `meanwhile` between two looks. False at once when a stop
    signal comes: a replacement loading its models held a SIGTERM for up to a minute, longer
    than orchestrators wait before they kill."""
    while not stopping.is_set():
        left = deadline - time.monotonic()
        # Looked at once more when the time is up: of workers started together, one may have
        # answered while the supervisor looked at the others.
        if pipe.poll(max(0.0, min(left, _START_POLL))):
            return True
        if left <= 0:
            return False
        meanwhile()
    return False


def _unread_words(worker: _Worker) -> list[object]:
    """What a worker has said on its pipe and the supervisor has not read yet."""
    words = []
    with contextlib.suppress(OSError, EOFError):
        while worker.pipe.poll():
            words.append(worker.pipe.recv())
    return words


def _name_requests(worker: _Worker) -> None:
    """Log the requests a worker that died was decoding or running a model for: the input
    that crashed native code in it (a decoder's, a model's) is among them. Nothing when it was
    idle."""
    found = inflight.under_way(worker.requests)
    missed = inflight.missed(worker.requests)
    if not found and not missed:
        return
    what = ", ".join(str(request) for request in found) if found else "no request it recorded"
    if missed:
        what += (
            f"; {missed} of its request threads found no slot to record theirs in, and may "
            "have been at work on others"
        )
    log.error("worker %d was at work on %s when it ended", worker.proc.pid, what)


def _remove_orphaned_metrics() -> None:
    """The metrics directories of supervisors that ended without removing theirs (SIGKILL, a
    crash): each is named for its supervisor's pid, and one whose process is gone is removed."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = path.name[len(_METRICS_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue  # named before the pid was in the name
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # another user's process, alive; or no pid at all


def _mark_dead(pid: int) -> None:
    from gateway import metrics  # imported only once the multiprocess directory is set

    metrics.worker_exited(pid)


def _ended_children() -> set[int]:
    """The children of this process that have ended and wait to be reaped (zombies)."""
    ended = set()
    for listing in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in listing.read_text().split():
                with contextlib.suppress(OSError, IndexError):
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    # The state follows the command's name, which may hold ") ".
                    if stat.rsplit(")", 1)[1].split()[0] == "Z":
                        ended.add(int(pid))
    return ended


def _close_together(started: list[_Worker], grace: float) -> None:
    """Wait until every worker has drained (or ended, or the grace is over), then tell all of
    them to close: their listeners close at once, none while a sibling still answers."""
    deadline = time.monotonic() + grace + CLOSE_SLACK
    for worker in started:
        if worker.drained:  # its DRAINED was read before the stop signal came
            continue
        with contextlib.suppress(OSError, EOFError):  # a worker that ended has nothing to say
            while worker.pipe.poll(max(0.0, deadline - time.monotonic())):
                if worker.pipe.recv() == DRAINED:
                    break
    for worker in started:
        with contextlib.suppress(OSError):
            worker.pipe.send(CLOSE)


def supervise(settings: Settings) -> int:
    """Serve with `worker_count(settings)` workers until a stop signal; the exit code."""
    count = worker_count(settings)
    # Workers share their metrics through files here; a fresh directory per run, so that counts
    # start at zero (prometheus-client reads the variable when the worker imports it).
    _remove_orphaned_metrics()
    metrics_dir = tempfile.TemporaryDirectory(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    try:
        http_sock, http_port = reserve_port(settings.host, settings.http_port)
        grpc_sock, grpc_port = reserve_port(settings.host, settings.grpc_port)
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        metrics_dir.cleanup()
        return 1
    try:
        supervisor = Supervisor(settings, count, http_port, grpc_port)
        if not supervisor.start():
            return 1
        supervisor.run()
        code = supervisor.stop()
    finally:
        http_sock.close()
        grpc_sock.close()
        metrics_dir.cleanup()
    log.info("image-gateway stopped")
    return code


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (which the first shared object would start) with
    SIGHUP blocked. It ignores SIGINT and SIGTERM of its own, but a closed terminal's SIGHUP to
    the whole group killed it, and tracebacks of its restart followed "image-gateway stopped".
    Its only change to the mask it inherits unblocks those two, so SIGHUP stays blocked there
    for good; here it is taken as soon as the mask is back."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Supervisor:
    """The workers of one gateway, each in a place of its own, and those retiring."""

    def __init__(self, settings: Settings, count: int, http_port: int, grpc_port: int) -> None:
        self.settings = settings
        self.count = count
        self.http_port, self.grpc_port = http_port, grpc_port
        self.worker_settings = replace(
            settings, http_port=http_port, grpc_port=grpc_port, workers=1
        )
        self.context = multiprocessing.get_context("spawn")
        _start_resource_tracker()
        self.stopping = threading.Event()
        # The same, seen by the workers: one stopped while it is clear tells a stop of the
        # whole gateway (a signal to the process group, or the supervisor's own) from one of
        # its own.
        self.gateway_stopping = self.context.Event()
        # A reload is due (asked for, not yet started); one is under way.
        self.reloading = threading.Event()
        self.under_way = threading.Event()
        self.started: list[_Worker | None] = []
        # Workers a reload replaced, finishing their requests.
        self.retiring: list[_Worker] = []
        # The workers each reload that has started all of its new ones replaced, oldest reload
        # first: its "reload done" comes once they have exited. Reloads overlap when one is
        # asked for during another, and each has its line.
        self.finishing: list[list[_Worker]] = []
        self.silent_limit = max(settings.request_timeout, _SILENT_MIN)
        self.slots = inflight.slot_count(settings)
        # When the supervisor last looked, and since when it counts a silence.
        self.looked_at = self.counted_from = time.monotonic()
        # Per place: workers in a row that died soon after their start or did not start, and
        # when the next may start.
        self.failures = [0] * count
        self.retry_at = [0.0] * count
        # Why the worker of each empty place went, for its replacement to count.
        self.why = [""] * count
        # Workers spawned that have not yet said they serve, by place: all of them at the start,
        # then replacements. A replacement is not waited for: two workers that died together
        # left the second place empty until the first replacement had loaded its models, and
        # the supervisor answered nothing meanwhile.
        self.starting: dict[int, _Starting] = {}
        # When to look next for adopted processes that have ended.
        self.adopted_look_at = 0.0
        # How the workers spread HTTP connections evenly over themselves.
        self.handover = Handover(self.context, count) if count > 1 else None
        signals.handle(
            {**dict.fromkeys(STOP_SIGNALS, self.on_signal), RELOAD_SIGNAL: self.on_reload}
        )

    def on_signal(self, signum: int) -> None:
        if not self.stopping.is_set():
            log.info("received %s, draining %d workers", signal.Signals(signum).name, self.count)
        self.gateway_stopping.set()
        self.stopping.set()

    def on_reload(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            log.info("received %s while stopping; no reload", name)
            return
        if self.reloading.is_set():
            log.info("received %s; a reload is due already", name)
        elif self.under_way.is_set():
            log.info("received %s during a reload; one more reload follows it", name)
        else:
            log.info("received %s, replacing the %d workers one at a time", name, self.count)
        self.reloading.set()

    def start(self) -> bool:
        """Start every worker, all at once, and log the ready line once all serve; False
        (having logged why) if one does not start. Started one after another, N workers whose
        models take a minute to load served N minutes after the start; together, one that
        cannot start stops the start as soon as it says so, whatever its place."""
        self.started = [None] * self.count
        stopping = self.stopping
        pending = self.starting
        if not stopping.is_set():
            pending.update((i, self.launch(i)) for i in range(self.count))
        failure = None
        try:
            while pending and not stopping.is_set():
                multiprocessing.connection.wait([p.pipe for p in pending.values()], _LOOK)
                for i, starting in list(pending.items()):
                    if starting.due():
                        del pending[i]
                        self.started[i] = self.serving(starting)
                self.watch_while_starting()
        except RuntimeError as exc:
            failure = exc
        for starting in pending.values():
            _end_starting(starting.proc, stopping)
        pending.clear()
        # A Ctrl-C reaches the starting workers too; then a worker that gave up is no failure.
        if failure is not None and not stopping.is_set():
            log.error("cannot start: %s", failure)
            for worker in self.started:
                if worker is not None:
                    worker.proc.terminate()
                    worker.proc.join(self.settings.shutdown_grace + 10)
            return False
        if not stopping.is_set():
            log_ready(self.settings, self.http_port, self.grpc_port, self.count)
        return True

    def spawn(self, place: int, replacing: str = "") -> _Worker:
        """Start a worker in `place` and wait until it serves; `replacing` says why the worker
        whose place it takes went (it counts itself in gateway.metrics.WORKER_REPLACEMENTS).
        Raises RuntimeError if it does not start."""
        return self.serving(self.launch(place, replacing))

    def launch(self, place: int, replacing: str = "") -> _Starting:
        """Spawn a worker in `place` (see `spawn`), without waiting for it."""
        parent, child = self.context.Pipe()
        heard_at = self.context.RawValue(ctypes.c_double, 0.0)
        requests = inflight.make_table(self.context, self.slots)
        proc = self.context.Process(
            target=worker_main,
            args=(
                self.worker_settings,
                child,
                os.getpid(),
                self.gateway_stopping,
                heard_at,
                replacing,
                None if self.handover is None else self.handover.place(place),
                requests,
            ),
            daemon=False,
        )
        # A Ctrl-C reaches every process of the terminal's group; one that came while the
        # worker still imported was a KeyboardInterrupt traceback. The worker starts with
        # SIGINT ignored (an ignored signal stays so across exec) until its own handler is in
        # place; the supervisor, which gets the same Ctrl-C, stops it then. The supervisor
        # holds SIGINT back meanwhile, so that one coming just then reaches its own handler
        # afterwards instead of being ignored (a blocked signal is never discarded).
        # The same for the reload signal, which would end a worker that has not yet set it
        # aside.
        kept = HELD_AT_SPAWN
        held = signal.pthread_sigmask(signal.SIG_BLOCK, kept)
        own = {signum: signal.signal(signum, signal.SIG_IGN) for signum in kept}
        try:
            proc.start()
        finally:
            for signum, handler in own.items():
                signal.signal(signum, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        child.close()
        deadline = time.monotonic() + self.settings.start_timeout
        return _Starting(proc, parent, heard_at, requests, deadline)

    def serving(self, starting: _Starting) -> _Worker:
        """The worker `starting`, once it serves (see `spawn`)."""
        stopping = self.stopping
        proc, parent, heard_at = starting.proc, starting.pipe, starting.heard_at
        # The worker sends READY once both of its servers serve, or closes the pipe (it has
        # logged why).
        answered = _answered(parent, starting.deadline, stopping, self.watch_while_starting)
        try:
            started = answered and parent.recv() == READY
        except EOFError:
            started = False
        if not started:
            if answered and not stopping.is_set():
                # A worker that gave up exits by itself, with its own code; one past the start
                # timeout is still loading, and would have been waited for in vain.
                proc.join(5)
            if proc.exitcode in _STOPPED_WHILE_STARTING:
                # Ended by a stop signal: one sent to the whole process group (systemd's stop,
                # `kill -TERM -- -PGID`) reaches this process in the same instant, but its
                # "signals" thread may not have acted on it yet. Taken for a worker that could
                # not start, it stopped a gateway still starting with "cannot start" and exit
                # code 1, and a reload with "reload stopped" and an error.
                stopping.wait(_STOP_SIGNAL_WAIT)
            _end_starting(proc, stopping)
            if stopping.is_set():
                raise RuntimeError(f"worker {proc.pid} was stopped while it started")
            if not answered:
                raise RuntimeError(
                    f"worker {proc.pid} was not serving {self.settings.start_timeout:g} s after "
                    "its start (loading its models, perhaps; see --start-timeout); stopped it"
                )
            raise RuntimeError(f"worker {proc.pid} did not start (exit code {proc.exitcode})")
        heard_at.value = time.monotonic()
        return _Worker(proc, parent, heard_at.value, heard_at, starting.requests)

    def kill_silent(self) -> None:
        # Killed, not retired: it cannot finish anything. The look at the places below then
        # finds it exited and starts another, as after a crash. A retiring worker is watched
        # too: one stopped before a reload's RETIRE reached it kept its listeners, and the
        # kernel handed it new connections, for its whole grace and 10 s more (the reload
        # waiting as long); it is only killed, its place being taken already.
        now = time.monotonic()
        if now - self.looked_at > _AWAY:
            # The supervisor did not run either, and cannot tell the workers' silence from its
            # own: Ctrl-Z and `fg` (SIGTSTP and SIGCONT to the whole process group) killed a
            # worker as the group went on, whichever process looked first.
            self.counted_from = now
        self.looked_at = now
        for worker in [*self.started, *self.retiring]:
            if worker is None or self.stopping.is_set() or not worker.proc.is_alive():
                continue
            silent = now - max(worker.heard_at.value, self.counted_from)
            if silent <= self.silent_limit:
                continue
            log.error(
                "worker %d has not been heard from for %.0f s: it is stopped, or a call holds "
                "its threads; killing it",
                worker.proc.pid,
                silent,
            )
            worker.gone_for = "silent"
            worker.proc.kill()
            worker.proc.join(1)

    def reap(self) -> None:
        for worker in list(self.retiring):
            proc = worker.proc
            if proc.is_alive():
                since = worker.retired_at
                if (
                    since is not None
                    and time.monotonic() - since > self.settings.shutdown_grace + 10
                ):
                    log.error("replaced worker %d did not exit in time; killing it", proc.pid)
                    proc.kill()
                continue
            self.retiring.remove(worker)
            if proc.pid is not None:
                _mark_dead(proc.pid)
            worker.pipe.close()
            if proc.exitcode == 0:
                log.info("replaced worker %d exited", proc.pid)
            else:
                log.error("replaced worker %d exited with %s", proc.pid, proc.exitcode)
                _name_requests(worker)
        finishing = self.finishing
        while finishing and not any(worker in self.retiring for worker in finishing[0]):
            finishing.pop(0)
            log.info("reload done: %d workers serving", self.count)

    def reap_adopted(self) -> None:
        """Reap the processes that ended as this process's children without being its workers.
        As a container's first process (PID 1), or a subreaper, the supervisor inherits every
        orphan: the stderr relay of a worker killed outright (gateway.native_output), a model's
        own subprocess. Not reaped, each stayed a zombie for as long as the gateway ran. A
        worker's own end is left to multiprocessing, which reads its exit code."""
        now = time.monotonic()
        if now < self.adopted_look_at:
            return
        self.adopted_look_at = now + _ADOPTED_LOOK
        ours = {w.proc.pid for w in [*self.started, *self.retiring] if w is not None}
        ours.update(starting.proc.pid for starting in self.starting.values())
        ours.add(getattr(resource_tracker._resource_tracker, "_pid", None))
        for pid in _ended_children() - ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def watch_while_starting(self) -> None:
        # Neither starts a worker, so neither can come back here. A worker that stopped
        # (SIGSTOP) while another loaded for up to a minute had been left alone meanwhile, its
        # clients waiting, and a silence counted afresh after each start.
        self.kill_silent()
        self.reap()

    def bury(self, i: int, worker: _Worker, when: str) -> None:
        """Empty place i, whose worker exited unasked (or was killed as silent); its
        replacement, which starts `when`, counts why."""
        proc = worker.proc
        if self.handover is not None:
            self.handover.vacate(i)
        log.error("worker %d exited with %s; starting another%s", proc.pid, proc.exitcode, when)
        _name_requests(worker)
        if proc.pid is not None:
            _mark_dead(proc.pid)
        self.why[i] = worker.gone_for
        worker.pipe.close()
        self.started[i] = None

    def take_over(self, i: int, reason: str) -> tuple[str, _Worker | None]:
        """Start a new worker in place i, then retire the old one; raises RuntimeError if
        the new one does not start (the old one serves on). Says what it did, and gives the
        worker it replaced."""
        old = self.started[i]
        if old is not None and LEAVING in _unread_words(old):
            # It was sent a stop signal of its own since the workers' words were last read,
            # and leaves already (or has left): replaced as one that left, as in fill_places.
            self.replace_stopped(i, old)
            old = None
        elif old is not None and not old.proc.is_alive():
            # It went before its turn (a crash, or killed as silent) and the look at the
            # places, which a reload holds up, has not seen it yet: its replacement counts
            # why it went, not "reload", and the log says it exited, not that it was replaced.
            self.bury(i, old, "")
            old = None
        new = self.spawn(i, reason if old is not None else self.why[i])
        self.started[i] = new
        self.failures[i] = 0
        self.why[i] = ""
        if old is None:
            return f"worker {new.proc.pid} serving", None
        self.retiring.append(old)
        if not old.proc.is_alive():
            return f"worker {new.proc.pid} serving", old
        with contextlib.suppress(OSError):
            old.pipe.send(RETIRE)
        old.retired_at = time.monotonic()
        return (
            f"worker {new.proc.pid} serving in place of worker {old.proc.pid}, which finishes "
            "its requests and exits"
        ), old

    def reload(self) -> None:
        self.under_way.set()
        try:
            self.replace_all()
        finally:
            self.under_way.clear()

    def replace_all(self) -> None:
        # A replacement still loading began before the reload was asked for, perhaps with the
        # old models: it is waited for here and then replaced as the others are.
        self.take_started(wait=True)
        replaced: list[_Worker] = []
        for i in range(len(self.started)):
            # What the workers say is read during a reload too: one sent a stop signal of its
            # own is replaced then as at any time (it had drained and waited for a CLOSE that
            # did not come, answering every request that reached it 503 shutting_down for its
            # whole grace, and the reload waited for it as long).
            self.answer_workers()
            try:
                what, old = self.take_over(i, "reload")
            except RuntimeError as exc:
                if not self.stopping.is_set():
                    log.error(
                        "reload stopped: %s; %d of %d workers replaced, the others serve on",
                        exc,
                        i,
                        self.count,
                    )
                return
            log.info("%s", what)
            if old is not None:
                replaced.append(old)
                # The next new worker starts once this one has gone: a reload holds one worker
                # (and one copy of the models) more than --workers, not twice as many. A
                # worker past its grace is killed by `reap`.
                until = time.monotonic() + self.settings.shutdown_grace + CLOSE_SLACK + 10
                while old.proc.is_alive() and time.monotonic() < until:
                    if self.stopping.wait(0.05):
                        return
                    self.answer_workers()
                    self.kill_silent()
                    self.reap()
        self.finishing.append(replaced)  # "reload done" once these have exited

    def replace_stopped(self, i: int, worker: _Worker) -> None:
        """A worker sent a stop signal of its own (`kill <worker pid>`) leaves (LEAVING),
        finishing its requests as a reload's old worker does while the others serve, and
        another starts in its place at once. It had drained as for a stop of the gateway and
        waited for its CLOSE for its whole grace, answering every request that reached it 503
        shutting_down, and its place was refilled as after a crash, a second later."""
        log.info(
            "worker %d stopped on a signal of its own; starting another in its place",
            worker.proc.pid,
        )
        self.why[i] = "stopped"
        worker.retired_at = time.monotonic()
        self.retiring.append(worker)
        self.started[i] = None
        self.retry_at[i] = 0.0
        if self.handover is not None:
            self.handover.vacate(i)

    def answer_workers(self) -> None:
        # A worker whose model call has hung asks to be replaced (gateway.serve), and asks
        # again a minute later while it stays so. One that leaves was sent its stop signal
        # alone.
        for i, worker in enumerate(self.started):
            if worker is None or self.stopping.is_set():
                continue
            messages = _unread_words(worker)
            if LEAVING in messages:
                self.replace_stopped(i, worker)
                continue
            if DRAINED in messages:
                # Read just as the gateway's stop began: its CLOSE comes with the others'.
                worker.drained = True
                continue
            if HUNG not in messages:
                continue
            try:
                what, _ = self.take_over(i, "hung")
                log.info("%s (a model call of the worker it replaces has hung)", what)
            except RuntimeError as exc:
                if not self.stopping.is_set():
                    log.error("could not replace hung worker %d: %s", worker.proc.pid, exc)

    def run(self) -> None:
        """Keep every place filled until a stop signal, and reload when asked."""
        while not self.stopping.wait(_LOOK):
            self.reap()
            self.reap_adopted()
            self.answer_workers()
            self.kill_silent()
            if self.reloading.is_set():
                self.reloading.clear()
                self.reload()
                continue
            self.take_started()
            self.fill_places()

    def fill_places(self) -> None:
        """Empty the place of a worker that exited, and start another in an empty one once
        its wait is over (`take_started` takes it once it serves)."""
        for i, worker in enumerate(self.started):
            if self.stopping.is_set():
                break
            if i in self.starting:
                continue
            now = time.monotonic()
            if worker is not None:
                proc = worker.proc
                if proc.is_alive():
                    continue
                if LEAVING in _unread_words(worker):
                    # It left on a stop signal of its own while the supervisor started another
                    # worker (in this same look): not a worker that exited unasked.
                    self.replace_stopped(i, worker)
                    continue
                if now - worker.started_at >= _STABLE_AFTER:
                    self.failures[i] = 0
                delay = restart_delay(self.failures[i])
                self.failures[i] += 1
                self.bury(i, worker, f" in {delay:g} s")
                self.retry_at[i] = now + delay
                continue
            if now < self.retry_at[i]:
                continue
            self.starting[i] = self.launch(i, self.why[i])

    def take_started(self, wait: bool = False) -> None:
        """Put in its place each replacement that has said it serves, and give up on each that
        has failed or is past its start timeout (its place is tried again later); with `wait`,
        wait for all of them first."""
        for i, starting in list(self.starting.items()):
            if self.stopping.is_set():
                break
            if not wait and not starting.due():
                continue
            del self.starting[i]
            try:
                self.started[i] = self.serving(starting)
            except RuntimeError as exc:
                if self.stopping.is_set():
                    break
                delay = restart_delay(self.failures[i])
                self.failures[i] += 1
                self.retry_at[i] = time.monotonic() + delay
                log.error("%s; trying again in %g s", exc, delay)
            else:
                self.why[i] = ""
                if not self.stopping.is_set():
                    log.info("worker %d serving", starting.proc.pid)

    def stop(self) -> int:
        """Drain and close every worker; the gateway's exit code."""
        grace = self.settings.shutdown_grace
        signals.ignore(STOP_SIGNALS)
        for starting in self.starting.values():
            _end_starting(starting.proc, self.stopping)
        self.starting.clear()
        running = [worker for worker in self.started if worker is not None]
        for worker in running:
            if worker.proc.is_alive() and worker.proc.pid is not None:
                os.kill(worker.proc.pid, signal.SIGTERM)
        # A worker stopped with SIGSTOP (or its whole process group but the supervisor) takes
        # no signal until continued, as `kill` and systemd do after their stop signal: it had
        # drained nothing, and was killed past twice the grace and more, the gateway exiting 1.
        for worker in running + self.retiring:
            if worker.proc.is_alive() and worker.proc.pid is not None:
                os.kill(worker.proc.pid, signal.SIGCONT)
        # Workers that are retiring drain on their own, and close without the others.
        _close_together(running, grace)
        codes = []
        for worker in running + self.retiring:
            proc = worker.proc
            proc.join(grace + 10)
            if proc.is_alive():
                log.error("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
            codes.append(proc.exitcode)
            worker.pipe.close()
        return 0 if all(code == 0 for code in codes) else 1

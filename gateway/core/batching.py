"""Dynamic batching: the images of concurrent requests for one model, merged into one predict.

A model that gains from batches (one call on 16 images costing far less than 16 calls) gets a
Batcher: each request hands its decoded images to it and waits; a single thread collects the
requests that arrive within `max_wait` of the first, up to `max_batch_size` images, calls
`predict` once, and gives each request its own slice of the outputs. Requests with different
parameters, or of different groups (the data plane groups them by color mode), are never merged:
a model sees in one call what one request would give it. Model code does not change: it already
takes a list.

If the merged call fails, each request of the batch is retried on its own, so one bad request
fails alone instead of failing every other client merged with it. The merged call gets read-only
views of the images, so that a model that writes to its input cannot hand a retried request
pixels it changed for another (it then gets each request alone, and works as without batching).

A request that stops waiting (its deadline passed) or that nobody wants any more (its client has
gone) is left out of the next batch rather than computed for nobody, and leaves the queue as soon
as its waiting thread sees it (every STOP_CHECK_INTERVAL): under overload, work done for
requests that already failed is what keeps the live ones failing too. The retries after a
merged call failed skip such requests as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway import metrics
from gateway.core.admission import STOP_CHECK_INTERVAL
from gateway.core.batch_policy import BatchPolicy
from gateway.core.errors import GatewayError
from gateway.core.model_calls import ModelCalls
from gateway.core.outputs import check_outputs
from gateway.models.base import JSONValue, Model, ParameterError

log = logging.getLogger(__name__)


class WaitTimeoutError(Exception):
    """No answer came within the caller's timeout; the job was dropped unless already running,
    and then `running` is its future, done once the model has answered."""

    def __init__(self, running: Future[Sequence[JSONValue]] | None = None) -> None:
        super().__init__()
        self.running = running


class DroppedError(Exception):
    """The job was dropped before a batch took it: its `stopped` said why."""


class ModelRaisedError(Exception):
    """What the model raised, carried out of the batcher's thread as it is."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


def _merge_key(params: Mapping[str, Any], group: str) -> str:
    # Not ==: True == 1 == 1.0 in Python, and a model may tell them apart.
    return json.dumps([group, params], sort_keys=True, default=repr)


@dataclass(eq=False)  # jobs are compared by identity; their images are arrays
class _Job:
    images: Sequence[np.ndarray]
    params: Mapping[str, Any]
    group: str = ""
    # Asked when the job would join a batch; an error drops it (see Batcher.predict).
    stopped: Callable[[], GatewayError | None] | None = None
    # When its caller stops waiting (time.monotonic()), if ever.
    deadline: float | None = None
    future: Future[Sequence[JSONValue]] = field(default_factory=Future)
    key: str = ""

    def __post_init__(self) -> None:
        self.key = _merge_key(self.params, self.group)

    def is_stopped(self) -> bool:
        if self.stopped is None:
            return False
        try:
            return self.stopped() is not None
        except Exception:
            # Asked on the batcher's thread: a raise there would end it, and every request
            # for the model would wait out its deadline.
            log.exception("asking whether a request stopped failed; it is dropped")
            return True

    def claim(self) -> bool:
        """True if the job goes into a batch; False once it is cancelled, or dropped now."""
        if self.is_stopped():
            self.future.cancel()
        return self.future.set_running_or_notify_cancel()


class Batcher:
    def __init__(self, model: Model, policy: BatchPolicy, calls: ModelCalls | None = None) -> None:
        self.model = model
        self.policy = policy
        self.calls = calls or ModelCalls()
        self._pending: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model.name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued for a batch (those given up on included, until a batch would take them)."""
        return len(self._pending)

    def predict(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        timeout: float | None = None,
        stopped: Callable[[], GatewayError | None] | None = None,
        group: str = "",
    ) -> Sequence[JSONValue]:
        """Like model.predict, but possibly sharing one call with concurrent requests of the
        same parameters and `group`.

        Raises WaitTimeoutError if no answer comes within `timeout` seconds; the job is then dropped
        unless a batch has already taken it. `stopped`, if given, is asked while the job waits for
        a batch (every STOP_CHECK_INTERVAL, and when a batch would take it or retry it alone): if
        it returns an error (why the request should stop) the job is dropped, and this raises
        DroppedError. Whatever the model raised comes out as ModelRaisedError, so that it is never
        taken for one of those two.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = _Job(images, params, group, stopped, deadline=deadline)
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._ready.notify()
        try:
            while True:
                step = STOP_CHECK_INTERVAL
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                try:
                    return job.future.result(step)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        # Else a batch runs it: its answer will come too late for anyone, and
                        # its images are in the model until then.
                        raise WaitTimeoutError(None if self._drop(job) else job.future) from None
                    # A job a batch runs waits for its answer: the model is not interrupted.
                    if not job.future.running() and job.is_stopped() and self._drop(job):
                        raise DroppedError() from None
        except CancelledError:
            raise DroppedError() from None
        finally:
            # What the model raised stays in the job's future, and its traceback holds this
            # frame: job -> future -> exception -> frame -> job would keep the request's images
            # until the cycle collector happened to run.
            del job

    def _drop(self, job: _Job) -> bool:
        """Take a job no batch has taken out of the queue, images and all (a model that hangs
        takes no batch, and the queue would keep every dropped request's pixels until it did);
        False if a batch already runs it."""
        if not job.future.cancel():
            return False
        with self._ready:
            if job in self._pending:
                self._pending.remove(job)
        return True

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _take_batch(self, batch: list[_Job]) -> bool:
        """Claim the jobs of the next batch into `batch`; False once the batcher is closed."""
        with self._ready:
            while True:
                while not self._pending:
                    if self._closed:
                        return False
                    self._ready.wait()
                first = self._pending.popleft()
                if first.claim():
                    break
            batch.append(first)
            size = len(first.images)
            deadline = self._wait_until(first, time.monotonic() + self.policy.max_wait)
            while size < self.policy.max_batch_size:
                match = next(
                    (
                        j
                        for j in self._pending
                        if j.key == first.key and size + len(j.images) <= self.policy.max_batch_size
                    ),
                    None,
                )
                if match is not None:
                    self._pending.remove(match)
                    if match.claim():
                        batch.append(match)
                        size += len(match.images)
                        deadline = self._wait_until(match, deadline)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            return True

    @staticmethod
    def _wait_until(job: _Job, until: float) -> float:
        """How long a batch holding `job` may wait for more: at most half the time its caller
        has left, so that a deadline shorter than the policy's wait still leaves the model time
        to answer, rather than running the batch when nobody waits for it any more."""
        if job.deadline is None:
            return until
        return min(until, time.monotonic() + (job.deadline - time.monotonic()) / 2)

    def _run(self) -> None:
        while True:
            batch: list[_Job] = []
            try:
                if not self._take_batch(batch):
                    return
                self._run_batch(batch)
            except BaseException as exc:  # never leave a request waiting for ever
                log.exception("batcher for %r failed", self.model.name)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ModelRaisedError(exc))
            _let_go(batch)
            # Not kept while the next batch forms: an idle model would hold the last batch's
            # images for as long as it stays idle.
            del batch

    def _run_batch(self, batch: list[_Job]) -> None:
        metrics.observe(metrics.BATCH_SIZE, sum(len(j.images) for j in batch), (self.model.name,))
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        images = [_read_only(image) for job in batch for image in job.images]
        try:
            call = self.calls.begin(self.model.name)
            try:
                outputs = self.model.predict(images, batch[0].params)
            finally:
                self.calls.end(call)
            # A list: any sequence the model may answer with is sliced below.
            outputs = list(check_outputs(outputs, len(images)))
        except ParameterError as exc:
            # The requests merged share their parameters: alone, each would be refused alike.
            for job in batch:
                job.future.set_exception(ModelRaisedError(exc))
            return
        except BaseException:  # SystemExit from a model is its bug too, and fails only its own
            # With its traceback: a model that fails only on batches has no other trace, as
            # each request then succeeds alone.
            log.warning(
                "model %r failed on a merged batch of %d requests; retrying each alone",
                self.model.name,
                len(batch),
                exc_info=True,
            )
            outputs = None
        if outputs is None:
            # Outside the except clause: a retry's failure is not chained to the merged one's.
            for job in batch:
                if job.is_stopped():
                    # Nobody waits for this answer any more; its thread says why.
                    job.future.set_exception(DroppedError())
                else:
                    self._run_alone(job, retried=True)
            return
        start = 0
        for job in batch:
            job.future.set_result(outputs[start : start + len(job.images)])
            start += len(job.images)

    def _run_alone(self, job: _Job, retried: bool = False) -> None:
        if retried:  # counted as the model call it is; the merged one was counted already
            metrics.observe(metrics.BATCH_SIZE, len(job.images), (self.model.name,))
        try:
            call = self.calls.begin(self.model.name)
            try:
                outputs = self.model.predict(job.images, job.params)
            finally:
                self.calls.end(call)
            job.future.set_result(outputs)
        except BaseException as exc:  # handed to the waiting request, which reports it
            job.future.set_exception(ModelRaisedError(exc))


def _let_go(batch: list[_Job]) -> None:
    """Clear the frames that a failure handed to the batch's requests keeps, once the batch is
    done. The failure's traceback holds the frames that ran the batch and, through each frame's
    caller (f_back), those that hold the batch: the batch's futures hold the failure, a cycle,
    and the batch's images stayed alive until the cycle collector happened to run. Clearing
    drops the frames' variables, not what a traceback prints."""
    for job in batch:
        future = job.future
        if not future.done() or future.cancelled():
            continue
        failure = future.exception()
        if not isinstance(failure, ModelRaisedError):
            continue
        tb = failure.error.__traceback__
        if tb is None:
            continue
        frames = [frame for frame, _ in traceback.walk_tb(tb)]
        caller = tb.tb_frame.f_back
        while caller is not None:
            frames.append(caller)
            caller = caller.f_back
        for frame in frames:
            # A frame still running (this thread's own loop, and what runs it) stays as it is.
            with contextlib.suppress(RuntimeError):
                frame.clear()


def _read_only(image: np.ndarray) -> np.ndarray:
    view = image.view()
    view.flags.writeable = False
    return view

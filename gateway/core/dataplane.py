"""The core service: request -> decode every image -> one model.predict(batch) -> results."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeGuard

from gateway import metrics
from gateway.core.activity import Activity, Unwatched
from gateway.core.admission import Admission, Held
from gateway.core.batch_policy import BatchPolicy
from gateway.core.batching import Batcher, DroppedError, ModelRaisedError, WaitTimeoutError
from gateway.core.decode import DecodedImage, Probe, decode, probe
from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.limits import Limits, check_image_bytes
from gateway.core.model_calls import ModelCalls
from gateway.core.outputs import NotJSONError, check_outputs, to_json_value
from gateway.core.types import (
    Buffer,
    ColorMode,
    InferRequest,
    InferResponse,
    ItemError,
    ItemResult,
    ModelInfo,
)
from gateway.models.base import (
    JSONValue,
    Model,
    ParameterError,
    batching_attributes,
    min_input_size,
)
from gateway.models.registry import ModelRegistry

log = logging.getLogger(__name__)

# A request is asked whether its client has gone only once it has been in the core this long
# (seconds). Asking can cost a system call; a request that waited for a slot, or decodes large
# images, gains from it, and one for a small image is over before the question is worth it.
CLIENT_CHECK_AFTER = 0.01


# The most of a client's model name an error message repeats.
_NAME_SHOWN = 64
# The longest image name a request may give (a multipart filename fits in a part header line).
MAX_NAME = 4096
# The most of a model's ParameterError message an answer repeats: over gRPC it is the status's
# details, which a client takes within its metadata limit (8 KiB by default).
MAX_PARAMETER_MESSAGE = 1000


def _listed(names: list[str], most: int = 16) -> str:
    # Names of up to 256 characters each, and any number of models: an error message listed
    # them all, 9 KB for one long name.
    shown = [n if len(n) <= _NAME_SHOWN else n[:_NAME_SHOWN] + "..." for n in names[:most]]
    more = (
        f" and {len(names) - most} more (GET /v1/models, ListModels)" if len(names) > most else ""
    )
    return ", ".join(shown) + more


def resolve_policy(
    model: Model, configured: Mapping[str, BatchPolicy | None]
) -> BatchPolicy | None:
    """The configured policy (None: off); else the model's own `max_batch_size` and
    `max_batch_wait_ms` attributes; else no batching."""
    if model.name in configured:
        return configured[model.name]
    declared = batching_attributes(model)
    return None if declared is None else BatchPolicy(declared[0], declared[1] / 1000)


MAX_REQUEST_ID = 128


def usable_request_id(given: object) -> TypeGuard[str]:
    return (
        isinstance(given, str)
        and 0 < len(given) <= MAX_REQUEST_ID
        and given.isprintable()
        and given.isascii()
    )


def new_request_id(given: str | None = None) -> str:
    """The client's id when it sent a usable one, else a fresh one."""
    if usable_request_id(given):
        return given
    # Not os.urandom: it lets go of the GIL for its system call, and on a busy worker taking it
    # back costs two thread switches per request. An id only has to be unique, and every
    # worker is a fresh (spawned) interpreter whose random module seeded itself from the system.
    return f"{random.getrandbits(128):032x}"


class DataPlane:
    def __init__(
        self,
        registry: ModelRegistry,
        limits: Limits | None = None,
        admission: Admission | None = None,
        decode_threads: int = 0,
        batching: Mapping[str, BatchPolicy | None] | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.registry = registry
        # Told what each request thread decodes and runs, if anyone wants to know.
        self.activity = activity or Unwatched()
        self.limits = limits or Limits()
        self.admission = admission or Admission(2, 32, self.limits.max_request_pixels)
        # cv2.imdecode releases the GIL: the images of one request decode side by side.
        self._helpers = decode_threads or os.cpu_count() or 1
        self._decoders = ThreadPoolExecutor(max_workers=self._helpers, thread_name_prefix="decode")
        self._min_sizes = {model.name: min_input_size(model) for model in registry}
        self.model_calls = ModelCalls()
        # Why this process is not live (a model call that hung, gateway.serve), or None.
        self.unhealthy: str | None = None
        self.batchers: dict[str, Batcher] = {}
        unknown = sorted(set(batching or {}) - set(registry.names()))
        if unknown:
            # A misspelt name would leave batching off without a word.
            raise ValueError(
                f"batching is set for {', '.join(unknown)}, which this gateway does not serve "
                f"(it serves: {', '.join(registry.names())})"
            )
        for model in registry:
            policy = resolve_policy(model, batching or {})
            if policy is not None:
                self.batchers[model.name] = Batcher(model, policy, self.model_calls)

    def deadline(self, client_deadline: float | None = None, since: float | None = None) -> float:
        """The request's deadline: the server's timeout from `since` (its arrival; now by
        default), or the client's if that is sooner."""
        ours = (time.monotonic() if since is None else since) + self.limits.request_timeout
        return ours if client_deadline is None else min(ours, client_deadline)

    def close(self) -> None:
        """Stop the decode threads and batchers (after the servers stopped taking requests)."""
        self._decoders.shutdown(wait=False)
        for batcher in self.batchers.values():
            batcher.close()

    def model(self, name: str) -> Model:
        model = self.registry.get(name)
        if model is None:
            raise GatewayError(
                ErrorCode.MODEL_NOT_FOUND,
                # The name is the client's: a gRPC request may carry megabytes of it.
                f"no model named {name[:_NAME_SHOWN]!r}{'...' if len(name) > _NAME_SHOWN else ''}; "
                f"this gateway serves: {_listed(self.registry.names())}",
            )
        return model

    def list_models(self) -> list[ModelInfo]:
        return [self._info(m) for m in self.registry]

    def get_model(self, name: str) -> ModelInfo:
        return self._info(self.model(name))

    def _info(self, model: Model) -> ModelInfo:
        batcher = self.batchers.get(model.name)
        policy = None if batcher is None else batcher.policy
        return ModelInfo(
            model.name,
            model.description,
            model.name == self.registry.default_name,
            self._min_sizes[model.name],
            None if policy is None else (policy.max_batch_size, policy.max_wait * 1000),
        )

    def infer(self, request: InferRequest) -> InferResponse:
        metrics.inc(metrics.IN_FLIGHT)
        try:
            response = self._infer(request)
        finally:
            metrics.inc(metrics.IN_FLIGHT, amount=-1)
        for result in response.results:
            if result.error is not None:
                metrics.inc(metrics.IMAGE_ERRORS, (result.error.code,))
        return response

    def _infer(self, request: InferRequest) -> InferResponse:
        model = self.model(request.model)
        if not request.images:
            raise GatewayError(ErrorCode.NO_IMAGES, "the request holds no image")
        if len(request.images) > self.limits.max_images:
            raise GatewayError(
                ErrorCode.TOO_MANY_IMAGES,
                f"the request holds {len(request.images)} images; this gateway takes at most "
                f"{self.limits.max_images} per request",
            )
        long_name = next((i.name for i in request.images if len(i.name) > MAX_NAME), None)
        if long_name is not None:
            # Names come back in the answer: a request of long names made an answer as large,
            # past what gRPC sends.
            raise GatewayError(
                ErrorCode.INVALID_REQUEST,
                f"an image name of {len(long_name)} characters; names are at most {MAX_NAME}",
            )
        # Headers first, for every image: nothing is decoded until the whole request is known
        # to fit its pixel budget.
        items: list[Probe | ItemError] = [self._probe(image.data) for image in request.images]
        # What is known of each image so far, for the image errors of a request that fails whole.
        known: list[Probe | ItemError | DecodedImage] = list(items)
        try:
            return self._infer_probed(request, model, items, known)
        except GatewayError as exc:
            # The request fails whole, but its images failed each for a reason: their own for
            # those refused or undecodable, the model's for those it was given.
            for item in known:
                if isinstance(item, ItemError):
                    metrics.inc(metrics.IMAGE_ERRORS, (item.code,))
                elif isinstance(item, DecodedImage) and exc.error is ErrorCode.MODEL_ERROR:
                    metrics.inc(metrics.IMAGE_ERRORS, (exc.code,))
            raise

    def _infer_probed(
        self,
        request: InferRequest,
        model: Model,
        items: list[Probe | ItemError],
        known: list[Probe | ItemError | DecodedImage],
    ) -> InferResponse:
        metrics.observe(metrics.IMAGES_PER_REQUEST, len(items))
        for image, probed in zip(request.images, items, strict=True):
            metrics.observe(metrics.IMAGE_BYTES, len(image.data))
            if isinstance(probed, Probe):
                metrics.observe(metrics.IMAGE_PIXELS, probed.size.pixels)
        total = sum(p.size.pixels for p in items if isinstance(p, Probe))
        if total > self.limits.max_request_pixels:
            raise GatewayError(
                ErrorCode.TOO_MANY_PIXELS,
                f"the images of this request hold {total} pixels together; this gateway decodes "
                f"at most {self.limits.max_request_pixels} per request",
            )
        batcher = self.batchers.get(model.name)
        stopped = functools.partial(_stopped, request)
        # A batched request keeps its slot while it waits for others: its decoded images are
        # memory until the batch runs, and a model that hangs must not let requests pile up
        # behind it past the budget and --max-queue.
        with self.admission.slot(
            _cost(items, request.color_mode), request.deadline, stopped
        ) as held:
            decoded = self._decode_all(request, items, self._min_sizes[model.name], model.name)
            known[:] = decoded
            good = [d for d in decoded if isinstance(d, DecodedImage)]
            outputs = self._predict(model, batcher, good, request, held) if good else []
        # An answer after the deadline is no answer: nobody is waiting for it any more, or the
        # HTTP client was promised a bound.
        _check_request(request)
        it = iter(outputs)
        results = []
        for image, item in zip(request.images, decoded, strict=True):
            if isinstance(item, ItemError):
                results.append(ItemResult(image.name, error=item))
            else:
                output = next(it)
                if isinstance(output, ItemError):
                    metrics.inc(metrics.IMAGE_ERRORS, (output.code,))
                    results.append(ItemResult(image.name, error=output))
                else:
                    results.append(ItemResult(image.name, info=item.info, output=output))
        return InferResponse(model.name, request.request_id, tuple(results))

    def _probe(self, data: Buffer) -> Probe | ItemError:
        try:
            check_image_bytes(memoryview(data).nbytes, self.limits.max_image_bytes)
            return probe(data, self.limits.max_image_pixels)
        except GatewayError as exc:
            return ItemError(exc.error, exc.message)

    def _decode_all(
        self,
        request: InferRequest,
        items: list[Probe | ItemError],
        min_size: tuple[int, int] | None,
        model_name: str,
    ) -> list[DecodedImage | ItemError]:
        """Decode every image, the calling thread included: it and up to `decode_threads`
        helpers take the next undecoded image until none is left. A helper that has not
        started by then is cancelled, so a busy pool costs a request no waiting, and a request
        pays one thread hand-off per helper instead of one per image."""
        self.activity.decoding(request.request_id, model_name)
        try:
            return self._decode_each(request, items, min_size, model_name)
        finally:
            self.activity.idle()

    def _decode_each(
        self,
        request: InferRequest,
        items: list[Probe | ItemError],
        min_size: tuple[int, int] | None,
        model_name: str,
    ) -> list[DecodedImage | ItemError]:
        images = request.images
        count = len(images)
        if count == 1:
            return [self._decode(images[0].data, items[0], request, min_size)]
        decoded: list[DecodedImage | ItemError | None] = [None] * count
        claim = itertools.count().__next__  # one C call: atomic under the GIL

        def work() -> None:
            while (i := claim()) < count:
                decoded[i] = self._decode(images[i].data, items[i], request, min_size)

        def help_with() -> None:
            # A decoder that crashes its process on a helper's thread does so on this request.
            self.activity.decoding(request.request_id, model_name)
            try:
                work()
            finally:
                self.activity.idle()

        helpers = [
            self._decoders.submit(help_with) for _ in range(min(count, self._helpers + 1) - 1)
        ]
        try:
            work()
        finally:
            for helper in helpers:
                if not helper.cancel():
                    helper.result()
        return [d for d in decoded if d is not None]

    def _decode(
        self,
        data: Buffer,
        item: Probe | ItemError,
        request: InferRequest,
        min_size: tuple[int, int] | None,
    ) -> DecodedImage | ItemError:
        if isinstance(item, ItemError):
            return item
        _check_request(request)
        started = time.perf_counter()
        try:
            return decode(data, item, request.color_mode, min_size)
        except GatewayError as exc:
            return ItemError(exc.error, exc.message)
        finally:
            metrics.observe(metrics.DECODE_SECONDS, time.perf_counter() - started)

    def infer_one(self, request: InferRequest) -> InferResponse:
        """Infer on a single image; its error, if any, fails the whole call."""
        response = self.infer(request)
        (result,) = response.results
        if result.error is not None:
            raise GatewayError(result.error.error, result.error.message)
        return response

    def _predict(
        self,
        model: Model,
        batcher: Batcher | None,
        images: list[DecodedImage],
        request: InferRequest,
        held: Held,
    ) -> list[JSONValue | ItemError]:
        _check_request(request)
        arrays = [d.array for d in images]
        try:
            # A batched request waits here while the batcher's thread calls the model: a crash
            # in that call is one during this request too.
            self.activity.in_model(request.request_id, model.name)
            try:
                if batcher is None:
                    metrics.observe(metrics.BATCH_SIZE, len(arrays), (model.name,))
                    call = self.model_calls.begin(model.name)
                    try:
                        outputs = model.predict(arrays, request.parameters)
                    finally:
                        self.model_calls.end(call)
                else:
                    remaining = None
                    if request.deadline is not None:
                        remaining = max(0.0, request.deadline - time.monotonic())
                    stopped = functools.partial(_stopped, request)
                    # One color mode a call, as a request gives the model without batching.
                    outputs = batcher.predict(
                        arrays, request.parameters, remaining, stopped, request.color_mode.value
                    )
            finally:
                self.activity.idle()
            return _json_outputs(outputs, len(arrays), model.name, request.request_id)
        except WaitTimeoutError as exc:
            if exc.running is not None:
                held.keep_until(exc.running)
            raise GatewayError(
                ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed waiting for the model"
            ) from None
        except DroppedError:
            # The batcher dropped it: deadline passed or client gone, and it says which.
            raise _stopped(request) or GatewayError(
                ErrorCode.CANCELLED, "the request was dropped before the model ran"
            ) from None
        # Whatever the model raised, SystemExit and KeyboardInterrupt too: on a request's thread
        # they are its bug (a real Ctrl-C reaches the main thread), and let through they stopped
        # the HTTP server.
        except BaseException as exc:
            failure = exc.error if isinstance(exc, ModelRaisedError) else exc
            if isinstance(failure, ParameterError):
                message = str(failure)
                if len(message) > MAX_PARAMETER_MESSAGE:
                    message = message[:MAX_PARAMETER_MESSAGE] + "..."
                del failure
                # The client's to mend, in the model's words; not a fault to log.
                raise GatewayError(
                    ErrorCode.INVALID_REQUEST,
                    f"model {model.name!r} refused the request's parameters: {message}",
                ) from None
            log.error(
                "model %r failed, request id %s",
                model.name,
                request.request_id,
                exc_info=(type(failure), failure, failure.__traceback__),
            )
            # Its traceback holds this frame, which holds the images: a cycle, freed only when
            # the cycle collector happened to run.
            del failure
            raise GatewayError(
                ErrorCode.MODEL_ERROR,
                f"model {model.name!r} failed on this request (request id "
                f"{request.request_id}); the server log has the details",
            ) from None


def _json_outputs(
    outputs: object, count: int, model: str, request_id: str
) -> list[JSONValue | ItemError]:
    """One JSON value an image, or ValueError naming what is wrong with the outputs as a whole.
    An output no front can carry (a NaN, a tuple key) fails its own image with model_error,
    logged with where in the output it is; the other images keep theirs, as a request's image
    that does not decode fails alone."""
    converted: list[JSONValue | ItemError] = []
    for index, output in enumerate(check_outputs(outputs, count)):
        try:
            converted.append(to_json_value(output))
        except NotJSONError as exc:
            log.error(
                "model %r answered image %d of request %s with an output no front can carry: "
                "output%s: %s",
                model,
                index,
                request_id,
                "".join(exc.path),
                exc.reason,
            )
            converted.append(
                ItemError(
                    ErrorCode.MODEL_ERROR,
                    f"model {model!r} answered this image with an output that has no JSON form "
                    f"(request id {request_id}); the server log has the details",
                )
            )
    return converted


def _cost(items: Sequence[Probe | ItemError], color_mode: ColorMode) -> int:
    """What a request takes of the pixel budget: its pixels, each counted once for every 8 bytes
    it decodes to, or, where its decoder holds more, once for every 8 bytes of those. The budget
    is sized for 16-bit RGBA, the deepest most formats decode to (`unchanged`); a float TIFF,
    PFM, HDR or OpenEXR decodes deeper, up to 32 bytes a pixel, and OpenJPEG holds 4 bytes a
    sample of every component in every mode (16 a pixel for RGBA, twice that when tiled)."""
    cost = 0
    for probed in items:
        if isinstance(probed, Probe):
            size = probed.size
            decoded = size.pixel_bytes if color_mode is ColorMode.UNCHANGED else 8
            cost += max(size.pixels * -(-decoded // 8), -(-size.decoder_bytes // 8))
    return cost


def _stopped(request: InferRequest) -> GatewayError | None:
    """Why a request should stop (its deadline passed, or its client has gone), if it should."""
    now = time.monotonic()
    if request.deadline is not None and now > request.deadline:
        return GatewayError(
            ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it was done"
        )
    gone = request.client_gone
    if gone is not None and now - request.received > CLIENT_CHECK_AFTER and gone():
        return GatewayError(
            ErrorCode.CANCELLED, "the client went away before its answer; the request was dropped"
        )
    return None


def _check_request(request: InferRequest) -> None:
    """Stop a request whose deadline passed or whose client has gone."""
    stopped = _stopped(request)
    if stopped is not None:
        raise stopped

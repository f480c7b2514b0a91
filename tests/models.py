"""Models used only by the tests, loaded by the gateway as "tests.models:<factory>"."""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np

from gateway.core.errors import ErrorCode, GatewayError
from gateway.models.base import ParameterError


class FailingModel:
    """Raises on every call, as a buggy user model would."""

    name = "failing"
    description = "raises on every call"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        raise RuntimeError("model bug")


class SlowModel:
    """Sleeps params["seconds"] before answering; for deadlines."""

    name = "slow"
    description = "sleeps, then answers the shape"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        time.sleep(float(params.get("seconds", 1.0)))
        return [list(i.shape) for i in images]


class GatedModel:
    """Answers the shape once GATE is set (or after 30 s): holds a slot as long as a test needs."""

    name = "gated"
    description = "waits for the test's gate, then answers the shape"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        GATE.wait(30)
        return [list(i.shape) for i in images]


GATE = threading.Event()


class GatedBatching:
    """Batched; records the "tag" parameter of every call as it starts, then waits for GATE."""

    name = "gated-batching"
    description = "batched; records each call's tag, waits for the test's gate, answers the shape"
    max_batch_size = 16
    max_batch_wait_ms = 1

    def __init__(self) -> None:
        self.tags: list[Any] = []
        self.lock = threading.Lock()

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        with self.lock:
            self.tags.append(params.get("tag"))
        GATE.wait(30)
        return [list(i.shape) for i in images]


GATED_BATCHING = GatedBatching()


def gated_batching() -> GatedBatching:
    return GATED_BATCHING


class SpyModel:
    """Records every batch it receives: the list length, each array's shape, dtype and checksum."""

    name = "spy"
    description = "records what it sees"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        seen = [(i.shape, str(i.dtype), int(i.astype(np.uint64).sum())) for i in images]
        with self.lock:
            self.calls.append({"batch": len(images), "images": seen, "params": dict(params)})
        return [{"checksum": s[2]} for s in seen]


SPY = SpyModel()


def failing() -> FailingModel:
    return FailingModel()


def slow() -> SlowModel:
    return SlowModel()


def gated() -> GatedModel:
    return GatedModel()


def spy() -> SpyModel:
    return SPY


class BatchingSpy:
    """Batched (its own attributes ask for it); records the size of every call it gets."""

    name = "batching-spy"
    description = "records batch sizes; fails a whole call holding an image 13 pixels wide"
    max_batch_size = 16
    max_batch_wait_ms = 300

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        # The array shapes of every call, past the first two (height, width) axes.
        self.layouts: list[set[tuple[int, ...]]] = []
        self.lock = threading.Lock()

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        with self.lock:
            self.batch_sizes.append(len(images))
            self.layouts.append({i.shape[2:] for i in images})
        if any(i.shape[1] == 13 for i in images):
            raise ValueError("an image 13 pixels wide")
        return [{"width": int(i.shape[1]), "tag": params.get("tag")} for i in images]


BATCHING_SPY = BatchingSpy()


def batching_spy() -> BatchingSpy:
    return BATCHING_SPY


class SmallInput:
    """Declares that it needs at least 50x40 pixels; reports what it got (shape and checksum)."""

    name = "small-input"
    description = "needs 50x40 pixels at least; reports the shape and checksum it received"
    min_input_size = (50, 40)

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        return [
            {"shape": list(i.shape), "checksum": int(i.astype(np.uint64).sum())} for i in images
        ]


def small_input() -> SmallInput:
    return SmallInput()


class Misbehaving:
    """Does what its "do" parameter says on an image 13 pixels wide, the shape on any other:
    raise an exception by its name, return an output no front can carry, or write to its input
    (and then raise). A buggy user model, every way the gateway must contain. Given "deque" it
    answers every image right, in a sequence that cannot be sliced. It notes a weak reference
    to every array it is given, and to the arrays that array is a view of, in SEEN."""

    name = "misbehaving"
    description = "misbehaves on an image 13 pixels wide, as its 'do' parameter says"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> Any:
        for image in images:
            array: np.ndarray | None = image
            while array is not None:
                SEEN.append(weakref.ref(array))
                array = array.base if isinstance(array.base, np.ndarray) else None
        do = str(params.get("do", ""))
        bad = any(i.shape[1] == 13 for i in images)
        outputs = [[*i.shape, int(i[0, 0].sum())] for i in images]
        if do == "deque":
            return deque(outputs)
        if do == "write":
            for image in images:
                image[0, 0] = 0
            if bad:
                raise ValueError("wrote to its input, then failed")
        elif do == "ParameterError":  # about the parameters alone, whatever the image
            raise ParameterError("threshold must be a number, not 'x'")
        elif bad and do == "GatewayError":
            # The gateway's own error is no way for a model to answer: model_error, as any.
            raise GatewayError(ErrorCode.INVALID_REQUEST, "a model that borrowed this")
        elif bad and do in _RAISED:
            raise _RAISED[do]("the model raised this itself")
        elif bad and do in _OUTPUTS:
            return [_OUTPUTS[do]() if i.shape[1] == 13 else list(i.shape) for i in images]
        elif bad and do == "str":
            return "x"  # one character: one "output" for one image
        return outputs


SEEN: list[weakref.ref[np.ndarray]] = []


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


_RAISED: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "TimeoutError": TimeoutError,
    "CancelledError": CancelledError,
}
_OUTPUTS: dict[str, Callable[[], Any]] = {
    "huge-int": lambda: 10**400,
    "surrogate": lambda: "\ud800",
    "deep": lambda: _nested(60),
    "clashing-keys": lambda: {1: "a", "1": "b"},
    "tuple-key": lambda: {(1, 2): "a"},
}


class BatchedMisbehaving(Misbehaving):
    name = "misbehaving-batched"
    max_batch_size = 16
    max_batch_wait_ms = 200


def misbehaving() -> Misbehaving:
    return Misbehaving()


def misbehaving_batched() -> BatchedMisbehaving:
    return BatchedMisbehaving()


class ThreadPools:
    """Answers, for each image, the thread counts of the math libraries loaded in its worker and
    the OMP_NUM_THREADS a library loaded now would read, and which worker answered."""

    name = "thread-pools"
    description = "the worker's BLAS thread counts"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        import cv2
        from threadpoolctl import threadpool_info

        blas = sorted({pool["num_threads"] for pool in threadpool_info()})
        answer = {
            "pools": blas,
            "opencv": cv2.getNumThreads(),
            "omp_env": os.environ.get("OMP_NUM_THREADS"),
            "pid": os.getpid(),
        }
        return [answer for _ in images]


def thread_pools() -> ThreadPools:
    return ThreadPools()


class Outputs:
    """Answers what its "give" parameter names: numbers only floats can carry, or a text of
    "bytes" characters."""

    name = "outputs"
    description = "answers large numbers, a long text, or an object of keys that are not text"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        if params.get("give") == "text":
            return ["x" * int(params["bytes"]) for _ in images]
        if params.get("give") == "keys":
            return [{None: 0, True: 1, 3: 2, 2.5: 3, np.int64(7): 4} for _ in images]
        return [[1e16, -1e300, 2.0**53 + 2, 2**53, 2.0**53, 2.0**53 - 1, 3.0, 2.5] for _ in images]


def outputs() -> Outputs:
    return Outputs()


class EchoParams:
    """Answers every image with the parameters of its call, for clients that send them."""

    name = "echo-params"
    description = "answers each image with the parameters it was given"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        return [dict(params) for _ in images]


def echo_params() -> EchoParams:
    return EchoParams()


class NativeWriter:
    """Writes its "say" parameter straight to file descriptor 2, as native code does ("times"
    times over, in one write), and with "then" set to "abort" ends its process as a fatal error
    in native code would."""

    name = "native-writer"
    description = "writes its 'say' parameter to file descriptor 2; 'then=abort' aborts"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        os.write(2, str(params.get("say", "")).encode() * int(params.get("times", 1)))
        if params.get("then") == "abort":
            os.abort()
        return [list(i.shape) for i in images]


def native_writer() -> NativeWriter:
    return NativeWriter()


class Untidy:
    """What careless model code does on every call: warns, leaves an exception uncaught in a
    thread of its own, and raises one in a __del__, where Python can only print it; or, given a
    "fail" parameter, raises an exception that quotes it."""

    name = "untidy"
    description = "warns, and leaves exceptions in a thread and in a __del__"

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        if "fail" in params:
            # As a model that names a bad parameter in its error, newlines and all.
            raise ValueError(f"cannot use {params['fail']}")
        warnings.warn("an untidy model warns", UserWarning, stacklevel=1)
        thread = threading.Thread(target=_fail, name="untidy-thread")
        thread.start()
        thread.join()
        _FailsWhenCollected()
        return [list(i.shape) for i in images]


def _fail() -> None:
    raise RuntimeError("a thread of the model failed")


class _FailsWhenCollected:
    def __del__(self) -> None:
        raise RuntimeError("a __del__ of the model failed")


def untidy() -> Untidy:
    return Untidy()


# Seconds the factory `slow_to_load` sleeps before it makes its model.
LOAD_SECONDS = "TEST_MODEL_LOAD_SECONDS"


def slow_to_load() -> Any:
    """The shape model, made after a sleep of $TEST_MODEL_LOAD_SECONDS (0 if unset): a factory
    that loads large weights."""
    from gateway.models.shape import ShapeModel

    time.sleep(float(os.environ.get(LOAD_SECONDS, "0")))
    return ShapeModel()


SIBLINGS = "TEST_MODEL_SIBLINGS_DIR"


def loads_beside_its_siblings() -> Any:
    """The shape model, made only while another worker loads it too: each leaves its pid in
    the directory $TEST_MODEL_SIBLINGS_DIR, and fails if no other has within 20 s."""
    from gateway.models.shape import ShapeModel

    here = Path(os.environ[SIBLINGS])
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + 20
    while len(list(here.iterdir())) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("no other worker loaded the model meanwhile")
        time.sleep(0.05)
    return ShapeModel()


def fails_unless_first() -> Any:
    """Fails at once in every worker but the first to load it (the first to make the file
    `first` in $TEST_MODEL_SIBLINGS_DIR), which goes on loading for 10 minutes."""
    try:
        (Path(os.environ[SIBLINGS]) / "first").touch(exist_ok=False)
    except FileExistsError:
        raise RuntimeError("not the first to load") from None
    time.sleep(600)
    raise RuntimeError("loaded for 10 minutes")

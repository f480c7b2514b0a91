"""The table of requests under way a worker keeps for its supervisor (gateway.inflight): what the
data plane writes into it, and what the supervisor reads back once the worker has died."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gateway import inflight
from gateway.core.dataplane import DataPlane
from gateway.core.types import ImageInput, InferRequest
from gateway.inflight import DECODING, IN_MODEL, Recorder, UnderWay, make_table, under_way
from gateway.models.registry import ModelRegistry
from tests.conftest import DATA

PNG = (DATA / "images" / "hopper.png").read_bytes()


def table(slots: int = 4) -> inflight.Table:
    return make_table(multiprocessing.get_context("spawn"), slots)


def test_a_thread_says_what_it_does_and_is_idle_after() -> None:
    t = table()
    recorder = Recorder(t)
    recorder.decoding("req-1", "shape")
    assert under_way(t) == [UnderWay("req-1", DECODING, "shape")]
    recorder.idle()
    recorder.in_model("req-1", "shape")
    assert under_way(t) == [UnderWay("req-1", IN_MODEL, "shape")]
    recorder.idle()
    assert under_way(t) == []


def test_what_is_stored_is_bounded_and_logged_quoted() -> None:
    # Request ids are the client's, up to 128 characters; model names anyone's.
    t = table()
    recorder = Recorder(t)
    recorder.in_model("x" * 200, "m" * 100)
    (found,) = under_way(t)
    assert found.request_id == "x" * 125 + "..."
    assert found.model == "m" * 61 + "..."
    recorder.decoding("a 'quoted'\n\u00e9 id", "caf\u00e9")
    (found,) = under_way(t)
    assert found == UnderWay("a 'quoted'\n\\xe9 id", DECODING, "caf\u00e9")
    assert str(found) == (
        "request \"a 'quoted'\\n\\\\xe9 id\" (decoding its images for model 'caf\u00e9')"
    )


def test_a_thread_that_ends_gives_its_slot_back() -> None:
    t = table(slots=2)
    recorder = Recorder(t)

    def request(n: int) -> None:
        recorder.in_model(f"req-{n}", "shape")
        recorder.idle()

    for n in range(8):  # one after another: two slots are enough
        thread = threading.Thread(target=request, args=(n,))
        thread.start()
        thread.join()
    assert inflight.missed(t) == 0

    # Three at once: the third finds no slot, and says so.
    started, go = threading.Barrier(4), threading.Event()

    def held(n: int) -> None:
        recorder.in_model(f"held-{n}", "shape")
        started.wait()
        go.wait()
        recorder.idle()

    threads = [threading.Thread(target=held, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    started.wait()
    assert len(under_way(t)) == 2
    assert inflight.missed(t) == 1
    go.set()
    for thread in threads:
        thread.join()
    assert under_way(t) == []


class Watching:
    """Reads the table while it runs: what the supervisor would find, were it to crash here."""

    name = "watching"
    description = "notes what the table says during its call"

    def __init__(self, t: inflight.Table) -> None:
        self.table = t
        self.seen: list[list[UnderWay]] = []

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[Any]:
        self.seen.append(under_way(self.table))
        return [list(i.shape) for i in images]


def test_the_data_plane_marks_its_model_calls_and_leaves_nothing_behind() -> None:
    t = table(slots=64)
    model = Watching(t)
    dataplane = DataPlane(ModelRegistry([model]), activity=Recorder(t))
    try:
        # Several images: decode helpers take some, each on a thread of its own.
        images = tuple(ImageInput(PNG, f"{n}.png") for n in range(6))
        response = dataplane.infer(InferRequest("watching", images, request_id="req-7"))
        assert [r.output for r in response.results] == [[128, 128, 3]] * 6
        assert model.seen == [[UnderWay("req-7", IN_MODEL, "watching")]]
        assert under_way(t) == []
    finally:
        dataplane.close()

"""benchmarks/goals.py reads the speed goals out of a `make bench` report; README quotes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import goals

LATEST = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "latest.json"


def _row(image: str, target: str, conc: int, rps: float, run: int, **kw: Any) -> dict[str, Any]:
    per = kw.get("per", 1)
    return {
        "image": image,
        "target": target,
        "concurrency": conc,
        "images_per_request": per,
        "requests_per_s": rps,
        "images_per_s": rps * per,
        "p50_ms": 1.0,
        "p99_ms": kw.get("p99", 2.0),
        "ratio_to_limit": kw.get("ratio"),
        "errors": 0,
        "run": run,
    }


def _two_runs() -> dict[str, Any]:
    rows = []
    for run, (flask, http, bare, grpc, jpeg, off, on) in enumerate(
        [(1000, 4100, 5000, 5000, 0.95, 300, 590), (1000, 3900, 5000, 5100, 0.85, 300, 610)]
    ):
        rows += [
            _row("64x64 PNG", "naive Flask (dev server)", 8, flask, run),
            _row("64x64 PNG", "gateway HTTP octet-stream", 8, http, run),
            _row("64x64 PNG", "bare grpcio server", 8, bare, run),
            _row("64x64 PNG", "gateway gRPC Infer", 8, grpc, run),
            _row("640x480 JPEG", "gateway gRPC InferBatch x8", 8, 100, run, per=8, ratio=jpeg),
            _row("64x64 PNG", "embedding model, batching off, HTTP octet-stream", 16, off, run),
            _row(
                "64x64 PNG",
                "embedding model, batching on, 8 / 4 ms, HTTP octet-stream",
                16,
                on,
                run,
            ),
        ]
    upload = {
        "body_mb": 50.1,
        "idle_rss_mb": 80.0,
        "http_peak_rss_mb": 229.0,
        "grpc_peak_rss_mb": 231.0,
    }
    return {"rows": rows, "upload_50mb": [upload, {**upload, "http_peak_rss_mb": 231.0}]}


def test_each_goal_is_evaluated_in_each_repetition() -> None:
    found = {(c.goal, c.cell): c for c in goals.checks(_two_runs())}
    assert set(found) == {
        ("640x480 JPEG, gRPC InferBatch x8: x the decode limit", "concurrency 8"),
        ("64x64 PNG, HTTP: x naive Flask", "concurrency 8"),
        ("64x64 PNG, gRPC Infer: x bare grpcio", "concurrency 8"),
        ("dynamic batching, HTTP octet-stream: on / off", "concurrency 16"),
        ("50 MB upload, HTTP: peak RSS over idle, MB", "one worker"),
        ("50 MB upload, gRPC: peak RSS over idle, MB", "one worker"),
    }

    def values(goal: str) -> list[float]:
        (check,) = [c for (g, _), c in found.items() if g == goal]
        return [round(m.value, 3) for m in check.measures if m is not None]

    def met(goal: str) -> int:
        (check,) = [c for (g, _), c in found.items() if g == goal]
        return check.met_count

    assert values("64x64 PNG, HTTP: x naive Flask") == [4.1, 3.9]
    assert met("64x64 PNG, HTTP: x naive Flask") == 1
    assert values("64x64 PNG, gRPC Infer: x bare grpcio") == [1.0, 1.02]
    assert met("64x64 PNG, gRPC Infer: x bare grpcio") == 2
    assert met("640x480 JPEG, gRPC InferBatch x8: x the decode limit") == 1
    assert values("dynamic batching, HTTP octet-stream: on / off") == [1.967, 2.033]
    # Memory is a bound from above: 149 MB meets 150, 151 does not.
    assert values("50 MB upload, HTTP: peak RSS over idle, MB") == [149.0, 151.0]
    assert met("50 MB upload, HTTP: peak RSS over idle, MB") == 1
    assert met("50 MB upload, gRPC: peak RSS over idle, MB") == 0
    table = goals.table(list(found.values()))
    assert "| run 1 | run 2 |" in table and "| 1 of 2 |" in table


def test_the_committed_report_gives_every_goal() -> None:
    report = json.loads(LATEST.read_text())
    found = goals.checks(report)
    names = {c.goal.split(":")[0] for c in found}
    assert {
        "640x480 JPEG, HTTP octet-stream",
        "640x480 JPEG, HTTP multipart x8",
        "640x480 JPEG, gRPC Infer",
        "640x480 JPEG, gRPC InferBatch x8",
        "64x64 PNG, HTTP",
        "64x64 PNG, gRPC Infer",
        "dynamic batching, HTTP octet-stream",
        "dynamic batching, gRPC Infer",
        "50 MB upload, HTTP",
        "50 MB upload, gRPC",
    } <= names
    # Every check has a value for every repetition the report holds.
    runs = report.get("repeat", 1)
    assert all(len(c.measures) == runs and None not in c.measures for c in found)
    if "goals" in report:  # written by bench.py from the same function
        assert report["goals"] == goals.as_json(found)

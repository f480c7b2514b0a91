"""The speed goals, read from a `make bench` report: each goal, its cells, met or not.

Every ratio pairs two cells of one repetition of the run, measured on the same servers within
minutes of each other. With `make bench ARGS="--repeat N"` each pair is evaluated in every
repetition, and the table gives every value: on a machine as noisy as a small VM one repetition
can land either side of a line that three do not.

    python -m benchmarks.goals [benchmarks/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

JPEG = "640x480 JPEG"
PNG = "64x64 PNG"
LIMIT_TARGETS = (
    "gateway HTTP octet-stream",
    "gateway HTTP multipart x8",
    "gateway gRPC Infer",
    "gateway gRPC InferBatch x8",
)
UPLOAD_MB = 50


@dataclass(frozen=True)
class Measure:
    value: float
    detail: str


@dataclass(frozen=True)
class Check:
    goal: str
    cell: str
    bound: float
    # At least `bound` (throughput goals) or at most (memory).
    at_most: bool
    # One per repetition; None where the run lacks a cell.
    measures: tuple[Measure | None, ...]

    def met(self, measure: Measure) -> bool:
        return measure.value <= self.bound if self.at_most else measure.value >= self.bound

    @property
    def met_count(self) -> int:
        return sum(1 for m in self.measures if m is not None and self.met(m))

    @property
    def measured_count(self) -> int:
        return sum(1 for m in self.measures if m is not None)


Rows = Sequence[Mapping[str, Any]]


def _runs(report: Mapping[str, Any]) -> list[Rows]:
    rows = report["rows"]
    count = 1 + max((r.get("run", 0) for r in rows), default=0)
    return [[r for r in rows if r.get("run", 0) == run] for run in range(count)]


def _uploads(report: Mapping[str, Any]) -> list[Mapping[str, float]]:
    upload = report.get("upload_50mb") or []
    # Reports from before --repeat hold one measurement, not a list.
    return [upload] if isinstance(upload, dict) else list(upload)


def _row(rows: Rows, image: str, target: str, conc: int) -> Mapping[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["image"] == image and r["target"] == target and r["concurrency"] == conc
        ),
        None,
    )


def _ratio_to_limit(rows: Rows, target: str, conc: int) -> Measure | None:
    row = _row(rows, JPEG, target, conc)
    if row is None or row["ratio_to_limit"] is None:
        return None
    return Measure(row["ratio_to_limit"], f"{row['images_per_s']:.0f} images/s")


def _versus(rows: Rows, image: str, ours: str, theirs: str, conc: int) -> Measure | None:
    a, b = _row(rows, image, ours, conc), _row(rows, image, theirs, conc)
    if a is None or b is None or not b["requests_per_s"]:
        return None
    return Measure(
        a["requests_per_s"] / b["requests_per_s"],
        f"{a['requests_per_s']:.0f} vs {b['requests_per_s']:.0f} req/s",
    )


def _batching(rows: Rows, protocol: str) -> Measure | None:
    def find(label: str) -> Mapping[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["target"].startswith(f"embedding model, batching {label}")
                and r["target"].endswith(protocol)
            ),
            None,
        )

    off, on = find("off"), find("on")
    if off is None or on is None or not off["requests_per_s"]:
        return None
    return Measure(
        on["requests_per_s"] / off["requests_per_s"],
        f"{off['requests_per_s']:.0f} -> {on['requests_per_s']:.0f} req/s, "
        f"p99 {off['p99_ms']:.1f} -> {on['p99_ms']:.1f} ms",
    )


def _upload(upload: Mapping[str, float] | None, protocol: str) -> Measure | None:
    if not upload:
        return None
    growth = upload[f"{protocol}_peak_rss_mb"] - upload["idle_rss_mb"]
    return Measure(growth, f"+{growth:.1f} MB for a {upload['body_mb']:.1f} MB body")


def checks(report: Mapping[str, Any]) -> list[Check]:
    runs = _runs(report)
    uploads = _uploads(report)
    concurrencies = sorted({r["concurrency"] for r in report["rows"] if r["concurrency"]})

    def over_runs(measure: Callable[[Rows], Measure | None]) -> tuple[Measure | None, ...]:
        return tuple(measure(rows) for rows in runs)

    out = []
    # One request at a time holds one image decoding at once, so the 2-process limit is out of
    # reach by construction at concurrency 1: the decode-limit goal is about load.
    for target in LIMIT_TARGETS:
        for conc in (c for c in concurrencies if c > 1):
            out.append(
                Check(
                    f"{JPEG}, {target.removeprefix('gateway ')}: x the decode limit",
                    f"concurrency {conc}",
                    0.9,
                    False,
                    over_runs(partial(_ratio_to_limit, target=target, conc=conc)),
                )
            )
    for conc in concurrencies:
        out.append(
            Check(
                f"{PNG}, HTTP: x naive Flask",
                f"concurrency {conc}",
                4.0,
                False,
                over_runs(
                    partial(
                        _versus,
                        image=PNG,
                        ours="gateway HTTP octet-stream",
                        theirs="naive Flask (dev server)",
                        conc=conc,
                    )
                ),
            )
        )
    for conc in concurrencies:
        out.append(
            Check(
                f"{PNG}, gRPC Infer: x bare grpcio",
                f"concurrency {conc}",
                1.0,
                False,
                over_runs(
                    partial(
                        _versus,
                        image=PNG,
                        ours="gateway gRPC Infer",
                        theirs="bare grpcio server",
                        conc=conc,
                    )
                ),
            )
        )
    for protocol in ("HTTP octet-stream", "gRPC Infer"):
        out.append(
            Check(
                f"dynamic batching, {protocol}: on / off",
                "concurrency 16",
                2.0,
                False,
                over_runs(partial(_batching, protocol=protocol)),
            )
        )
    for protocol in ("http", "grpc"):
        out.append(
            Check(
                f"{UPLOAD_MB} MB upload, {'HTTP' if protocol == 'http' else 'gRPC'}: peak RSS "
                "over idle, MB",
                "one worker",
                3.0 * UPLOAD_MB,
                True,
                tuple(
                    _upload(uploads[run] if run < len(uploads) else None, protocol)
                    for run in range(len(runs))
                ),
            )
        )
    # A report made with --skip-batching, --images or --concurrency lacks some cells.
    return [c for c in out if c.measured_count]


def table(found: Sequence[Check]) -> str:
    runs = max((len(c.measures) for c in found), default=1)
    heads = [f"run {i + 1}" for i in range(runs)] if runs > 1 else ["measured"]
    lines = [
        "| goal | cell | bound | " + " | ".join(heads) + " | met |",
        "| --- | --- | --- | " + " | ".join("---" for _ in heads) + " | --- |",
    ]
    for c in found:
        cells = [
            "" if m is None else f"{m.value:.2f} ({m.detail})" if runs == 1 else f"{m.value:.2f}"
            for m in c.measures
        ]
        bound = f"{'<=' if c.at_most else '>='} {c.bound:g}"
        met = f"{c.met_count} of {c.measured_count}" if runs > 1 else "yes" if c.met_count else "no"
        lines.append(f"| {c.goal} | {c.cell} | {bound} | " + " | ".join(cells) + f" | {met} |")
    return "\n".join(lines)


def as_json(found: Sequence[Check]) -> list[dict[str, Any]]:
    return [
        {
            "goal": c.goal,
            "cell": c.cell,
            "bound": c.bound,
            "at_most": c.at_most,
            "values": [None if m is None else m.value for m in c.measures],
            "met": [None if m is None else c.met(m) for m in c.measures],
        }
        for c in found
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", nargs="?", default=str(RESULTS / "latest.json"))
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    print(table(checks(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

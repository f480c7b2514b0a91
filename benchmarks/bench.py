"""`make bench`: the gateway against the decode limit and against plain baselines, one table.

Everything runs on loopback on this machine, load generator included:
- the in-process limit: a cv2.imdecode loop in 1 and in N processes (N = CPU cores), and in N
  processes with glibc's default malloc (what a plain loop measures);
- baselines: a naive Flask app on Flask's development server, a bare grpcio server;
- the gateway (`image-gateway serve`, default workers) over HTTP octet-stream, HTTP multipart
  (8 images a request), gRPC Infer, InferBatch (8) and InferStream (8 messages a stream).
HTTP load comes from wrk (a Lua script posts the body), gRPC load from h2load posting pre-framed
gRPC messages; both are C programs that cost the server little CPU. Every target's answer is
checked with a real client before it is timed. Results print as a Markdown table and are written
as JSON to benchmarks/results/.

Needs Debian's `wrk` and `nghttp2-client` (h2load): `apt-get install wrk nghttp2-client`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import goals  # noqa: E402
from benchmarks.images import BenchImage, bench_images  # noqa: E402
from benchmarks.serving import gateway, process  # noqa: E402
from clients.pb.imagegateway.v1 import gateway_pb2 as pb  # noqa: E402
from gateway import allocator  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERVICE = "/imagegateway.v1.ImageGatewayService"
BATCH = 8
# (label, load generator, url, body, content type for wrk, images a request)
Target = tuple[str, str, str, bytes, str | None, int]
BOUNDARY = "benchboundary"


@dataclass
class Row:
    image: str
    target: str
    concurrency: int
    images_per_request: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    ratio_to_limit: float | None
    errors: int
    # Which repetition of the run (--repeat) measured it.
    run: int = 0


# ---------------------------------------------------------------- the in-process decode limit


def _decode_loop(data: bytes, seconds: float, out: multiprocessing.Queue[int]) -> None:
    buf = np.frombuffer(data, np.uint8)
    cv2.setNumThreads(1)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        cv2.imdecode(buf, cv2.IMREAD_COLOR)
        n += 1
    out.put(n)


def decode_limit(data: bytes, procs: int, seconds: float, tuned: bool = True) -> float:
    """Images/s of `procs` processes decoding in a loop. Tuned (the limit), each reuses its heap
    for decoded images, as the gateway sets glibc up (see gateway/allocator.py); untuned, glibc's
    defaults give every image over 128 KiB a fresh mapping, which is what a plain loop measures.
    Spawned processes take malloc's settings from the environment they start with."""
    if tuned:
        for name, value in allocator.ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        return _decode_processes(data, procs, seconds)
    saved = {name: os.environ.pop(name) for name in allocator.ENVIRONMENT if name in os.environ}
    try:
        return _decode_processes(data, procs, seconds)
    finally:
        os.environ.update(saved)


def _decode_processes(data: bytes, procs: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    workers = [ctx.Process(target=_decode_loop, args=(data, seconds, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    total = sum(out.get() for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a gateway's workers), in seconds."""
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [pid, *map(int, children)]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        pass  # a process that ended uses no CPU
    return total


def wait_idle(pids: list[int], timeout: float = 120) -> None:
    """Wait until the servers have stopped working: after a load generator stops, a server
    still answers what it had queued (seconds of it after 64 clients of 4000x3000 JPEGs), and
    that work would share the cores with the next cell."""
    end = time.monotonic() + timeout
    before = sum(map(_cpu_seconds, pids))
    while time.monotonic() < end:
        time.sleep(0.5)
        now = sum(map(_cpu_seconds, pids))
        if now - before < 0.05:  # under a tenth of a core for half a second
            return
        before = now


# ---------------------------------------------------------------- load generators


def run_wrk(
    url: str, body: bytes, content_type: str, conc: int, seconds: float, warmup: float
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        env = {**os.environ, "BODY": f.name, "CTYPE": content_type}
        script = str(HERE / "wrk_post.lua")
        threads = "1" if conc < 8 else "2"
        if warmup:
            subprocess.run(
                ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(warmup))}s", "-s", script, url],
                env=env,
                capture_output=True,
                check=True,
            )
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{conc}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                script,
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    # wrk counts every answer; only the good ones are throughput.
    return {
        "rps": (result["requests"] - result["non2xx"]) / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": result["socket_errors"] + result["non2xx"],
    }


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def run_h2load(url: str, data: bytes, conc: int, seconds: float, warmup: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data"
        data_path.write_bytes(data)
        log_path = Path(tmp) / "log"
        out = subprocess.run(
            [
                "h2load",
                f"-c{conc}",
                "-m1",
                "-t1",
                f"--duration={max(1, round(seconds))}",
                f"--warm-up-time={max(1, round(warmup))}",
                "-d",
                str(data_path),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                f"--log-file={log_path}",
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        latencies = sorted(
            int(line.split("\t")[2]) for line in log_path.read_text().splitlines() if line
        )
    rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    counts = re.search(r"requests: (\d+) total.*?(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    assert counts
    errors = int(counts.group(3)) + int(counts.group(4))

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1000

    return {"rps": rps, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": errors}


def grpc_outcomes(http_url: str) -> dict[tuple[str, bool], float]:
    """(gRPC method, answered OK) -> calls, from the gateway's own /metrics.

    h2load sees HTTP/2 status 200 for every gRPC answer, failed or not (the gRPC status is in
    the trailers), so the gateway's counts say how many calls failed. Calls counted CANCELLED
    are left out: h2load cancels the calls still open when its time is up, and those are
    neither answers nor failures of the server."""
    text = requests.get(f"{http_url}/metrics", timeout=30).text
    counts: dict[tuple[str, bool], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "gateway_requests_total"
                and sample.labels["protocol"] == "grpc"
                and sample.labels["code"] != "CANCELLED"
            ):
                key = (sample.labels["method"], sample.labels["code"] == "OK")
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def count_grpc_failures(
    result: dict[str, float],
    method: str,
    per_call: int,
    before: dict[tuple[str, bool], float],
    after: dict[tuple[str, bool], float],
) -> None:
    """Take failed calls out of h2load's req/s and into the errors column. The counts span
    warm-up and measurement, so the failed share, not the count, scales req/s. A stream's
    messages are counted one by one (`per_call` to a stream), a refused stream once."""
    ok = after.get((method, True), 0.0) - before.get((method, True), 0.0)
    failed = after.get((method, False), 0.0) - before.get((method, False), 0.0)
    calls = ok / per_call + failed if method == "InferStream" else ok + failed
    if failed and calls:
        result["rps"] *= 1 - failed / calls
        result["errors"] += failed


# ---------------------------------------------------------------- targets


def multipart_body(data: bytes, count: int) -> bytes:
    parts = []
    for i in range(count):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{i}"; '
            f'filename="{i}.img"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def check_http(url: str, body: bytes, ctype: str, expect: object) -> None:
    resp = requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=60)
    resp.raise_for_status()
    got = resp.json()
    if isinstance(got, dict):
        got = got.get("result", {}).get("output") or [r["output"] for r in got["results"]]
    assert got == expect, f"{url}: {got} != {expect}"


def check_grpc(target: str, method: str, payload: bytes, stream: bool) -> bytes:
    with grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ],
    ) as channel:
        if stream:
            call = channel.stream_stream(method)
            messages = []
            pos = 0
            while pos < len(payload):
                size = int.from_bytes(payload[pos + 1 : pos + 5], "big")
                messages.append(payload[pos + 5 : pos + 5 + size])
                pos += 5 + size
            replies = list(call(iter(messages), timeout=60))
            return b"".join(replies)
        return channel.unary_unary(method)(payload, timeout=60)  # type: ignore[no-any-return]


def checked_targets(
    image: BenchImage,
    http_url: str,
    grpc_target: str,
    naive_port: int,
    bare_port: int,
    baselines: bool,
) -> list[Target]:
    """Every target for one image, each answer checked with a real client first."""
    targets = gateway_targets(image, http_url, grpc_target)
    if not baselines:
        return targets
    check_http(
        f"http://127.0.0.1:{naive_port}/", image.data, "application/octet-stream", image.shape
    )
    assert (
        check_grpc(f"127.0.0.1:{bare_port}", "/bare.Bare/Infer", image.data, False)
        == ",".join(map(str, image.shape)).encode()
    )
    return [
        (
            "naive Flask (dev server)",
            "wrk",
            f"http://127.0.0.1:{naive_port}/",
            image.data,
            "application/octet-stream",
            1,
        ),
        (
            "bare grpcio server",
            "h2load",
            f"http://127.0.0.1:{bare_port}/bare.Bare/Infer",
            grpc_frame(image.data),
            None,
            1,
        ),
        *targets,
    ]


def gateway_targets(image: BenchImage, http_url: str, grpc_target: str) -> list[Target]:
    single = pb.InferRequest(image=pb.Image(data=image.data)).SerializeToString()
    batch = pb.InferBatchRequest(images=[pb.Image(data=image.data)] * BATCH).SerializeToString()
    stream = b"".join(
        grpc_frame(pb.InferStreamRequest(image=pb.Image(data=image.data)).SerializeToString())
        for _ in range(BATCH)
    )
    multipart = multipart_body(image.data, BATCH)
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    check_http(f"{http_url}/v1/infer", image.data, "application/octet-stream", image.shape)
    check_http(f"{http_url}/v1/infer", multipart, ctype, [image.shape] * BATCH)
    reply = pb.InferResponse.FromString(check_grpc(grpc_target, f"{SERVICE}/Infer", single, False))
    assert [int(v.number_value) for v in reply.result.output.list_value.values] == image.shape
    reply_b = pb.InferBatchResponse.FromString(
        check_grpc(grpc_target, f"{SERVICE}/InferBatch", batch, False)
    )
    assert len(reply_b.results) == BATCH and all(r.HasField("output") for r in reply_b.results)
    check_grpc(grpc_target, f"{SERVICE}/InferStream", stream, True)
    http = f"{http_url}/v1/infer"
    grpc_url = f"http://{grpc_target}{SERVICE}"
    return [
        ("gateway HTTP octet-stream", "wrk", http, image.data, "application/octet-stream", 1),
        (f"gateway HTTP multipart x{BATCH}", "wrk", http, multipart, ctype, BATCH),
        ("gateway gRPC Infer", "h2load", f"{grpc_url}/Infer", grpc_frame(single), None, 1),
        (
            f"gateway gRPC InferBatch x{BATCH}",
            "h2load",
            f"{grpc_url}/InferBatch",
            grpc_frame(batch),
            None,
            BATCH,
        ),
        (
            f"gateway gRPC InferStream x{BATCH}",
            "h2load",
            f"{grpc_url}/InferStream",
            stream,
            None,
            BATCH,
        ),
    ]


# ---------------------------------------------------------------- dynamic batching


def grpc_infer(
    http_url: str, grpc_target: str, message: bytes, conc: int, seconds: float, warmup: float
) -> dict[str, float]:
    before = grpc_outcomes(http_url)
    result = run_h2load(f"http://{grpc_target}{SERVICE}/Infer", message, conc, seconds, warmup)
    count_grpc_failures(result, "Infer", 1, before, grpc_outcomes(http_url))
    return result


def single_row(
    image: BenchImage, target: str, conc: int, result: dict[str, float], run: int = 0, runs: int = 1
) -> Row:
    """A row of one image a request and no decode-limit ratio, printed as it is made."""
    row = Row(
        image.name,
        target,
        conc,
        1,
        result["rps"],
        result["rps"],
        result["p50_ms"],
        result["p99_ms"],
        None,
        int(result["errors"]),
        run,
    )
    print(table([row], runs).splitlines()[-1], flush=True)
    return row


def batching_rows(
    image: BenchImage, conc: int, seconds: float, warmup: float, run: int = 0, runs: int = 1
) -> list[Row]:
    """The batching-friendly model with dynamic batching off, then on, over both protocols."""
    rows = []
    message = grpc_frame(pb.InferRequest(image=pb.Image(data=image.data)).SerializeToString())
    # 8 / 4 ms: the 16 clients meet in two workers, so a batch holds at most about 8. With a cap
    # of 16, every batch waited out its whole window for images that could not come (see
    # docs/performance.md, "Dynamic batching").
    for label, flag in (("off", "embedding=off"), ("on, 8 / 4 ms", "embedding=8:4")):
        args = ["--model", "benchmarks.models:embedding", "--batching", flag]
        # As served: one BLAS thread per worker (--model-threads' default).
        with gateway(args) as (http_url, grpc_target, _):
            reply = pb.InferResponse.FromString(
                check_grpc(grpc_target, f"{SERVICE}/Infer", message[5:], False)
            )
            assert len(reply.result.output.list_value.values) == 4
            for name, result in (
                (
                    "HTTP octet-stream",
                    run_wrk(
                        f"{http_url}/v1/infer",
                        image.data,
                        "application/octet-stream",
                        conc,
                        seconds,
                        warmup,
                    ),
                ),
                ("gRPC Infer", grpc_infer(http_url, grpc_target, message, conc, seconds, warmup)),
            ):
                target = f"embedding model, batching {label}, {name}"
                rows.append(single_row(image, target, conc, result, run, runs))
    return rows


# ---------------------------------------------------------------- reduced JPEG decode


def reduced_rows(images: list[BenchImage], conc: int, seconds: float, warmup: float) -> list[Row]:
    """A model with a 224x224 input, declaring it (JPEGs decode reduced) and not, over HTTP."""
    rows = []
    args = ["--model", "benchmarks.models:thumbnail", "--model", "benchmarks.models:thumbnail_full"]
    with gateway(args) as (http_url, _, _):
        for image in images:
            outputs = []
            for model, label in (("thumbnail-full", "full decode"), ("thumbnail", "reduced")):
                url = f"{http_url}/v1/models/{model}/infer"
                resp = requests.post(url, data=image.data, timeout=60)
                assert resp.ok, resp.text
                outputs.append(resp.json()["result"]["output"])
                result = run_wrk(url, image.data, "application/octet-stream", conc, seconds, warmup)
                target = f"224x224-input model, {label}, HTTP octet-stream"
                rows.append(single_row(image, target, conc, result))
            # Scaling down from 1/8 or from the whole image gives nearly the same means.
            assert all(abs(a - b) < 2 for a, b in zip(*outputs, strict=True)), outputs
    return rows


# ---------------------------------------------------------------- memory during a big upload


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def upload_memory(megabytes: int) -> dict[str, float]:
    """Peak RSS of a one-process gateway while it takes a `megabytes` MB image, per protocol."""
    from benchmarks.images import noise_png

    body = noise_png(megabytes)
    out: dict[str, float] = {"body_mb": len(body) / 1e6}
    with gateway(["--workers", "1"]) as (http_url, grpc_target, proc):
        requests.post(f"{http_url}/v1/infer", data=bench_images()[0].data, timeout=60)
        idle = _status(proc.pid, "VmRSS:")
        out["idle_rss_mb"] = idle / 1e6
        for name in ("http", "grpc"):
            # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            if name == "http":
                resp = requests.post(
                    f"{http_url}/v1/infer",
                    data=body,
                    timeout=120,
                    headers={"Content-Type": "application/octet-stream"},
                )
                assert resp.ok, resp.text
            else:
                check_grpc(
                    grpc_target,
                    f"{SERVICE}/Infer",
                    pb.InferRequest(image=pb.Image(data=body)).SerializeToString(),
                    False,
                )
            out[f"{name}_peak_rss_mb"] = _status(proc.pid, "VmHWM:") / 1e6
    return out


# ---------------------------------------------------------------- the run


def machine() -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "grpcio": grpc.__version__,
    }


def code() -> dict[str, object]:
    """The commit measured, so runs can be compared across commits; `changed` when the tracked
    files differ from it (a run of uncommitted code)."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "changed": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        # A copy without git (an unpacked archive) still benchmarks.
        return {"commit": None, "changed": None}


def table(rows: list[Row], runs: int = 1) -> str:
    lines = [
        "| image | target | conc. | req/s | images/s | p50 ms | p99 ms | x limit |"
        + (" run |" if runs > 1 else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if runs > 1 else ""),
    ]

    def f(v: float | None, digits: int = 1) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for r in rows:
        errors = f" (errors: {r.errors})" if r.errors else ""
        lines.append(
            f"| {r.image} | {r.target}{errors} | "
            f"{r.concurrency or ''} | {f(r.requests_per_s, 0)} | {f(r.images_per_s, 0)} | "
            f"{f(r.p50_ms)} | {f(r.p99_ms)} | {f(r.ratio_to_limit, 2)} |"
            + (f" {r.run + 1} |" if runs > 1 else "")
        )
    return "\n".join(lines)


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per cell, each figure the median over the repetitions that measured it."""
    cells: dict[tuple[str, str, int], list[Row]] = {}
    for r in rows:
        cells.setdefault((r.image, r.target, r.concurrency), []).append(r)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return [
        Row(
            image,
            target,
            conc,
            group[0].images_per_request,
            statistics.median(r.requests_per_s for r in group),
            statistics.median(r.images_per_s for r in group),
            median([r.p50_ms for r in group]),
            median([r.p99_ms for r in group]),
            median([r.ratio_to_limit for r in group]),
            int(statistics.median(r.errors for r in group)),
        )
        for (image, target, conc), group in cells.items()
    ]


# The longest a cell is measured for, whatever its queue.
MAX_CELL_SECONDS = 30.0


def cell_seconds(duration: float, conc: int, images_per_request: int, limit: float) -> float:
    """Seconds to measure a cell: `duration`, or eight times the time the server needs to
    answer every client once at the decode limit (its queue) if that is longer. A window
    starts with about one queue's time of work that is no steady state: the first answers
    come only after the queue ahead of them, and wrk's warm-up, a process of its own, leaves
    the decodes already running when it closes its connections. 64 clients of one 4000x3000
    JPEG each reached 35 images/s over 4 s and 46 over 12 s. With eight such images a request,
    64 clients wait about 10 s for an answer, and 4 s counted only the first few answers."""
    queue = conc * images_per_request / limit
    return min(MAX_CELL_SECONDS, max(duration, 8 * queue))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--images", default="64x64 PNG,640x480 JPEG,4000x3000 JPEG")
    parser.add_argument("--gateway-args", default="", help="extra flags for image-gateway serve")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the table, the batching pairs and the upload this many times over, one "
        "repetition after another, and evaluate the goals in each",
    )
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--skip-reduced", action="store_true")
    args = parser.parse_args()
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            parser.error(f"{tool} is missing: apt-get install wrk nghttp2-client")
    if args.repeat < 1:
        parser.error("--repeat takes 1 or more")
    runs = args.repeat
    # Taken before the run: the tree may change during a half-hour run, the measured code does not.
    started, measured = time.strftime("%Y-%m-%dT%H:%M:%S%z"), code()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    wanted = set(args.images.split(","))
    images = [i for i in bench_images() if i.name in wanted]
    cpus = len(os.sched_getaffinity(0))
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        print(table([row], runs).splitlines()[-1], flush=True)

    print(table([], runs))
    naive_port, bare_port = free_port(), free_port()
    with (
        process(
            [sys.executable, str(HERE / "baselines" / "naive_flask.py"), str(naive_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as naive,
        process(
            [sys.executable, str(HERE / "baselines" / "bare_grpc.py"), str(bare_port)],
            stdout=subprocess.DEVNULL,
        ) as bare,
        gateway(args.gateway_args.split()) as (http_url, grpc_target, gateway_proc),
    ):
        wait_for_port(naive_port)
        wait_for_port(bare_port)
        servers = [naive.pid, bare.pid, gateway_proc.pid]
        checked = [
            (
                image,
                checked_targets(
                    image, http_url, grpc_target, naive_port, bare_port, not args.skip_baselines
                ),
            )
            for image in images
        ]
        for run in range(runs):
            for image, targets in checked:
                wait_idle(servers)
                limit_1 = decode_limit(image.data, 1, 3.0)
                limit_n = decode_limit(image.data, cpus, 3.0)
                plain_n = decode_limit(image.data, cpus, 3.0, tuned=False)
                for label, value in (
                    ("cv2.imdecode loop, 1 process", limit_1),
                    (f"cv2.imdecode loop, {cpus} processes (the limit)", limit_n),
                    (f"cv2.imdecode loop, {cpus} processes, glibc's default malloc", plain_n),
                ):
                    record(
                        Row(
                            image.name,
                            label,
                            0,
                            1,
                            value,
                            value,
                            None,
                            None,
                            value / limit_n,
                            0,
                            run,
                        )
                    )
                for conc in concurrencies:
                    for name, tool, url, body, ctype, per_req in targets:
                        wait_idle(servers)
                        seconds = cell_seconds(args.duration, conc, per_req, limit_n)
                        if tool == "wrk":
                            assert ctype is not None
                            result = run_wrk(url, body, ctype, conc, seconds, args.warmup)
                        elif name.startswith("gateway"):
                            before = grpc_outcomes(http_url)
                            result = run_h2load(url, body, conc, seconds, args.warmup)
                            method = url.rsplit("/", 1)[1]
                            after = grpc_outcomes(http_url)
                            count_grpc_failures(result, method, per_req, before, after)
                        else:
                            result = run_h2load(url, body, conc, seconds, args.warmup)
                        record(
                            Row(
                                image.name,
                                name,
                                conc,
                                per_req,
                                result["rps"],
                                result["rps"] * per_req,
                                result["p50_ms"],
                                result["p99_ms"],
                                result["rps"] * per_req / limit_n,
                                int(result["errors"]),
                                run,
                            )
                        )

    if not args.skip_batching:
        for run in range(runs):
            rows += batching_rows(bench_images()[0], 16, args.duration, args.warmup, run, runs)
    if not args.skip_reduced:
        jpegs = [i for i in bench_images() if i.name.endswith("JPEG")]
        rows += reduced_rows(jpegs, 8, args.duration, args.warmup)
    uploads = []
    for _ in range(runs):
        upload = upload_memory(50)
        uploads.append(upload)
        print(
            f"\n50 MB upload ({upload['body_mb']:.1f} MB noise PNG, one worker): idle RSS "
            f"{upload['idle_rss_mb']:.0f} MB, peak {upload['http_peak_rss_mb']:.0f} MB over "
            f"HTTP, {upload['grpc_peak_rss_mb']:.0f} MB over gRPC (bound: idle + 3 x 50 = "
            f"{upload['idle_rss_mb'] + 150:.0f} MB)"
        )
    report: dict[str, object] = {
        "machine": machine(),
        "code": measured,
        "started": started,
        "gateway_args": args.gateway_args,
        "duration_s": args.duration,
        "repeat": runs,
        "upload_50mb": uploads,
        "rows": [asdict(r) for r in rows],
    }
    found = goals.checks(report)
    report["goals"] = goals.as_json(found)
    if runs > 1:
        print(f"\nEach cell's median over {runs} repetitions:\n\n{table(median_rows(rows))}")
    print(f"\n{goals.table(found)}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(report, indent=1))
    print(f"\nmachine: {report['machine']}")
    print(f"code: {report['code']}, started {report['started']}")
    print(f"written: {RESULTS / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

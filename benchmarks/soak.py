"""`make soak`: a bounded soak of the gateway with valid and hostile requests, over HTTP and gRPC.

Starts `image-gateway serve` on loopback ephemeral ports, then:
1. sends every hostile case once over each protocol, timing each answer, and reads the server's
   RSS before and after;
2. runs DURATION seconds at CONCURRENCY (half HTTP, half gRPC), each worker mixing valid images
   and hostile cases, checking every answer;
3. prints requests done, wrong answers, 5xx count and the RSS before and after, and exits 1 if
   any answer was wrong, any 5xx was seen, or RSS grew by more than 64 MiB.

With `--reload-every SECONDS` it also sends the gateway SIGUSR1 that often during step 2 (a
reload, replacing every worker): no request may fail for it. Its gRPC clients then use the
retry policy README gives for calls grpc cancels as a worker retires.

Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import gateway  # noqa: E402
from clients.grpc_transport import RETRY_CONFIG  # noqa: E402
from clients.pb.imagegateway.v1 import gateway_pb2 as pb  # noqa: E402
from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc  # noqa: E402
from tests.hostile import BOUNDARY, MULTIPART_CASES, Case, MultipartCase, cases  # noqa: E402

IMAGES = ROOT / "tests" / "data" / "images"
MiB = 1024 * 1024


def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the gateway's workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def workers(pid: int) -> set[int]:
    """The gateway's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for child in descendants(pid):
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(child)
        except OSError:
            continue
    return found


def rss(pid: int) -> int:
    """Resident memory of the gateway: the supervisor and all its workers."""
    return sum(_status(p, "VmRSS:") for p in descendants(pid))


@dataclass
class Tally:
    done: int = 0
    wrong: int = 0
    server_errors: int = 0
    worst_ms: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    examples: list[str] = field(default_factory=list)

    def add(self, ok: bool, status_5xx: bool, ms: float, what: str) -> None:
        with self.lock:
            self.done += 1
            self.wrong += not ok
            self.server_errors += status_5xx
            self.worst_ms = max(self.worst_ms, ms)
            if not ok and len(self.examples) < 10:
                self.examples.append(what)


def valid_cases() -> list[Case]:
    import cv2
    import numpy as np

    out = []
    for path in sorted(IMAGES.iterdir()):
        data = path.read_bytes()
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        assert image is not None, path
        shape = list(image.shape)
        out.append(Case(f"valid {path.name}", data, None, shape))
    return out


def call_http(session: requests.Session, url: str, case: Case) -> tuple[bool, bool, str]:
    resp = session.post(
        f"{url}/v1/infer",
        data=case.data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    body = resp.json()
    if case.error is None:
        ok = resp.status_code == 200 and body["result"]["output"] == case.shape
    else:
        ok = (resp.status_code, body["error"]["code"]) == (case.error.http_status, case.error.code)
    return ok, resp.status_code >= 500, f"http {case.name}: {resp.status_code} {body}"[:300]


def call_multipart(
    session: requests.Session, url: str, case: MultipartCase
) -> tuple[bool, bool, str]:
    resp = session.post(
        f"{url}/v1/infer",
        data=case.body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=30,
    )
    code = resp.json().get("error", {}).get("code")
    ok = (resp.status_code, code) == (case.error.http_status, case.error.code)
    return ok, resp.status_code >= 500, f"multipart {case.name}: {resp.status_code} {code}"


def call_grpc(stub: pb_grpc.ImageGatewayServiceStub, case: Case) -> tuple[bool, bool, str]:
    try:
        reply = stub.Infer(pb.InferRequest(image=pb.Image(data=case.data)), timeout=30)
    except grpc.RpcError as exc:
        code = dict(exc.trailing_metadata() or ()).get("error-code", "")
        ok = case.error is not None and (exc.code().name, code) == (
            case.error.grpc_status,
            case.error.code,
        )
        server_side = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        return ok, server_side, f"grpc {case.name}: {exc.code().name} {code}"
    output = [int(v.number_value) for v in reply.result.output.list_value.values]
    return case.error is None and output == case.shape, False, f"grpc {case.name}: {output}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hostile-share", type=float, default=0.3)
    parser.add_argument(
        "--reload-every", type=float, default=0.0, help="seconds between reloads (0: none)"
    )
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.concurrency <= 256:
        parser.error("keep the soak bounded: duration <= 600 s, concurrency <= 256")
    if args.reload_every and not 5 <= args.reload_every <= args.duration:
        parser.error("--reload-every: at least 5 s, and at most --duration")

    with gateway([]) as (http_url, grpc_target, server):
        return _run(args, http_url, grpc_target, server)


def _run(
    args: argparse.Namespace, http_url: str, grpc_target: str, server: subprocess.Popen[str]
) -> int:
    options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", 64 * MiB)]
    if args.reload_every:
        options.append(("grpc.service_config", RETRY_CONFIG))
        options.append(("grpc.per_rpc_retry_buffer_size", 64 * MiB))
    channel = grpc.insecure_channel(grpc_target, options=options)
    stub = pb_grpc.ImageGatewayServiceStub(channel)
    session = requests.Session()

    valid, hostile = valid_cases(), cases()
    # Warm up (imports, first-call allocations) before the baseline is read.
    for case in valid:
        call_http(session, http_url, case)
        call_grpc(stub, case)
    rss_start = rss(server.pid)

    print(
        f"hostile suite: {len(hostile)} images x 2 protocols, "
        f"{len(MULTIPART_CASES)} multipart bodies"
    )
    suite = Tally()
    slowest: list[tuple[float, str]] = []
    for case in hostile:
        for proto in ("http", "grpc"):
            t0 = time.perf_counter()
            ok, err5, what = (
                call_http(session, http_url, case) if proto == "http" else call_grpc(stub, case)
            )
            ms = (time.perf_counter() - t0) * 1000
            suite.add(ok, err5, ms, what)
            slowest.append((ms, f"{proto} {case.name}"))
    for body in MULTIPART_CASES:
        t0 = time.perf_counter()
        ok, err5, what = call_multipart(session, http_url, body)
        ms = (time.perf_counter() - t0) * 1000
        suite.add(ok, err5, ms, what)
        slowest.append((ms, f"multipart {body.name}"))
    rss_after_suite = rss(server.pid)
    slowest.sort(reverse=True)
    print(f"  wrong answers: {suite.wrong}, 5xx: {suite.server_errors}")
    print("  slowest answers: " + ", ".join(f"{n} {ms:.1f} ms" for ms, n in slowest[:3]))
    print(
        f"  server RSS: {rss_start / MiB:.1f} MiB before, {rss_after_suite / MiB:.1f} MiB after "
        f"({(rss_after_suite - rss_start) / MiB:+.1f} MiB)"
    )
    for example in suite.examples:
        print("  WRONG:", example)

    print(f"soak: {args.duration:.0f} s at concurrency {args.concurrency} (half HTTP, half gRPC)")
    tally = Tally()
    stop_at = time.monotonic() + args.duration
    peak = [rss_after_suite]

    def worker(index: int) -> None:
        rng = random.Random(index)
        own_session = requests.Session()
        # Each gRPC client its own connection (grpc would share one between channels to the same
        # address), so that, as with HTTP, the load reaches every worker.
        own_channel = grpc.insecure_channel(
            grpc_target, options=[*options, ("grpc.use_local_subchannel_pool", 1)]
        )
        own_stub = pb_grpc.ImageGatewayServiceStub(own_channel)
        while time.monotonic() < stop_at:
            pool = hostile if rng.random() < args.hostile_share else valid
            case = rng.choice(pool)
            t0 = time.perf_counter()
            try:
                if index % 2:
                    result = call_grpc(own_stub, case)
                else:
                    result = call_http(own_session, http_url, case)
            except Exception as exc:  # a transport failure is a wrong answer, and is counted
                result = (False, False, f"{case.name}: {exc!r}"[:300])
            tally.add(*result[:2], (time.perf_counter() - t0) * 1000, result[2])
        own_channel.close()

    def sampler() -> None:
        while time.monotonic() < stop_at:
            peak[0] = max(peak[0], rss(server.pid))
            time.sleep(1)

    reloads = [0]
    first_workers = workers(server.pid)

    def reloader() -> None:
        while time.monotonic() + args.reload_every < stop_at:
            time.sleep(args.reload_every)
            server.send_signal(signal.SIGUSR1)
            reloads[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    threads.append(threading.Thread(target=sampler))
    if args.reload_every:
        threads.append(threading.Thread(target=reloader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.reload_every:
        # A reload under way at the end holds a worker more: its RSS is not growth.
        settle_by = time.monotonic() + 60
        while len(workers(server.pid)) > len(first_workers) and time.monotonic() < settle_by:
            time.sleep(0.5)
    rss_end = rss(server.pid)
    if args.reload_every:
        left = first_workers & workers(server.pid)
        print(f"  reloads asked: {reloads[0]}; first workers still there: {len(left)}")
    # Any worker replaced but by a reload crashed, hung, went silent or was stopped under load.
    replaced = replacements(session.get(f"{http_url}/metrics", timeout=10).text)
    unasked = sum(count for reason, count in replaced.items() if reason != "reload")
    print(
        "  workers replaced: "
        + (", ".join(f"{count:g} {reason}" for reason, count in replaced.items()) or "none")
    )
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    channel.close()

    growth = rss_end - rss_start
    print(f"  requests done: {tally.done} ({tally.done / args.duration:.0f}/s)")
    print(f"  wrong answers: {tally.wrong}")
    print(f"  5xx answers: {tally.server_errors}")
    print(f"  slowest answer: {tally.worst_ms:.0f} ms")
    print(
        f"  server RSS: {rss_start / MiB:.1f} MiB at start, {peak[0] / MiB:.1f} MiB peak, "
        f"{rss_end / MiB:.1f} MiB at end ({growth / MiB:+.1f} MiB)"
    )
    print(f"  server exit code after SIGTERM: {code}")
    for example in tally.examples:
        print("  WRONG:", example)
    failed = (
        tally.wrong + suite.wrong > 0
        or tally.server_errors + suite.server_errors > 0
        or growth > 64 * MiB
        or code != 0
        or unasked > 0
    )
    print("soak: FAILED" if failed else "soak: passed")
    return 1 if failed else 0


def replacements(exposition: str) -> dict[str, float]:
    """gateway_worker_replacements_total by reason (empty for a gateway of one process)."""
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "gateway_worker_replacements_total"
    }


if __name__ == "__main__":
    sys.exit(main())

"""Starting the gateway (and baselines) as a user would, for the benchmark scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready: http=(http://\S+) grpc=(\S+) ")


@contextmanager
def process(cmd: list[str], **kw: object) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, text=True, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def gateway(
    args: list[str], extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """`image-gateway serve` on free loopback ports; yields (http_url, grpc_target, process)."""
    # PYTHONPATH: benchmark models load as benchmarks.models:... from the repository root.
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    cmd = [
        str(Path(sys.executable).parent / "image-gateway"),
        "serve",
        "--http-port=0",
        "--grpc-port=0",
        "--log-level=INFO",
        *args,
    ]
    with process(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = READY.search(line)
            if match:
                break
        else:
            raise RuntimeError("the gateway did not start")
        stderr = proc.stderr
        # Keep reading its log so that the pipe never fills.
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        yield match.group(1), match.group(2), proc

"""The most memory one request can cost under the default limits, measured.

Starts `image-gateway serve` with its defaults on loopback, reads its peak RSS (VmHWM), sends one
request at the default per-request pixel budget (two 50-megapixel images, 100 megapixels in all)
in each colour mode, and prints the growth of the peak after each. Bounded: five requests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serving import gateway

MiB = 1024 * 1024


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def png(shape: tuple[int, ...], dtype: type) -> bytes:
    # Flat images compress to almost nothing: the body is small, the decoded size is not.
    ok, buf = cv2.imencode(".png", np.zeros(shape, dtype))
    assert ok
    return buf.tobytes()


def main() -> int:
    side = 7071  # 7071 x 7071 = 49,999,041 pixels, just under the 50 MP default per image
    cases = [
        # Smallest first: the peak (VmHWM) only ever grows.
        ("8-bit RGB, grayscale", png((side, side, 3), np.uint8), "grayscale"),
        ("8-bit RGB, color", png((side, side, 3), np.uint8), "color"),
        ("16-bit RGBA, unchanged", png((side, side, 4), np.uint16), "unchanged"),
    ]
    with gateway(["--workers=1"]) as (url, _, server):
        return _measure(url, server.pid, cases)


def _measure(url: str, pid: int, cases: list[tuple[str, bytes, str]]) -> int:
    small = png((64, 64, 3), np.uint8)
    requests.post(f"{url}/v1/infer", data=small, timeout=60)
    base = peak_rss(pid)
    print(f"idle peak RSS after one small request: {base / MiB:.0f} MiB")
    for name, body, mode in cases:
        files = {"0": ("a.png", body), "1": ("b.png", body)}
        resp = requests.post(
            f"{url}/v1/infer", files=files, params={"color_mode": mode}, timeout=120
        )
        after = peak_rss(pid)
        outputs = [r.get("output") for r in resp.json()["results"]]
        print(
            f"{name:24s} body {2 * len(body) / MiB:5.1f} MiB  status {resp.status_code}  "
            f"peak RSS {after / MiB:6.0f} MiB (+{(after - base) / MiB:.0f} MiB over idle)  "
            f"{outputs[0]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark images, made from the public-domain rocket photo in tests/data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "data" / "images" / "rocket.jpg"


@dataclass(frozen=True)
class BenchImage:
    name: str
    data: bytes
    shape: list[int]


def _photo(width: int, height: int) -> np.ndarray:
    photo = cv2.imdecode(np.frombuffer(SOURCE.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert photo is not None
    return cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)


def _encode(ext: str, image: np.ndarray, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, image, params)
    assert ok
    return buf.tobytes()


def bench_images() -> list[BenchImage]:
    return [
        BenchImage("64x64 PNG", _encode(".png", _photo(64, 64), []), [64, 64, 3]),
        BenchImage(
            "640x480 JPEG",
            _encode(".jpg", _photo(640, 480), [cv2.IMWRITE_JPEG_QUALITY, 90]),
            [480, 640, 3],
        ),
        BenchImage(
            "4000x3000 JPEG",
            _encode(".jpg", _photo(4000, 3000), [cv2.IMWRITE_JPEG_QUALITY, 90]),
            [3000, 4000, 3],
        ),
    ]


def noise_png(megabytes: int) -> bytes:
    """A PNG of random pixels, which do not compress: about `megabytes` MB on the wire."""
    side = int((megabytes * 1_000_000 / 3) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return _encode(".png", noise, [cv2.IMWRITE_PNG_COMPRESSION, 1])

"""QR codes found by OpenCV's detector and decoder: text and corner points of each code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from gateway.models.base import JSONValue


class QRCodeModel:
    name = "qrcode"
    description = (
        "Every QR code found: its decoded text and its four corner points [[x, y], ...] "
        "(top-left, top-right, bottom-right, bottom-left); an empty list when there is none."
    )

    def predict(self, images: Sequence[np.ndarray], params: Mapping[str, Any]) -> list[JSONValue]:
        return [self._detect(image) for image in images]

    @staticmethod
    def _detect(image: np.ndarray) -> JSONValue:
        image = _as_8bit_gray_or_bgr(image)
        # A detector per call: cv2.QRCodeDetector keeps state and is not safe to share across
        # the server's threads, and making one costs microseconds next to detection.
        detector = cv2.QRCodeDetector()
        found, texts, points, _ = detector.detectAndDecodeMulti(image)
        if not found or points is None:
            return []
        codes: list[JSONValue] = []
        for text, corners in zip(texts, points, strict=True):
            codes.append(
                {
                    "text": text,
                    "points": [[round(float(x), 1), round(float(y), 1)] for x, y in corners],
                }
            )
        return codes


def _as_8bit_gray_or_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        # 16-bit and float images (color_mode=unchanged) stretched to 0..255, in one pass into
        # the 8-bit result: in float64 steps, copies the pixel budget does not count, a 16-bit
        # RGBA image took 4.5 times its own size more.
        stretched = np.empty(image.shape, np.uint8)
        cv2.normalize(image, stretched, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_8U)
        image = stretched
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def create() -> QRCodeModel:
    return QRCodeModel()

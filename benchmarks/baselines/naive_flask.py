"""The naive baseline: the few lines a plain Flask server needs, on Flask's development server."""

import sys

import cv2
import numpy as np
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/")
def infer():  # type: ignore[no-untyped-def]
    img = cv2.imdecode(np.frombuffer(request.data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return jsonify(img.shape)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)

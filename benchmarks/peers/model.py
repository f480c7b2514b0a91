"""The same decode as the gateway's `shape` model, as an MLServer custom runtime (V2 protocol).

Tuned as MLServer's users would: the decode runs off the event loop (asyncio.to_thread), and
the server runs without parallel workers (settings.json), which is faster for work this small.
REST requests carry the image base64-encoded (content_type "base64"); gRPC requests carry it as
raw bytes.
"""

import asyncio
import base64

import cv2
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


# MLServer is installed in the peers' own environment, not where the type checker runs.
class DecodeModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = payload.inputs[0]
        data = getattr(request_input.data, "root", request_input.data)
        params = request_input.parameters
        if params is not None and params.content_type == "base64":
            images = [base64.b64decode(item) for item in data]
        else:
            images = [bytes(item) if not isinstance(item, bytes) else item for item in data]

        def shapes() -> np.ndarray:
            out = []
            for b in images:
                image = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    raise ValueError("undecodable image")
                out.append(image.shape)
            return np.array(out, dtype=np.int64)

        output = NumpyCodec.encode_output("shape", await asyncio.to_thread(shapes))
        return InferenceResponse(model_name=self.name, outputs=[output])

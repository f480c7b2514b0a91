"""Writes a pre-framed V2 ModelInferRequest for one image (run with MLServer's own Python)."""

import sys
from pathlib import Path

from mlserver.grpc import dataplane_pb2 as pb

image = Path(sys.argv[1]).read_bytes()
request = pb.ModelInferRequest(
    model_name="decode",
    inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
    # V2 raw BYTES: each element prefixed by its length, 4 bytes little-endian.
    raw_input_contents=[len(image).to_bytes(4, "little") + image],
)
message = request.SerializeToString()
Path(sys.argv[2]).write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)

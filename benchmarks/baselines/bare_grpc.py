"""The gRPC baseline: a bare grpcio server with one generic unary handler doing the same decode.

It takes the raw encoded image as the request message and answers "h,w,c"; no protobuf, no
validation. Method path: /bare.Bare/Infer.
"""

import sys
from concurrent import futures

import cv2
import grpc
import numpy as np


def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
    img = cv2.imdecode(np.frombuffer(request, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return ",".join(map(str, img.shape)).encode()


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    handler = grpc.method_handlers_generic_handler(
        "bare.Bare", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

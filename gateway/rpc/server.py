"""Builds the gRPC server: grpc's examples' shape, a builder returning (server, port)."""

from __future__ import annotations

from concurrent import futures

import grpc

from clients.pb.imagegateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.config import Settings
from gateway.core.dataplane import DataPlane
from gateway.rpc.servicer import ImageGatewayServicer


def build_grpc_server(
    settings: Settings, dataplane: DataPlane, reuse_port: bool = False
) -> tuple[grpc.Server, int]:
    """Bind (port 0 picks a free port) and return the server, not yet started, and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_threads, thread_name_prefix="grpc-worker"
        ),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            # Workers share the port on purpose; a single process refuses a port already taken.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    servicer = ImageGatewayServicer(dataplane)
    pb_grpc.add_ImageGatewayServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    return server, port

"""Builds the gRPC server: grpc's examples' shape, a builder returning (server, port)."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.pb.imagegateway.v1 import gateway_pb2 as pb
from gateway.config import Settings, url_host
from gateway.core.dataplane import DataPlane
from gateway.rpc import wire
from gateway.rpc.servicer import ImageGatewayServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGatewayService"].full_name


def _add_servicer(servicer: ImageGatewayServicer, server: grpc.Server) -> None:
    """The generated add_ImageGatewayServiceServicer_to_server, except that the three infer
    methods take their requests through gateway.rpc.wire, which leaves the image bytes where
    gRPC received them instead of copying them twice."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer,
            request_deserializer=wire.detach(pb.InferRequest, "image"),
            response_serializer=pb.InferResponse.SerializeToString,
        ),
        "InferBatch": grpc.unary_unary_rpc_method_handler(
            servicer.InferBatch,
            request_deserializer=wire.detach(pb.InferBatchRequest, "images"),
            response_serializer=pb.InferBatchResponse.SerializeToString,
        ),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            servicer.InferStream,
            request_deserializer=wire.detach(pb.InferStreamRequest, "image"),
            response_serializer=pb.InferStreamResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            servicer.GetModel,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.GetModelResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_grpc_server(
    settings: Settings, dataplane: DataPlane, reuse_port: bool = False
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Bind (port 0 picks a free port); return the server (not yet started), its port, and its
    health service, which reports SERVING for the whole server ("") and for our service."""
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.grpc_threads + settings.max_streams,
            thread_name_prefix="grpc-worker",
        ),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            # Workers share the port on purpose; a single process refuses a port already taken.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    _add_servicer(ImageGatewayServicer(dataplane, settings.max_streams), server)
    # Health checks are answered from the calling thread, never queued behind inference.
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{url_host(settings.host)}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    return server, port, health_servicer

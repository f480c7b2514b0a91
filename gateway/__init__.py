"""Image inference gateway: one decoder core behind a gRPC servicer and an HTTP front."""

import os

__version__ = "0.1.0"

# grpc logs every failed TLS handshake (a plaintext client, a load balancer's TCP check) as a
# line of its own at INFO, and reads its verbosity once, when first imported: here, before any
# module of the gateway imports it. GRPC_VERBOSITY=INFO shows them again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

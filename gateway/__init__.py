"""Image inference gateway: one decoder core behind a gRPC servicer and an HTTP front."""

__version__ = "0.1.0"

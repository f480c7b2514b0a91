"""The production WSGI server (cheroot, CherryPy's thread-pool server) for the Flask app."""

from __future__ import annotations

from cheroot import wsgi
from flask import Flask


def build_http_server(app: Flask, host: str, port: int, threads: int) -> tuple[wsgi.Server, int]:
    """Bind (port 0 picks a free port) and return the server, not yet serving, and its port."""
    server = wsgi.Server(
        (host, port),
        app,
        numthreads=threads,
        server_name="image-gateway",
        request_queue_size=128,
        # Seconds a connection may sit idle or trickle its request before it is dropped.
        timeout=30,
        shutdown_timeout=10,
    )
    server.prepare()
    return server, int(server.bind_addr[1])

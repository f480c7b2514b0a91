"""The framework-free core: request types, the error table, the decoder and the data plane.

Nothing under gateway.core imports flask, werkzeug or grpc; tests/test_layering.py enforces it.
"""

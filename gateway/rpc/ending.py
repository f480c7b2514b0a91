"""Ending a gRPC call from outside its handler, the way grpcio's own aborts end one.

grpcio lets a handler end only its own call, from its own thread, by raising out of it. A call
with no handler yet (its message not read, gateway.rpc.pool) or whose handler waits for its
client's next message (a stream when the gateway drains, gateway.rpc.servicer) cannot be ended
so. This sends the status through grpc._server's private call state; tests/test_faults.py checks
it against the installed grpcio.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import _common as grpc_common  # private: see the module's docstring
from grpc import _server as grpc_server

from gateway.core.errors import ErrorCode

Metadata = tuple[tuple[str, str], ...]


def end_call(call: Any, state: Any, error: ErrorCode, message: str, trailing: Metadata) -> None:
    """End the call with `error`'s status, `message` and the `trailing` metadata; the caller
    holds state.condition and knows the call open. A thread waiting for the call's message (or
    its next one) then finds it cancelled, and grpcio sends no second status."""
    state.trailing_metadata = trailing
    grpc_server._abort(state, call, _status(error), message.encode())
    state.client = grpc_server._CANCELLED
    state.condition.notify_all()


def end_served(
    context: grpc.ServicerContext, error: ErrorCode, message: str, trailing: Metadata
) -> bool:
    """End a call whose handler runs on another thread, as `end_call` does; False if the call
    had ended already."""
    state = context._state  # grpc._server._Context's
    with state.condition:
        if state.client is grpc_server._CANCELLED or state.statused:
            return False
        end_call(context._rpc_event.call, state, error, message, trailing)
    return True


def _status(error: ErrorCode) -> Any:
    # The table names the status; grpcio's own mapping gives its core's code for it.
    return grpc_common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[grpc.StatusCode[error.grpc_status]]

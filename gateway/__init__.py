"""Image inference gateway: one decoder core behind a gRPC servicer and an HTTP front."""

import os
import signal
import threading

__version__ = "0.1.0"

# grpc logs every failed TLS handshake (a plaintext client, a load balancer's TCP check) as a
# line of its own at INFO, and reads its verbosity once, when first imported: here, before any
# module of the gateway imports it. GRPC_VERBOSITY=INFO shows them again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The reload signal (SIGUSR1, see gateway.workers) ends a process that has not set it aside, and
# a gateway spends its first half second or so importing its servers before the supervisor takes
# it: one sent then (`systemctl reload` right after `systemctl start`) ended the gateway. It is
# ignored from here until the supervisor, a worker or a single process sets its own handling; no
# worker has loaded a model before that, so there is nothing to reload yet.
if (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
):
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

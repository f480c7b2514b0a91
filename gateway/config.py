"""One typed settings object, from command-line flags and IMAGE_GATEWAY_* environment variables.

A flag wins over its variable; the variable wins over the default. The variable for --http-port is
IMAGE_GATEWAY_HTTP_PORT, and so on for every flag. --model repeats; its variable takes a comma list.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gateway.core.batch_policy import BatchPolicy
from gateway.core.limits import Limits, PublishedLimits
from gateway.core.tokens import read_tokens
from gateway.tls import TlsFiles, load

ENV_PREFIX = "IMAGE_GATEWAY_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything configurable; one instance per process, immutable."""

    host: str = "127.0.0.1"
    http_port: int = 5000
    grpc_port: int = 50051
    model: tuple[str, ...] = ("shape",)
    # Dynamic batching per model: "NAME=MAX_BATCH:MAX_WAIT_MS" or "NAME=off"; models not named
    # use their own max_batch_size / max_batch_wait_ms attributes, if any.
    batching: tuple[str, ...] = ()
    # Browser origins allowed to call the HTTP API (CORS), such as "https://app.example.com";
    # none by default.
    cors_origin: tuple[str, ...] = ()
    # Processes serving both protocols on the same ports (SO_REUSEPORT); 0 means one per CPU the
    # gateway may use.
    workers: int = 0
    # Seconds a worker of several has to load its models and serve, at start, in a dead one's
    # place and in a reload; a model whose factory loads large weights may need more than this.
    start_timeout: float = 60.0
    # One cap for both fronts: an HTTP body, and a gRPC request message (answers are not
    # capped, on either front). gRPC's own default is 4 MiB, too small for a phone photo.
    max_request_bytes: int = 64 * MiB
    # One encoded image (a multipart file part, one gRPC Image); never more than the above.
    max_image_bytes: int = 64 * MiB
    max_images: int = 64
    max_parts: int = 128
    max_image_pixels: int = 50_000_000
    max_request_pixels: int = 100_000_000
    request_timeout: float = 30.0
    # Per worker: full-size requests decoding and running the model at once (the pixel budget;
    # decoding is CPU-bound, so about 2 per worker is plenty), and requests allowed to wait for
    # room before the answer is 503.
    max_concurrency: int = 2
    max_queue: int = 32
    http_threads: int = 8
    grpc_threads: int = 8
    # Unary gRPC calls a worker takes at once, from the start of their message to their
    # answer: their messages are read without a thread, so slow uploads hold none.
    grpc_calls: int = 8
    # grpcio's threaded server holds a thread for each open stream, for as long as it is open;
    # streams get threads of their own, so open streams never take those of unary calls.
    max_streams: int = 8
    # Seconds between the pings a worker sends on a gRPC connection with calls open: a client
    # that has gone without closing its connection (a host that died, a network cut) is found
    # out when one goes unanswered, and its calls end, its streams giving their slots back.
    grpc_keepalive: float = 60.0
    # Threads of each native math library (BLAS, OpenMP) a model uses, per worker; 0 leaves the
    # libraries' own defaults (see gateway/model_threads.py).
    model_threads: int = 1
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    # One JSON line per request on the gateway.access logger ("on" or "off").
    access_log: str = "on"
    # gRPC over TLS: PEM files, "" for plaintext. HTTP stays plaintext (see README, "TLS").
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""
    # Bearer tokens the API takes, one a line; "" takes every call (see README, "Tokens").
    auth_token_file: str = ""

    @property
    def grpc_tls(self) -> TlsFiles | None:
        if not self.grpc_tls_cert:
            return None
        return TlsFiles(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_client_ca)


_HELP = {
    "host": "address both servers bind to",
    "http_port": "HTTP port; 0 picks a free port and prints it",
    "grpc_port": "gRPC port; 0 picks a free port and prints it",
    "model": "model to serve: a built-in (shape, qrcode) or package.module:factory; repeatable, "
    "the first is the default",
    "batching": "dynamic batching for a model, NAME=MAX_BATCH:MAX_WAIT_MS or NAME=off; repeatable",
    "cors_origin": "a browser origin allowed to call the HTTP API (CORS), compared as written; "
    "repeatable, '*' for any",
    "workers": "processes serving both protocols; 0 means one per CPU the gateway may use (its "
    "CPU affinity, within a container's CPU quota)",
    "start_timeout": "seconds a worker of several has to load its models and serve (at start, "
    "in a dead worker's place, in a reload) before the gateway gives up on it",
    "max_request_bytes": "largest HTTP body or gRPC message accepted, in bytes",
    "max_image_bytes": "largest single encoded image accepted, in bytes (a batch may hold "
    "several up to --max-request-bytes in all)",
    "max_images": "most images in one request",
    "max_parts": "most parts (files and text fields) in one multipart body",
    "max_image_pixels": "most pixels in one image, read from its header before decoding",
    "max_request_pixels": "most pixels of all images of one request together",
    "request_timeout": "seconds one request may take, body upload and queueing included",
    "max_concurrency": (
        "full-size requests decoding and running the model at once, per worker: the pixel "
        "budget is this x --max-request-pixels, shared by smaller requests"
    ),
    "max_queue": "requests waiting for a slot before new ones get 503 / UNAVAILABLE, per worker",
    "http_threads": "HTTP threads per worker",
    "grpc_threads": "gRPC threads per worker running unary calls",
    "grpc_calls": "unary gRPC calls per worker taken at once, from their message's first byte "
    "to their answer (at least --grpc-threads); each may hold --max-request-bytes",
    "max_streams": "InferStream and reflection streams open at once per worker, a thread each",
    "grpc_keepalive": "seconds between pings on a gRPC connection with calls open; a client "
    "that answers none within 20 s (at most this) is taken as gone and its calls end",
    "model_threads": "threads of each native math library (OpenBLAS, MKL, OpenMP) and of "
    "OpenCV's own pool a model uses, per worker; 0 leaves the libraries' defaults; ignored "
    "when OMP_NUM_THREADS or another library's thread variable is set",
    "shutdown_grace": "seconds in-flight requests get to finish on SIGINT, SIGTERM or SIGHUP, "
    "and those of a worker replaced in a reload",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "access_log": "on or off: one JSON line per request on stderr",
    "grpc_tls_cert": "PEM certificate chain: gRPC is served over TLS (needs --grpc-tls-key); "
    "read again when the file changes",
    "grpc_tls_key": "PEM private key of --grpc-tls-cert",
    "grpc_tls_client_ca": "PEM CA certificates: gRPC clients must present a certificate signed "
    "by one of them (mutual TLS)",
    "auth_token_file": "file of bearer tokens, one a line: API calls on both protocols must "
    "carry one (probes and metrics need none); read again when it changes",
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _ascii_int(text: str) -> int:
    # int() also takes "\u0663" (Arabic-Indic three), "1_000" and "+2"; configuration takes
    # plain ASCII digits only.
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _non_negative_int(text: str) -> int:
    value = _ascii_int(text)
    if value > _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is over {_MAX_COUNT}")
    return value


def _port(text: str) -> int:
    value = _ascii_int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return value


# Counts and sizes reach grpc and protobuf as 32-bit ints: a larger one was a traceback at
# start (or, for a timeout, at shutdown) that named no setting.
_MAX_COUNT = 2**31 - 1
_MAX_SECONDS = 86_400.0


def _positive_float(text: str) -> float:
    # float() also takes "1e300", "inf" and "\u0663"; seconds are plain decimals.
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (such as 2.5)")
    value = float(text)
    if not 0 < value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds above 0 and at most {_MAX_SECONDS:g}"
        )
    return value


# Threads and processes are made at start-up, one by one: 2^31 - 1 of them spent minutes before
# failing. A thousand a worker is past any use on one machine.
_MAX_SMALL_COUNT = 1024


def _small_count(text: str) -> int:
    value = _ascii_int(text)
    if not 1 <= value <= _MAX_SMALL_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 and {_MAX_SMALL_COUNT}")
    return value


def _small_count_or_zero(text: str) -> int:
    value = _ascii_int(text)
    if value > _MAX_SMALL_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is over {_MAX_SMALL_COUNT}")
    return value


def _at_least_one(text: str) -> int:
    value = _ascii_int(text)
    if not 1 <= value <= _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 and {_MAX_COUNT}")
    return value


# Any model name (spaces and "=" included) before the last "=".
_BATCHING = re.compile(r"(.+)=(?:off|([0-9]{1,4}):([0-9]{1,5}(?:\.[0-9]+)?))\Z")


def _batching(text: str) -> str:
    match = _BATCHING.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=MAX_BATCH:MAX_WAIT_MS (such as embed=16:5) or NAME=off"
        )
    return text.strip()


def core_limits(settings: Settings) -> Limits:
    """The limits the core enforces, from the settings."""
    return Limits(
        max_images=settings.max_images,
        max_image_bytes=min(settings.max_image_bytes, settings.max_request_bytes),
        max_image_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        request_timeout=settings.request_timeout,
    )


def published_limits(settings: Settings) -> PublishedLimits:
    """What both fronts tell clients: the limits in force, each as it is enforced."""
    return PublishedLimits(
        max_request_bytes=settings.max_request_bytes,
        max_image_bytes=core_limits(settings).max_image_bytes,
        max_images=settings.max_images,
        max_parts=settings.max_parts,
        max_image_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        request_timeout_seconds=settings.request_timeout,
    )


def batch_policies(settings: Settings) -> dict[str, BatchPolicy | None]:
    policies: dict[str, BatchPolicy | None] = {}
    for entry in settings.batching:
        match = _BATCHING.match(entry)
        assert match, entry  # validated when parsed
        name, size, wait_ms = match.groups()
        # A batch of at most one image is no batching, as a model's own max_batch_size of 0 or 1
        # is: a batcher would only make every call of the model wait for its single thread.
        off = size is None or int(size) <= 1
        policies[name] = None if off else BatchPolicy(int(size), float(wait_ms) / 1000)
    return policies


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    if text.strip().upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_LOG_LEVELS)}")
    return text.strip().upper()


def _host(text: str) -> str:
    # An empty host is every address to Python's bind (HTTP would listen on all interfaces) and
    # an error to grpc's.
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty host is not an address (0.0.0.0 is every one)")
    return text.strip()


def _file(text: str) -> str:
    # An empty path is no file: given as "$TOKENS" with the variable unset, it had served every
    # call without a token (or gRPC in plaintext), with no word of it.
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


def _cors_origin(text: str) -> str:
    # Origins are compared as written; a wildcard inside one matched nothing it was meant to.
    origin = text.strip()
    if not origin or ("*" in origin and origin != "*"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an origin such as https://app.example.com (or * for any): "
            "origins are compared as written, without wildcards"
        )
    return origin


def _on_off(text: str) -> str:
    if text.strip().lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off")
    return text.strip().lower()


_TYPES: dict[str, Any] = {
    "host": _host,
    "access_log": _on_off,
    "log_level": _log_level,
    "batching": _batching,
    "cors_origin": _cors_origin,
    "http_port": _port,
    "grpc_port": _port,
    "workers": _small_count_or_zero,
    "start_timeout": _positive_float,
    "max_request_bytes": _at_least_one,
    "max_image_bytes": _at_least_one,
    "max_images": _at_least_one,
    "max_parts": _at_least_one,
    "max_image_pixels": _at_least_one,
    "max_request_pixels": _at_least_one,
    "request_timeout": _positive_float,
    "max_concurrency": _at_least_one,
    "max_queue": _non_negative_int,
    "http_threads": _small_count,
    "grpc_threads": _small_count,
    "grpc_calls": _small_count,
    "max_streams": _small_count,
    "grpc_keepalive": _positive_float,
    "model_threads": _small_count_or_zero,
    "shutdown_grace": _positive_float,
    "grpc_tls_cert": _file,
    "grpc_tls_key": _file,
    "grpc_tls_client_ca": _file,
    "auth_token_file": _file,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP[f.name]} (env {env_name(f.name)}, default {f.default!r})"
        if isinstance(f.default, tuple):
            parser.add_argument(
                flag,
                action="append",
                type=_TYPES.get(f.name, str),
                metavar=f.name.upper(),
                help=help_text,
            )
        else:
            parser.add_argument(flag, type=_TYPES.get(f.name, str), help=help_text)


def from_namespace(
    args: argparse.Namespace, environ: Mapping[str, str], parser: argparse.ArgumentParser
) -> Settings:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        given = getattr(args, f.name, None)
        if given is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            try:
                if isinstance(f.default, tuple):
                    convert = _TYPES.get(f.name, str)
                    given = [convert(m.strip()) for m in raw.split(",") if m.strip()]
                else:
                    given = _TYPES.get(f.name, str)(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env_name(f.name)}={raw!r}: {exc}")
        if given is not None:
            values[f.name] = tuple(given) if isinstance(f.default, tuple) else given
    settings = Settings(**values)
    _check_tls(settings, parser)
    if settings.auth_token_file:
        try:
            read_tokens(settings.auth_token_file)
        except ValueError as exc:
            parser.error(str(exc))
    if settings.http_port == settings.grpc_port != 0:
        # With several workers both servers joined one SO_REUSEPORT group, and the kernel gave
        # gRPC's connections to the HTTP server as often as not.
        parser.error(
            f"--http-port and --grpc-port ({env_name('http_port')}, {env_name('grpc_port')}) "
            f"are both {settings.http_port}: "
            "HTTP and gRPC need ports of their own"
        )
    return settings


def _check_tls(settings: Settings, parser: argparse.ArgumentParser) -> None:
    """A TLS setting that cannot work is a start-up error, not a handshake failure for every
    client; the files are read again by each worker."""
    if bool(settings.grpc_tls_cert) != bool(settings.grpc_tls_key):
        parser.error("--grpc-tls-cert and --grpc-tls-key go together")
    if settings.grpc_tls_client_ca and not settings.grpc_tls_cert:
        parser.error("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    files = settings.grpc_tls
    if files is not None:
        try:
            load(files)
        except ValueError as exc:
            parser.error(str(exc))


# IMAGE_GATEWAY_* variables that are the client's (clients/), not settings of the gateway.
_CLIENT_VARIABLES = frozenset({ENV_PREFIX + "URL", ENV_PREFIX + "TOKEN"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each IMAGE_GATEWAY_* variable that is no setting: a misspelt one
    (IMAGE_GATEWAY_MAX_IMAGE for ..._MAX_IMAGES) had been ignored without a word, the gateway
    serving with the default the user meant to change."""
    known = {env_name(f.name) for f in fields(Settings)}
    lines = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in _CLIENT_VARIABLES:
            continue
        # Matched without the prefix, which every name shares.
        suffixes = sorted(k.removeprefix(ENV_PREFIX) for k in known)
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        lines.append(f"{name} is set, but is no setting of the gateway; ignored{hint}")
    return lines


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="image-gateway serve")
    add_arguments(parser)
    return from_namespace(
        parser.parse_args(argv), os.environ if environ is None else environ, parser
    )


def url_host(host: str) -> str:
    """The host as it goes in a URL or a gRPC target: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def worker_count(settings: Settings) -> int:
    """The number of worker processes: as configured, or one per CPU this process may use: its
    CPU affinity, and a container's CPU quota (cgroup cpu.max), rounded up. On the machine's
    count of cores alone, a container limited to 2 CPUs on a 64-core host started 64 workers,
    a copy of the models each, to share 2 CPUs of time."""
    if settings.workers:
        return settings.workers
    from loky import cpu_count  # only here: its import takes a twentieth of a second

    return int(cpu_count())

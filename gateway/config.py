"""One typed settings object, from command-line flags and IMAGE_GATEWAY_* environment variables.

A flag wins over its variable; the variable wins over the default. The variable for --http-port is
IMAGE_GATEWAY_HTTP_PORT, and so on for every flag. --model repeats; its variable takes a comma list.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "IMAGE_GATEWAY_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    http_port: int = 5000
    grpc_port: int = 50051
    model: tuple[str, ...] = ("shape",)
    # One cap for both fronts: an HTTP body, and a gRPC message in either direction. gRPC's own
    # default is 4 MiB, too small for a single phone photo.
    max_request_bytes: int = 64 * MiB
    http_threads: int = 8
    grpc_threads: int = 8
    shutdown_grace: float = 10.0
    log_level: str = "INFO"


_HELP = {
    "host": "address both servers bind to",
    "http_port": "HTTP port; 0 picks a free port and prints it",
    "grpc_port": "gRPC port; 0 picks a free port and prints it",
    "model": "model to serve: a built-in (shape, qrcode) or package.module:factory; repeatable, "
    "the first is the default",
    "max_request_bytes": "largest HTTP body or gRPC message accepted, in bytes",
    "http_threads": "HTTP worker threads",
    "grpc_threads": "gRPC worker threads",
    "shutdown_grace": "seconds in-flight requests get to finish on SIGINT/SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return value


_TYPES: dict[str, Any] = {
    "http_port": _port,
    "grpc_port": _port,
    "max_request_bytes": _positive_int,
    "http_threads": _positive_int,
    "grpc_threads": _positive_int,
    "shutdown_grace": float,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP[f.name]} (env {env_name(f.name)}, default {f.default!r})"
        if f.name == "model":
            parser.add_argument(flag, action="append", metavar="NAME", help=help_text)
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
                if f.name == "model":
                    given = [m.strip() for m in raw.split(",") if m.strip()]
                else:
                    given = _TYPES.get(f.name, str)(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env_name(f.name)}={raw!r}: {exc}")
        if given is not None:
            values[f.name] = tuple(given) if f.name == "model" else given
    return Settings(**values)


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="image-gateway serve")
    add_arguments(parser)
    return from_namespace(
        parser.parse_args(argv), os.environ if environ is None else environ, parser
    )

"""image-gateway-client: call a gateway from the shell; prints JSON, the same for both protocols.

image-gateway-client infer A.jpg [B.png ...] --url grpc://127.0.0.1:50051 [--model NAME]
image-gateway-client infer A.jpg --param threshold=0.5 --param top_k=3
curl -s https://example.org/cat.jpg | image-gateway-client infer -
image-gateway-client infer A.jpg --url grpcs://gw.internal:50051 --ca-cert ca.pem
image-gateway-client models --url http://127.0.0.1:5000
image-gateway-client limits --url http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import BinaryIO

from clients.client import COLOR_MODES, MAX_TIMEOUT, GatewayClient
from clients.results import GatewayClientError

DEFAULT_URL = os.environ.get("IMAGE_GATEWAY_URL", "http://127.0.0.1:5000")


def _emit(text: str) -> None:
    """Print to stdout. A reader that stops early (`| head`) is no error of ours; any other
    failure to write (a full disk) raises OSError."""
    if sys.stdout is None:
        # Started with stdout closed (`>&-`): print() would write nowhere, and the command
        # exited 0 with its results lost.
        raise OSError(errno.EBADF, "stdout is closed; the results were not printed")
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's own advice (signal module docs): point stdout at devnull, or the flush at
        # exit fails again and prints a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _first_token(path: str) -> str:
    """The first token of a file written as a gateway's --auth-token-file is (one a line, blank
    lines and lines from "#" left out): the gateway's own file works, comments and all."""
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                token = line.strip()
                if token and not token.startswith("#"):
                    return token
    except UnicodeDecodeError as exc:
        # Its own words name neither the file nor the option.
        raise ValueError(
            f"--token-file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    raise ValueError(f"{path} holds no token")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds over 0 and at most {MAX_TIMEOUT:g}"
        )
    return value


def _param(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (such as threshold=0.5)")
    return name, value


def _params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            # As the gateway refuses a name given twice over HTTP: which one would it take?
            raise ValueError(f"--param {name} is given twice")
        params[name] = value
    return params


# The file name that stands for the image on standard input, as for cat or curl.
STDIN = "-"


def _images(files: list[str]) -> list[str | BinaryIO]:
    """What to send for each FILE: its path, or for "-" standard input (once: a second "-"
    would be empty). Both are read when the call goes, and a stream no further than the
    gateway's max_image_bytes allows."""
    if files.count(STDIN) > 1:
        raise ValueError("standard input (-) can be read once only")
    if STDIN not in files:
        return list(files)
    if sys.stdin is None:
        raise ValueError("- reads an image from standard input, which is closed here")
    if sys.stdin.isatty():
        # A terminal would wait for an image typed in, which nobody means.
        raise ValueError("- reads an image from standard input, which is a terminal here")
    stdin = sys.stdin.buffer
    return [stdin if f == STDIN else f for f in files]


def main(argv: Sequence[str] | None = None) -> int:
    # grpc writes lines of its own to stderr (a failed TLS handshake at INFO) unless told not
    # to before it is imported; the CLI's stderr is its one JSON error.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = argparse.ArgumentParser(prog="image-gateway-client")
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="grpc://host:port, grpcs://host:port (TLS), http://host:port or https://... "
        "(env IMAGE_GATEWAY_URL, default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds per call (default %(default)s)",
    )
    tls_flags = {
        "--ca-cert": "PEM CA certificates the gateway's must be signed by, over grpcs:// or "
        "https:// (default: the system's)",
        "--client-cert": "PEM certificate of this client, for a gateway that asks for one",
        "--client-key": "PEM private key of --client-cert",
    }
    for flag, text in tls_flags.items():
        parser.add_argument(flag, metavar="FILE", help=text)
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token to send (default: $IMAGE_GATEWAY_TOKEN, if set)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser("infer", help="run a model on image files, one result each")
    infer.add_argument(
        "files", nargs="+", metavar="FILE", help="image files (- for standard input)"
    )
    infer.add_argument(
        "--model", default="", metavar="NAME", help="model name (default: the gateway's default)"
    )
    infer.add_argument(
        "--color-mode",
        choices=COLOR_MODES,
        default="color",
        metavar="MODE",
        help=f"how the gateway decodes: {', '.join(COLOR_MODES)} (default %(default)s)",
    )
    infer.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="a parameter for the model, sent as text (repeat for more)",
    )
    commands.add_parser("models", help="list the gateway's models")
    commands.add_parser("limits", help="print the gateway's limits")
    # Let --url come after the subcommand too, as users tend to type it.
    for sub in (infer, commands.choices["models"], commands.choices["limits"]):
        sub.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument(
            "--timeout", type=_seconds, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        for flag in [*tls_flags, "--token-file"]:
            sub.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        token = os.environ.get("IMAGE_GATEWAY_TOKEN") or None
        if args.token_file is not None:
            token = _first_token(args.token_file)
        # One call at a time: one gRPC connection is all the CLI uses.
        with GatewayClient(
            args.url,
            timeout=args.timeout,
            channels=1,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            token=token,
        ) as client:
            if args.command == "models":
                # As GET /v1/models gives them (its "models"), whichever the protocol.
                _emit(json.dumps([m.to_dict() for m in client.list_models()], indent=2))
                return 0
            if args.command == "limits":
                _emit(json.dumps(asdict(client.limits()), indent=2))
                return 0
            results = client.infer_batch(
                _images(args.files),
                model=args.model,
                color_mode=args.color_mode,
                params=_params(args.param),
            )
        rows = [{"file": path, **r.to_dict()} for path, r in zip(args.files, results, strict=True)]
        _emit(json.dumps(rows, indent=2))
    except GatewayClientError as exc:
        # As the gateway's own error body: the request id finds the call in its log.
        error = {"code": exc.code, "message": exc.message}
        if exc.request_id:
            error["request_id"] = exc.request_id
        print(json.dumps({"error": error}), file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a file it cannot read, a URL it cannot use, stdout
        print(f"image-gateway-client: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        # Images are read within the gateway's limits, but a batch of large ones may still not
        # fit this machine: a line of text, not a traceback.
        print("image-gateway-client: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # as a shell reports SIGINT, without Python's traceback
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Bearer tokens: who may call the API, checked alike over both protocols.

The tokens are lines of a file (--auth-token-file), read again when it changes, so that a token
is added, then the old one removed, without a restart. Clients send `Authorization: Bearer
TOKEN`, as an HTTP header or as gRPC metadata.
"""

from __future__ import annotations

import hmac
import logging
import re

from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.watch import WatchedFiles

log = logging.getLogger(__name__)

# RFC 6750's token68, which a header carries as it is; a guessable token is no protection.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_LENGTH = 16
_BEARER = re.compile(r"bearer +(\S+) *", re.IGNORECASE)  # the scheme's name is any case


def read_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of the file at `path`, one a line (blank lines and lines from "#" left out);
    ValueError naming the fault otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"--auth-token-file: {reason}: {path}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token) or len(token) < MIN_TOKEN_LENGTH:
            # The token itself stays out of the message: it may be a secret with a typo.
            raise ValueError(
                f"--auth-token-file: line {number} of {path} is no token: a token is at least "
                f"{MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / (then any '=')"
            )
        tokens.append(token.encode())
    if not tokens:
        raise ValueError(f"--auth-token-file: {path} holds no token")
    return tuple(tokens)


class Tokens:
    """The tokens in force, from a file looked at again at most once a second: a stat per
    request would be a system call on every request of the fastest path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._watched = WatchedFiles((path,), lambda: read_tokens(path), path, every=1.0)

    def check(self, authorization: str | None) -> None:
        """Raise `unauthenticated` unless `authorization` is "Bearer " and a token in force."""
        if (tokens := self._watched.changed()) is not None:
            log.info("tokens read again from %s: %d in force", self.path, len(tokens))
        if authorization is None:
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                "this gateway takes calls with a token only: send 'Authorization: Bearer TOKEN'",
            )
        match = _BEARER.fullmatch(authorization)
        given = match[1].encode() if match else b""
        # Compared with every token, in time that does not tell how much of one matched.
        if not any([hmac.compare_digest(given, token) for token in self._watched.current]):
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                "the Authorization header is not 'Bearer' and a token this gateway takes",
            )

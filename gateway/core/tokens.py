"""Bearer tokens: who may call the API, checked alike over both protocols.

The tokens are lines of a file (--auth-token-file), read again when it changes, so that a token
is added, then the old one removed, without a restart. Clients send `Authorization: Bearer
TOKEN`, as an HTTP header or as gRPC metadata.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time

from gateway.core.errors import ErrorCode, GatewayError
from gateway.core.watch import signature

log = logging.getLogger(__name__)

# RFC 6750's token68, which a header carries as it is; a guessable token is no protection.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_LENGTH = 16
_BEARER = re.compile(r"bearer +(\S+) *", re.IGNORECASE)  # the scheme's name is any case
# A look at the file at most this often, seconds: a stat per request would be a system call on
# every request of the fastest path.
_LOOK_EVERY = 1.0


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
    """The tokens in force, from a file looked at again at most once a second."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens = read_tokens(path)
        self._seen = signature(path)
        self._next_look = time.monotonic() + _LOOK_EVERY
        self._looking = threading.Lock()

    def check(self, authorization: str | None) -> None:
        """Raise `unauthenticated` unless `authorization` is "Bearer " and a token in force."""
        self._refresh()
        if authorization is None:
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                "this gateway takes calls with a token only: send 'Authorization: Bearer TOKEN'",
            )
        match = _BEARER.fullmatch(authorization)
        given = match[1].encode() if match else b""
        # Compared with every token, in time that does not tell how much of one matched.
        if not any([hmac.compare_digest(given, token) for token in self._tokens]):
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                "the Authorization header is not 'Bearer' and a token this gateway takes",
            )

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_look or not self._looking.acquire(blocking=False):
            return
        try:
            self._next_look = now + _LOOK_EVERY
            seen = signature(self.path)
            if seen is None and self._seen is not None:
                # Removed, or in the middle of a replacement that is not a rename: the tokens
                # in force stay, as for a file that cannot be used, and the file is read again
                # once it is back. Said once, not every second it stays away.
                log.warning(
                    "the token file %s cannot be looked at; keeping the %d tokens in force",
                    self.path,
                    len(self._tokens),
                )
            if seen == self._seen:
                return
            self._seen = seen
            if seen is None:
                return
            try:
                tokens = read_tokens(self.path)
            except ValueError as exc:
                # Half-written, say: the tokens in force stay until the file changes again.
                log.warning("the token file changed but cannot be used (%s); keeping the old", exc)
                return
            if signature(self.path) != seen:
                # Written to while read, and maybe read half-written: read at the next look.
                self._seen = None
                return
            if tokens != self._tokens:
                self._tokens = tokens
                log.info("tokens read again from %s: %d in force", self.path, len(tokens))
        finally:
            self._looking.release()

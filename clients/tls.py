"""The certificate files a client uses over grpcs:// and https://."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class TlsFiles:
    # CA certificates the gateway's certificate must be signed by; None for the system's.
    ca_cert: Path | None
    # This client's certificate and key, for a gateway that asks for one (mutual TLS).
    client_cert: Path | None
    client_key: Path | None

    @classmethod
    def of(
        cls, ca_cert: PathLike | None, client_cert: PathLike | None, client_key: PathLike | None
    ) -> TlsFiles | None:
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        if ca_cert is None and client_cert is None:
            return None
        return cls(*(None if p is None else Path(p) for p in (ca_cert, client_cert, client_key)))

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The files' contents (CA, key, certificate chain), read now: a missing file is an
        error when the client is made, not a handshake failure at its first call."""
        return (
            None if self.ca_cert is None else self.ca_cert.read_bytes(),
            None if self.client_key is None else self.client_key.read_bytes(),
            None if self.client_cert is None else self.client_cert.read_bytes(),
        )

    def check(self) -> None:
        """Raise ValueError naming the file for one that cannot serve as what it was given for
        (not PEM, a key other than its certificate's, an encrypted key), and OSError for one
        that cannot be read. grpc found such files out only at the first call, writing lines of
        its own to stderr ("Invalid private key.") and failing the call as unreachable, as
        requests does: the fault was a local file, not the gateway."""
        for path in (self.ca_cert, self.client_cert, self.client_key):
            if path is not None:
                # ssl's own OSError for a missing file does not name it; open()'s does.
                path.open("rb").close()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_cert is not None:
            _certificates(context, self.ca_cert, "CA certificate file")
        if self.client_cert is None or self.client_key is None:
            return
        _certificates(context, self.client_cert, "client certificate file")
        try:
            context.load_cert_chain(self.client_cert, self.client_key, password=_no_password)
        except _EncryptedKeyError:
            raise ValueError(
                f"client key file {self.client_key} is encrypted; give the key unencrypted "
                "(neither grpc nor requests takes a password)"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(
                    f"client key file {self.client_key} is not the key of the client "
                    f"certificate in {self.client_cert}"
                ) from None
            # The certificate loaded above: what failed to load is the key.
            key = self.client_key
            raise ValueError(f"client key file {key} holds no PEM private key") from None


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Called only for an encrypted key; without it OpenSSL would ask on the terminal.
    raise _EncryptedKeyError


def _certificates(context: ssl.SSLContext, path: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"{what} {path} holds no PEM certificate") from None

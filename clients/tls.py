"""The certificate files a client uses over grpcs:// and https://."""

from __future__ import annotations

import os
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

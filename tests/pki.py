"""Certificates for TLS tests, made by trustme: a CA, and PEM files it signed, on disk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A CA whose certificate is in `<directory>/<name>-ca.pem`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._ca = trustme.CA()
        self.ca_cert = directory / f"{name}-ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_cert))

    def issue(self, label: str, *identities: str, not_after: datetime | None = None) -> Issued:
        """A certificate for `identities` (a server's host names and addresses, or a client's
        name) and its key, in `<name>-<label>.pem` and `<name>-<label>-key.pem`."""
        issued = self._ca.issue_cert(*identities, not_after=not_after)
        cert = self.directory / f"{self.name}-{label}.pem"
        key = self.directory / f"{self.name}-{label}-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        return Issued(cert, key)

    def server(self, label: str = "server") -> Issued:
        return self.issue(label, "127.0.0.1", "localhost")

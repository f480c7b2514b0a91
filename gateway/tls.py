"""The gRPC server's certificate files: checked at start-up, read again when they change.

Certificates are rotated in place (cert-manager, a Kubernetes Secret's volume): a server that read
them once served an expired certificate until restarted. The files are checked with the
standard library's ssl module, so that a key that does not match its certificate, or a file
that is not PEM, is a start-up error naming the flag, not a handshake failure for every client.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from gateway.core.watch import WatchedFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    # Clients must present a certificate signed by one of these (mutual TLS); "" for none.
    client_ca: str = ""


@dataclass(frozen=True)
class Pems:
    cert_chain: bytes
    key: bytes
    client_ca: bytes | None


class _EncryptedKeyError(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback, OpenSSL asks for an encrypted key's passphrase on the terminal, and a
    # gateway started from one waited there; grpc could not use such a key anyway.
    raise _EncryptedKeyError


def _read(path: str, flag: str) -> bytes:
    """The file's contents; ValueError naming the flag and the file when it cannot be read (the
    ssl module's own error names neither: "Is a directory: None")."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"{flag}: {exc.strerror or exc}: {path}") from None


def load(files: TlsFiles) -> Pems:
    """The files' contents, once they make a usable server certificate; ValueError naming the
    flag and the reason otherwise."""
    # Read first, each under its own flag; then checked by OpenSSL from the same paths.
    cert_chain = _read(files.cert, "--grpc-tls-cert")
    key = _read(files.key, "--grpc-tls-key")
    client_ca = _read(files.client_ca, "--grpc-tls-client-ca") if files.client_ca else None
    where = "--grpc-tls-cert / --grpc-tls-key"
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
        if files.client_ca:
            where = "--grpc-tls-client-ca"
            context.load_verify_locations(cafile=files.client_ca)
    except _EncryptedKeyError:
        raise ValueError(
            f"--grpc-tls-key: {files.key} is encrypted; give the key without its passphrase"
        ) from None
    except ssl.SSLError as exc:
        # The ssl module's reasons ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_OR_CRL_FOUND") name
        # the fault; a file that is no PEM of the right kind has none ("[SSL] PEM lib").
        reason = exc.reason or "not a PEM certificate chain and its private key"
        raise ValueError(f"{where}: {reason}") from None
    except OSError as exc:  # gone since read, or replaced by a directory
        raise ValueError(f"{where}: {exc.strerror or exc}") from None
    return Pems(cert_chain, key, client_ca)


# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED.
_DATES = (9, 10)


def out_of_date(files: TlsFiles) -> str | None:
    """ "certificate has expired" or "certificate is not yet valid" when clients will refuse the
    certificate for its dates, else None. OpenSSL's own verdict, from a handshake in memory with a
    client that trusts the certificate itself: the standard library parses no certificate file."""
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(files.cert, files.key, password=_no_passphrase)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        client.load_verify_locations(cafile=files.cert)
    except (_EncryptedKeyError, OSError):
        return None  # changed since checked; the next look at the files says why
    wires = [ssl.MemoryBIO() for _ in range(4)]
    ends = (
        (client.wrap_bio(wires[0], wires[1]), wires[1], wires[2]),
        (server.wrap_bio(wires[2], wires[3], server_side=True), wires[3], wires[0]),
    )
    for _ in range(4):  # TLS 1.3 takes two round trips here
        for end, sent, peer in ends:
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return str(exc.verify_message) if exc.verify_code in _DATES else None
            except ssl.SSLError:
                return None
            peer.write(sent.read())
    return None


def _warn_if_out_of_date(files: TlsFiles) -> None:
    problem = out_of_date(files)
    if problem:
        # It is served all the same: it may be what cert-manager is about to replace.
        log.warning(
            "gRPC TLS certificate %s: %s; clients refuse it until it is replaced",
            files.cert,
            problem,
        )


class Reloader:
    """The files' contents, read again once they have changed and make a usable certificate;
    until then, the last good ones stay in use."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._watched = WatchedFiles(
            (files.cert, files.key, files.client_ca), lambda: load(files), "the gRPC TLS files"
        )
        _warn_if_out_of_date(files)

    @property
    def current(self) -> Pems:
        return self._watched.current

    def changed(self) -> Pems | None:
        """New contents if the files changed and are usable, else None; asked before every
        handshake."""
        pems = self._watched.changed()
        if pems is not None:
            files = (self.files.cert, self.files.key, self.files.client_ca)
            log.info("gRPC TLS files read again: %s", ", ".join(f for f in files if f))
            _warn_if_out_of_date(self.files)
        return pems

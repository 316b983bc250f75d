"""TLS for the link between the enclave and a GPU worker: gRPC's own credentials, from PEM files.

The client (`TlsFiles`) trusts one CA, the one that signed the worker's certificate, and with a certificate of
its own can prove itself to a worker that requires it (mutual TLS). The worker (`server_credentials`) serves its
certificate and, given a client CA, refuses every client without a certificate that CA signed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file; a missing or non-PEM file is refused, naming what it was meant to be."""
    if not path.is_file():
        raise FileNotFoundError(f"TLS {what} {path}: no such file")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The enclave's side of a TLS link to a GPU worker: the CA it trusts, and its own certificate and key for
    a worker that requires client certificates (mutual TLS). Both or neither of `cert` and `key`."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs its private key, and a key its certificate")
        for name in ("ca", "cert", "key"):  # paths given as strings are taken too
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        self.pem()  # a missing or unreadable file is refused here, not at the first connection

    def pem(self) -> dict[str, bytes]:
        """The files' contents, under the names `grpc.ssl_channel_credentials` takes them by."""
        files = {"root_certificates": read_pem(self.ca, "CA certificate")}
        if self.cert is not None and self.key is not None:
            files["certificate_chain"] = read_pem(self.cert, "client certificate")
            files["private_key"] = read_pem(self.key, "client key")
        return files

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(**self.pem())


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """The worker's certificate and key; with `client_ca`, only clients with a certificate it signed get in."""
    pair = (read_pem(key, "server key"), read_pem(cert, "server certificate"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=read_pem(client_ca, "client CA certificate"), require_client_auth=True
    )


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (plaintext to it never crosses a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False

"""`TlsConfig`: which PEM files a process presents and trusts. Plain data (no grpc), so that every
service's config dataclass can hold one and stay importable by the pure core; the credentials
and ports built from it are in `stagemesh/security.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsConfig:
    """PEM paths of this process's identity and of the CA it trusts, both ways.

    cert/key: presented as server certificate on our port and as client certificate on our
    outgoing links (one identity per process; the dev certs carry both key usages).
    ca: verifies the peers (servers we call; clients that call us).
    require_client_cert: refuse callers without a valid client certificate (mutual TLS).
    server_name: expected name in the server's certificate when it is not the target's host.
    """

    cert: str  # empty (with key) for a client that only verifies the server
    key: str
    ca: str
    require_client_cert: bool = True
    server_name: str = ""

    def __post_init__(self):
        if not self.ca:
            raise ValueError("TLS needs --tls-ca (give --tls-cert, --tls-key and --tls-ca together)")
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not Path(path).is_file():
                raise ValueError(f"{what} {path}: no such file")

    def read(self) -> tuple[bytes | None, bytes | None, bytes]:
        """(cert, key, ca) PEM bytes; cert and key None for a client that only verifies."""
        cert = Path(self.cert).read_bytes() if self.cert else None
        key = Path(self.key).read_bytes() if self.key else None
        return cert, key, Path(self.ca).read_bytes()

"""Transport security in one place: gRPC server ports and client channels from a `TlsConfig`
(stagemesh/tls.py, plain data that service configs hold).

Every service builds its listening port with `add_port` and every outgoing link with `channel`,
so a deployment turns TLS on by giving each process `--tls-cert --tls-key --tls-ca` (see
`add_tls_flags`). With a config, a server port is TLS and, when `require_client_cert` is set
(every internal service), refuses a caller without a certificate signed by the CA: mutual TLS.
The gateway's public port uses the same files with client certificates optional. Without a
config, ports and channels are plaintext (loopback development).

`make_dev_certs` writes a development CA and a server and a client certificate (SAN 127.0.0.1,
localhost) for `stagemesh certs DIR`; production deployments bring their own PKI. The server
certificate carries the member role (stagemesh.membership.MEMBER_URI) that the internal services
demand on top of the CA's signature; the client certificate, the users', does not.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

import grpc

from stagemesh.membership import MEMBER_URI, client_interceptors, intercept_sync
from stagemesh.net import GRPC_OPTIONS
from stagemesh.tls import TlsConfig


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    cert, key, ca = tls.read()
    if cert is None:
        raise ValueError("a TLS port needs --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=tls.require_client_cert)


def _channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Server verified by the CA; our certificate presented when we have one (mutual TLS)."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server, address: str, tls: TlsConfig | None) -> int:
    """Bind `address` on a grpc(.aio) server: TLS when configured, else plaintext. Returns the port."""
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, _server_credentials(tls))
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def _options(tls: TlsConfig | None, options) -> list:
    opts = list(GRPC_OPTIONS if options is None else options)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def channel(target: str, tls: TlsConfig | None, options=None, member: bool = True) -> grpc.aio.Channel:
    """An asyncio channel to `target`: mutual TLS with our certificate when configured; every
    call carries this process's cluster token when it has one (stagemesh.membership), unless
    `member` is False: a public client never hands the token to a gateway it was pointed at."""
    interceptors = client_interceptors() if member else []
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_options(None, options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, _channel_credentials(tls), options=_options(tls, options),
                                   interceptors=interceptors)


def sync_channel(target: str, tls: TlsConfig | None, options=None, member: bool = True) -> grpc.Channel:
    """The blocking twin of `channel` (CLI, tests)."""
    if tls is None:
        ch = grpc.insecure_channel(target, options=_options(None, options))
    else:
        ch = grpc.secure_channel(target, _channel_credentials(tls), options=_options(tls, options))
    return intercept_sync(ch) if member else ch


# -- command-line flags ----------------------------------------------------------------------------
def add_tls_flags(parser: argparse.ArgumentParser, public: bool = False) -> None:
    """--tls-cert/--tls-key/--tls-ca; on a public port also --tls-require-client-cert."""
    g = parser.add_argument_group("TLS (all three paths, or none for plaintext)")
    g.add_argument("--tls-cert", default="", help="PEM certificate of this process (server and client)")
    g.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default="", help="PEM CA that signs every peer's certificate")
    if public:
        g.add_argument("--tls-require-client-cert", action="store_true",
                       help="refuse clients without a certificate signed by --tls-ca (default: optional)")


def tls_from_args(args, require_client_cert: bool = True) -> TlsConfig | None:
    """The TlsConfig of parsed flags; None when none of the three paths is given."""
    if not (args.tls_cert or args.tls_key or args.tls_ca):
        return None
    return TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, require_client_cert=require_client_cert)


# -- development certificates ------------------------------------------------------------------------
DEV_NAMES = ("127.0.0.1", "localhost")


def make_dev_certs(out_dir: str | Path, names: tuple[str, ...] = DEV_NAMES, days: int = 365) -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key into out_dir.

    The server and client certificates both carry SANs `names` and both extended key usages; only
    the server certificate carries the member role (URI SAN MEMBER_URI), so only it can call the
    internal services' control rpcs. Keys are EC P-256, files 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name: str, cert, key) -> None:
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = out / f"{name}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stagemesh dev CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    for role in ("server", "client"):
        # server.pem is a mesh member's (URI SAN MEMBER_URI: internal services accept it);
        # client.pem, the one handed to users, carries no role and opens the public API only.
        role_sans = [x509.UniformResourceIdentifier(MEMBER_URI)] if role == "server" else []
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"stagemesh {role}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([*sans, *role_sans]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        write(role, cert, key)
    return {n: out / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def dev_tls(cert_dir: str | Path, role: str = "server", require_client_cert: bool = True) -> TlsConfig:
    """The TlsConfig of `role` (server/client) in a directory written by make_dev_certs."""
    d = Path(cert_dir)
    return TlsConfig(cert=str(d / f"{role}.pem"), key=str(d / f"{role}.key"), ca=str(d / "ca.pem"),
                     require_client_cert=require_client_cert)

"""Certificates for gpumesh's mTLS, and gRPC credentials built from them.

One CA signs three kinds of leaf certificates (EC P-256, SHA-256):

| kind | subject | EKU | SANs |
| --- | --- | --- | --- |
| `server` (control plane) | CN=gpumesh-controlplane, OU=server | serverAuth, clientAuth | the `--host` names and IPs |
| `agent` | CN=<node name>, OU=agent | clientAuth, serverAuth (migration transfers) | the node name |
| `client` | CN=<name>, O=<tenant>, OU=<role> | clientAuth | none |

The control plane reads who a peer is from its verified certificate: an agent's
identity is its CN (the node it may speak for); a client certificate carries the
tenant in O and the role (admin, tenant, viewer) in OU.

Files written by `write_ca`/`issue` (and `meshctl certs`): `ca.crt`, `ca.key`,
`<name>.crt`, `<name>.key`; keys are mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

KINDS = ("server", "agent", "client")
ROLES = ("admin", "tenant", "viewer")
SERVER_CN = "gpumesh-controlplane"
CA_DAYS = 3650
LEAF_DAYS = 825
SELF_SIGNED_DAYS = 30       # a model server's certificate (renewed whenever the server restarts)


class TlsError(ValueError):
    """A certificate or key cannot be made, read or used; the message names the file."""


@dataclass(frozen=True)
class Subject:
    """What a verified certificate says about its holder."""

    kind: str            # server | agent | client
    name: str            # CN
    tenant: str = ""     # O (clients)
    role: str = ""       # OU of clients: admin | tenant | viewer


# -- making certificates -----------------------------------------------------------------

def _x509():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return cert.public_bytes(serialization.Encoding.PEM)


def write_ca(directory: str | os.PathLike, name: str = "gpumesh CA", force: bool = False) -> Path:
    """Create `ca.crt` and `ca.key` in `directory`; refuses to overwrite unless `force`. The cert's path."""
    x509, hashes, _, ec, _, NameOID = _x509()
    d = Path(directory)
    crt, key_path = d / "ca.crt", d / "ca.key"
    if not force and (crt.exists() or key_path.exists()):
        raise TlsError(f"{crt} already exists (a CA is there; pass force to replace it and every cert it signed)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpumesh")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _pem_key(key), secret=True)
    _write(crt, _pem_cert(cert))
    return crt


def _load_ca(d: Path):
    x509, _, serialization, _, _, _ = _x509()
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as e:
        raise TlsError(f"{e.filename}: no CA there (run `meshctl certs init --dir {d}` first)") from None
    except ValueError as e:
        raise TlsError(f"{d}: the CA files are not PEM certificate and key: {e}") from None
    return cert, key


def issue(directory: str | os.PathLike, kind: str, name: str, *, hosts: tuple[str, ...] = (),
          tenant: str = "", role: str = "", days: int = LEAF_DAYS, filename: str = "") -> tuple[Path, Path]:
    """Sign a `kind` certificate for `name` with the CA in `directory`; (cert path, key path)."""
    x509, hashes, _, ec, EKU, NameOID = _x509()
    if kind not in KINDS:
        raise TlsError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not name or len(name) > 64 or not name.isprintable() or "/" in name:
        raise TlsError(f"name: {name!r} must be 1-64 printable characters without '/'")
    if kind == "client":
        if role not in ROLES:
            raise TlsError(f"role: {role!r} is not one of {', '.join(ROLES)}")
        if role != "admin" and not tenant:
            raise TlsError(f"tenant: a {role} client certificate needs a tenant")
    elif tenant or role:
        raise TlsError(f"tenant and role are only for client certificates, not {kind}")
    if (filename or name) == "ca":
        raise TlsError("name: 'ca' would write over the CA's own ca.crt and ca.key in the same directory; "
                       "issue it under another name")
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if tenant:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role if kind == "client" else kind))
    key = ec.generate_private_key(ec.SECP256R1())
    # agents also serve: a migration target's agent receives the transfer (mesh/checkpoint/transfer_auth.py)
    usages = [EKU.SERVER_AUTH, EKU.CLIENT_AUTH] if kind in ("server", "agent") else [EKU.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(_now() - datetime.timedelta(minutes=5))
               .not_valid_after(min(_now() + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                            crl_sign=False, content_commitment=False, data_encipherment=False,
                                            key_agreement=True, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    sans = list(hosts) + ([name] if kind == "agent" else [])
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(sans)]),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = filename or name
    crt, key_path = d / f"{stem}.crt", d / f"{stem}.key"
    _write(key_path, _pem_key(key), secret=True)
    _write(crt, _pem_cert(cert))
    return crt, key_path


def self_signed(hosts: tuple[str, ...], name: str, *, days: int = SELF_SIGNED_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a fresh self-signed server certificate for `hosts` (each an IP
    address or a DNS name, in subjectAltName), valid for `days`. Its holder is trusted by pinning: a client
    takes exactly this certificate as its only trust anchor (mesh/replicatls.py), so it needs no CA. It names
    itself as its issuer (subject and authority key identifiers: the same key), as strict verifiers want."""
    x509, hashes, _, ec, EKU, NameOID = _x509()
    if not hosts or not all(hosts):
        raise TlsError(f"hosts: {hosts!r}: a self-signed server certificate needs at least one address or name")
    if days < 1:
        raise TlsError(f"days: {days} must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "backend")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
            .sign(key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def _san(host: str):
    x509 = _x509()[0]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# -- reading certificates ------------------------------------------------------------------

def subject_of(pem: bytes) -> Subject:
    """The Subject of a PEM certificate (already verified by the TLS handshake)."""
    x509, _, _, _, _, NameOID = _x509()
    cert = x509.load_pem_x509_certificate(pem)

    def attr(oid) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""
    ou = attr(NameOID.ORGANIZATIONAL_UNIT_NAME)
    kind = ou if ou in ("server", "agent") else "client" if ou in ROLES else ""
    return Subject(kind=kind, name=attr(NameOID.COMMON_NAME), tenant=attr(NameOID.ORGANIZATION_NAME) if
                   kind == "client" else "", role=ou if kind == "client" else "")


def read(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise TlsError(f"{what}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{what}: {path} is not a PEM file")
    return data


# -- gRPC credentials ----------------------------------------------------------------------

def server_credentials(cert: str, key: str, client_ca: str = "", require_client_auth: bool = False):
    """Server credentials; with `client_ca`, client certificates signed by it are verified (and
    required when `require_client_auth`; otherwise peers may come with a bearer token instead)."""
    import grpc
    pair = [(read(key, "tls_key"), read(cert, "tls_cert"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=read(client_ca, "tls_client_ca"),
                                           require_client_auth=require_client_auth)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str = "", cert: str = "", key: str = ""):
    """Channel credentials that verify the server against `ca` (else the system roots) and present
    `cert`/`key` when given."""
    import grpc
    if bool(cert) != bool(key):
        raise TlsError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "ca") if ca else None,
        private_key=read(key, "key") if key else None,
        certificate_chain=read(cert, "cert") if cert else None)


__all__ = ["Subject", "TlsError", "write_ca", "issue", "self_signed", "subject_of", "server_credentials",
           "channel_credentials", "KINDS", "ROLES", "SERVER_CN", "PlaintextTokenWarning", "is_loopback_target",
           "warn_plaintext_token"]


class PlaintextTokenWarning(UserWarning):
    """A bearer token is about to cross the network in plaintext."""


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target (HOST:PORT, [V6]:PORT, unix:PATH, dns:///HOST:PORT) stays on this machine."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True
    t = t.split("///", 1)[-1] if "///" in t else t
    host = t[1:t.index("]")] if t.startswith("[") and "]" in t else t.rsplit(":", 1)[0] if ":" in t else t
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_plaintext_token(target: str) -> None:
    """Warns (once per target and call site) when a token goes over a plaintext channel to another machine:
    anyone on the path can read it and act as its owner. Loopback targets stay quiet (the local cluster)."""
    if not is_loopback_target(target):
        import warnings
        warnings.warn(f"sending a bearer token in plaintext to {target}: anyone on the network path can read it; "
                      "give the control plane's CA (--ca, $MESH_CA or the context's ca) to use TLS",
                      PlaintextTokenWarning, stacklevel=3)


def token_interceptor(token: str):
    """A client interceptor (sync channels) that sends `authorization: Bearer <token>` on every call."""
    import grpc

    class _Details(grpc.ClientCallDetails):
        def __init__(self, d) -> None:
            self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
            self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
            self.metadata = list(d.metadata or []) + [("authorization", f"Bearer {token}")]

    class _Interceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            return continuation(_Details(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(_Details(details), request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            return continuation(_Details(details), request_iterator)

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(_Details(details), request_iterator)

    return _Interceptor()

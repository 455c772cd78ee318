"""Opening a data-plane channel: TLS across hosts, and the per-connection secret.

Every TCP connection to an agent's data plane starts with this handshake
before the first request (see `mesh.transport.tcp` for the requests):

1. client -> server: an 8-byte preamble `b"GMDP"`, version u8 (1), mode
   (`b"T"`: TLS follows, `b"P"`: plaintext), 2 reserved bytes.
2. with `T`, a TLS 1.3 handshake; the client pins the server's certificate by
   the SHA-256 of its DER (`BufferDescriptor.tls_sha256`, which reached the
   client through the control plane's authenticated API), so no CA is needed
   on the client and a self-signed certificate per agent is as strong as a
   CA-issued one.
3. server -> client: a 16-byte random nonce.
4. client -> server: the buffer id it authenticates for (64 bytes, ASCII,
   zero-padded) and `HMAC-SHA256(secret, LABEL | nonce | buffer id)`. The
   secret is the per-connection secret the control plane issued at Connect:
   it never crosses the wire, so a plaintext channel on one host does not
   leak it. A buffer registered without a secret (a bare `TcpTransport`)
   accepts an empty buffer id and a zero MAC.
5. server -> client: status u8 (0 accepted) and, on refusal, a u16-prefixed
   reason; then the server closes.

An accepted channel may touch only the regions of the connection its buffer
belongs to (other keys read as unknown). Plaintext from another host is
refused when the server requires TLS (`mesh_tls`, the default).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import tempfile

from prometheus_client import Counter

from mesh.transport.base import NotAuthorized

CHANNELS = Counter("gpumesh_mesh_channels_total", "Data-plane channels by outcome (accepted_tls, accepted_plain, "
                   "refused_secret, refused_plaintext, refused_protocol)", ["outcome"])

MAGIC = b"GMDP"
VERSION = 1
PREAMBLE = struct.Struct("<4sBcxx")
NONCE_BYTES = 16
ID_BYTES = 64
MAC_BYTES = 32
LABEL = b"gpumesh-dataplane-v1|"
ACCEPTED, REFUSED = 0, 1
HANDSHAKE_TIMEOUT_S = 30.0
SECRET_BYTES = 32       # what the control plane issues (256 bits; at least 128 are required)


def mac(secret: bytes, nonce: bytes, buffer_id: bytes) -> bytes:
    return hmac.new(secret, LABEL + nonce + buffer_id, hashlib.sha256).digest()


def fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def same_host(sock: socket.socket) -> bool:
    """Whether both ends of a connected socket are on this host (loopback, or one address)."""
    try:
        here, there = sock.getsockname()[0], sock.getpeername()[0]
        return here == there or ipaddress.ip_address(there.split("%")[0]).is_loopback
    except (OSError, ValueError):
        return False


def _recv(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        k = sock.recv(n - len(buf))
        if not k:
            raise ConnectionError("the data plane closed the channel during the handshake")
        buf += k
    return bytes(buf)


class TlsIdentity:
    """The data plane's certificate and key: the cluster's agent certificate when the cluster is
    secured, else a self-signed one made at start (EC P-256). Peers pin `sha256` either way."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.sha256 = fingerprint(ssl.PEM_cert_to_DER_cert(cert_pem.decode()))
        self._ctx: ssl.SSLContext | None = None

    @classmethod
    def self_signed(cls, name: str) -> "TlsIdentity":
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gpumesh-dataplane {name}"[:64])])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=825)).sign(key, hashes.SHA256()))
        return cls(cert.public_bytes(serialization.Encoding.PEM),
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))

    @classmethod
    def from_files(cls, cert: str, key: str) -> "TlsIdentity":
        with open(cert, "rb") as c, open(key, "rb") as k:
            return cls(c.read(), k.read())

    def server_context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            d = tempfile.mkdtemp(prefix="gpumesh-dp-")     # ssl loads keys from files only; 0700, removed at once
            try:
                cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
                for path, data in ((cert, self.cert_pem), (key, self.key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                ctx.load_cert_chain(cert, key)
            finally:
                for f in os.listdir(d):
                    os.unlink(os.path.join(d, f))
                os.rmdir(d)
            self._ctx = ctx
        return self._ctx


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE        # the certificate is pinned by its fingerprint instead (below)
    return ctx


def client_open(sock: socket.socket, *, buffer_id: str = "", secret: bytes = b"", tls_sha256: bytes = b"",
                force_tls: bool = False) -> socket.socket:
    """Run the client side of the handshake on a connected socket; the channel to use (maybe TLS)."""
    use_tls = bool(tls_sha256) and (force_tls or not same_host(sock))
    sock.sendall(PREAMBLE.pack(MAGIC, VERSION, b"T" if use_tls else b"P"))
    if use_tls:
        sock = _client_context().wrap_socket(sock)
        got = fingerprint(sock.getpeercert(binary_form=True) or b"")
        if not hmac.compare_digest(got, tls_sha256):
            sock.close()
            raise NotAuthorized(f"the data plane's TLS certificate (sha256 {got.hex()[:16]}...) is not the one the "
                                f"control plane named for buffer {buffer_id} ({tls_sha256.hex()[:16]}...)",
                                op="connect", buffer_id=buffer_id)
    nonce = _recv(sock, NONCE_BYTES)
    bid = buffer_id.encode()[:ID_BYTES] if secret else b""
    tag = mac(secret, nonce, bid) if secret else bytes(MAC_BYTES)
    sock.sendall(bid.ljust(ID_BYTES, b"\0") + tag)
    status = _recv(sock, 1)[0]
    if status != ACCEPTED:
        (n,) = struct.unpack("<H", _recv(sock, 2))
        why = _recv(sock, n).decode(errors="replace")
        sock.close()
        raise NotAuthorized(f"the data plane refused the channel for buffer {buffer_id or '?'}: {why}",
                            op="connect", buffer_id=buffer_id)
    return sock


def server_accept(sock: socket.socket, *, identity: TlsIdentity | None, require_tls_remote: bool,
                  secret_of, allow_unscoped: bool = True) -> tuple[socket.socket, str] | None:
    """Run the server side on an accepted socket: (channel, scope) or None (refused, closed).

    `secret_of(buffer_id)` gives (scope, secret) of a registered buffer, or None. The scope "" is for
    buffers registered without a secret (reached with an empty buffer id); `allow_unscoped` False refuses
    such channels (a data plane whose every buffer has a secret: an anonymous channel reaches nothing there,
    and would only hold a connection and its thread)."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)

    def refuse(why: str) -> None:
        try:
            data = why.encode()[:1000]
            sock.sendall(bytes([REFUSED]) + struct.pack("<H", len(data)) + data)
        except OSError:
            pass
        sock.close()

    try:
        magic, version, mode = PREAMBLE.unpack(_recv(sock, PREAMBLE.size))
        if magic != MAGIC or version != VERSION or mode not in (b"T", b"P"):
            CHANNELS.labels("refused_protocol").inc()
            sock.close()
            return None
        if mode == b"T":
            if identity is None:
                CHANNELS.labels("refused_protocol").inc()
                sock.close()
                return None
            sock = identity.server_context().wrap_socket(sock, server_side=True)
        elif require_tls_remote and not same_host(sock):
            sock.sendall(secrets.token_bytes(NONCE_BYTES))
            _recv(sock, ID_BYTES + MAC_BYTES)
            CHANNELS.labels("refused_plaintext").inc()
            refuse("this data plane requires TLS from other hosts (agent setting mesh_tls)")
            return None
        nonce = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(nonce)
        got = _recv(sock, ID_BYTES + MAC_BYTES)
        bid, tag = got[:ID_BYTES].rstrip(b"\0"), got[ID_BYTES:]
        if not bid and tag == bytes(MAC_BYTES) and allow_unscoped:
            scope = ""
        else:
            known = secret_of(bid.decode(errors="replace"))
            expect = mac(known[1], nonce, bid) if known and known[1] else None
            if expect is None or not hmac.compare_digest(expect, tag):
                CHANNELS.labels("refused_secret").inc()
                refuse("wrong or missing connection secret")
                return None
            scope = known[0]
        sock.sendall(bytes([ACCEPTED]))
        sock.settimeout(None)
        CHANNELS.labels("accepted_tls" if mode == b"T" else "accepted_plain").inc()
        return sock, scope
    except (OSError, ConnectionError, ssl.SSLError, struct.error):
        CHANNELS.labels("refused_protocol").inc()
        try:
            sock.close()
        except OSError:
            pass
        return None

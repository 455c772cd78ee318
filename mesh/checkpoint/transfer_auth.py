"""The transfer channel's authentication and encryption: a per-migration secret, proved in the
`hello` and turned into per-stream AES-256-GCM keys that seal every later frame.

The control plane draws a secret of 32 random bytes for each migration (and restore) and
sends it only to the two agents, over their Sync streams (`MigrationCommand.secret`); an agent
draws one itself for a checkpoint into the store (both ends are local to it). The agents hand
it to the workload processes through a 0600 file in the workload's directory (receiver,
`GPUMESH_TRANSFER_SECRET_FILE`) or the workload's control socket (sender). It never appears in
a record returned by the API, in the workload's environment or in a log.

Handshake (one round trip, inside the stream that carries the data):

    sender   -> hello {session, nonce_c, proof = HMAC-SHA256(secret, "hello" | session | nonce_c)}
    receiver    checks the proof in constant time: without it, or with another session's secret,
                the stream is refused (UNAUTHENTICATED) before anything is written; so is a hello
                whose nonce the session heard before (replayed off the wire: the proof covers the
                sender's nonce only, and the stream would hold the session; transfer_recv.py)
    receiver -> MAGIC | nonce_s | seal(have)
    both        keys = HKDF-SHA256(secret, salt = nonce_c | nonce_s, info = "gpumesh-transfer-v2" | session)
                -> one AES-256-GCM key per direction

Every later message, both ways, is `seal(frame)`: AES-256-GCM with a 96-bit counter nonce (the
message's sequence number in its direction) and the direction as associated data. A changed,
dropped, replayed or reordered frame fails to open and ends the stream (DATA_LOSS); the
receiver opens a frame before it looks at it, so nothing of a forged frame is written. The
sender authenticates the receiver too: only a holder of the secret can seal the `have` answer.
Fresh nonces per stream give fresh keys per stream (a reconnect after a cut does the
handshake again), so a nonce never repeats under a key.

When the cluster is secured, endpoints that are agents also speak mTLS with their agent
certificates (nodeagent/migrate*.py); the sealing stays, so the channel is the same in every mode.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import Any

from mesh.checkpoint.format import CheckpointError

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
"""at least 128 bits."""
NONCE_BYTES = 16
MAGIC = b"GMX2"
SECRET_FILE_ENV = "GPUMESH_TRANSFER_SECRET_FILE"
"""the receiving workload reads its session's secret from this file (and removes it)."""
_INFO = b"gpumesh-transfer-v2|"


class TransferAuthError(CheckpointError):
    """A push or an answer did not prove the session's secret, or a sealed frame did not open."""


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def check_secret(secret: Any, what: str = "secret") -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        n = len(secret) if isinstance(secret, (bytes, bytearray)) else 0
        raise TransferAuthError(f"{what}: a transfer session needs a secret of at least {MIN_SECRET_BYTES} random "
                                f"bytes (got {n})")
    return bytes(secret)


def write_secret_file(path: str | os.PathLike[str], secret: bytes) -> str:
    """Writes `secret` (hex) to `path`, readable by its owner only."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(check_secret(secret).hex())
    os.replace(tmp, p)
    return str(p)


def read_secret_file(path: str, remove: bool = True) -> bytes:
    try:
        with open(path, encoding="ascii") as f:
            secret = bytes.fromhex(f.read().strip())
    except (OSError, ValueError) as e:
        raise TransferAuthError(f"{SECRET_FILE_ENV}: cannot read the session's secret from {path}: {e}") from None
    if remove:
        try:
            os.unlink(path)
        except OSError:
            pass
    return check_secret(secret, SECRET_FILE_ENV)


def hello_proof(secret: bytes, session: str, nonce: bytes) -> str:
    return hmac.new(secret, b"hello|" + session.encode() + b"|" + nonce, hashlib.sha256).hexdigest()


def check_hello(secret: bytes, session: str, hello: dict[str, Any]) -> bytes:
    """The sender's nonce when `hello` proves `secret` for `session`; else TransferAuthError."""
    try:
        nonce = bytes.fromhex(str(hello.get("nonce", "")))
        proof = str(hello.get("proof", ""))
    except ValueError:
        nonce, proof = b"", ""
    if len(nonce) != NONCE_BYTES or not proof:
        raise TransferAuthError(f"transfer session {session!r}: the push carries no proof of the session's secret")
    if not hmac.compare_digest(hello_proof(secret, session, nonce), proof):
        raise TransferAuthError(f"transfer session {session!r}: the push's proof does not match the session's "
                                f"secret (refused)")
    return nonce


def _hkdf(secret: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(secret)


class Channel:
    """One stream's pair of keys: `seal` for what this side sends, `open` for what it receives.
    Each direction counts its messages; sealing and opening must each happen in stream order."""

    def __init__(self, secret: bytes, session: str, nonce_c: bytes, nonce_s: bytes, sender: bool) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        keys = _hkdf(secret, nonce_c + nonce_s, _INFO + session.encode(), 64)
        c2s, s2c = AESGCM(keys[:32]), AESGCM(keys[32:])
        self._out, self._in = (c2s, s2c) if sender else (s2c, c2s)
        self._out_ad, self._in_ad = (b"c2s", b"s2c") if sender else (b"s2c", b"c2s")
        self._out_seq = 0
        self._in_seq = 0
        self.session = session

    def seal(self, frame: bytes | memoryview) -> bytes:
        nonce = struct.pack("<4xQ", self._out_seq)
        self._out_seq += 1
        return self._out.encrypt(nonce, bytes(frame) if isinstance(frame, memoryview) else frame, self._out_ad)

    def open(self, message: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        nonce = struct.pack("<4xQ", self._in_seq)
        try:
            out = self._in.decrypt(nonce, message, self._in_ad)
        except InvalidTag:
            raise TransferAuthError(f"transfer session {self.session!r}: message {self._in_seq} failed "
                                    f"authentication (altered, replayed, reordered, or sealed with another "
                                    f"secret)") from None
        self._in_seq += 1
        return out


def client_hello(secret: bytes, session: str) -> tuple[dict[str, Any], bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return {"t": "hello", "session": session, "nonce": nonce.hex(), "proof": hello_proof(secret, session, nonce),
            "v": 2}, nonce


def server_answer(secret: bytes, session: str, nonce_c: bytes, have_frame: bytes) -> tuple[Channel, bytes]:
    """The receiver's channel and its first message (MAGIC, its nonce, the sealed `have`)."""
    nonce_s = os.urandom(NONCE_BYTES)
    ch = Channel(secret, session, nonce_c, nonce_s, sender=False)
    return ch, MAGIC + nonce_s + ch.seal(have_frame)


def client_channel(secret: bytes, session: str, nonce_c: bytes, first: bytes) -> tuple[Channel, bytes]:
    """The sender's channel from the receiver's first message, and the opened `have` frame."""
    if len(first) < len(MAGIC) + NONCE_BYTES or not first.startswith(MAGIC):
        raise TransferAuthError(f"transfer session {session!r}: the receiver does not speak the authenticated "
                                f"transfer protocol")
    nonce_s = first[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    ch = Channel(secret, session, nonce_c, nonce_s, sender=True)
    return ch, ch.open(first[len(MAGIC) + NONCE_BYTES:])

"""The checkpoint store: checkpoint directories under one root (a shared filesystem), each
optionally encrypted at rest with its tenant's key.

    keys = load_keys("/etc/gpumesh/checkpoint-keys.yaml")      # {tenant: base64 of 32 bytes}
    sink = StoreSink(path, workload_id, key=keys.get("team-a")) # a transfer Sink (receive a checkpoint)
    push_checkpoint(path, client, key=...)                      # send a stored checkpoint to a restoring process

Layout: the checkpoint format of `format.py` (manifest.json + data/NNNNN.bin). With a key,
every entry file (tensors and the small pickled entries alike) is a sequence of AES-256-GCM
records, one per received chunk: `GMENC1` once, then per record a 4-byte little-endian
ciphertext length, a 12-byte random nonce and the ciphertext with its 16-byte tag. Each
record's associated data is `<entry name>:<plaintext offset>`, so records cannot be
reordered or moved between entries unnoticed. The manifest stays readable (names, shapes,
checksums of the plaintext: listing needs no key) and says `extras.encryption`.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh.checkpoint.format import (CHUNK_BYTES, CheckpointError, EntryMeta, FormatError, Manifest, entry_file,
                                    read_manifest)
from mesh.checkpoint.transfer import DirectorySink, EntryTarget, OutEntry, SendStats, TransferClient

MAGIC = b"GMENC1"
ALG = "AES-256-GCM"
_LEN = struct.Struct("<I")


class KeyError_(CheckpointError):
    """A tenant key is missing, malformed, or does not open a checkpoint."""


def load_keys(path: str) -> dict[str, bytes]:
    """Per-tenant keys from a YAML (or JSON) mapping `tenant: base64 key` (32 bytes each)."""
    import yaml
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise KeyError_(f"checkpoint_keys_file: cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise KeyError_(f"checkpoint_keys_file: {path} must map tenant names to base64 keys")
    keys = {}
    for tenant, value in doc.items():
        try:
            key = base64.b64decode(str(value), validate=True)
        except ValueError:
            raise KeyError_(f"checkpoint_keys_file: the key of tenant {tenant!r} is not base64") from None
        if len(key) != 32:
            raise KeyError_(f"checkpoint_keys_file: the key of tenant {tenant!r} has {len(key)} bytes "
                            f"(allowed: 32, AES-256)")
        keys[str(tenant)] = key
    return keys


def new_key() -> str:
    """A fresh base64 key for the keys file."""
    return base64.b64encode(os.urandom(32)).decode()


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key)


class _EncryptedFile:
    """Appends one encrypted record per write; writes must come in order (the transfer resumes
    an entry at the receiver's contiguous offset, so they do)."""

    def __init__(self, path: Path, aead: Any, name: str) -> None:
        self.path, self.aead, self.name = path, aead, name
        self.written = 0
        with open(path, "wb") as f:
            f.write(MAGIC)

    def write(self, offset: int, data: memoryview) -> None:
        if offset != self.written:
            raise CheckpointError(f"entry {self.name!r}: encrypted write at byte {offset}, expected {self.written}")
        nonce = os.urandom(12)
        ct = self.aead.encrypt(nonce, bytes(data), f"{self.name}:{offset}".encode())
        with open(self.path, "ab") as f:
            f.write(_LEN.pack(len(ct)) + nonce + ct)
        self.written += len(data)


class StoreSink(DirectorySink):
    """Receives a checkpoint into the store; encrypts each entry file when given a key. Unlike
    the plain DirectorySink it also stores the pickled entries (step, RNG, optimizer meta)."""

    def __init__(self, path: str, workload_id: str = "", key: bytes | None = None, tenant: str = "") -> None:
        super().__init__(path, workload_id)
        self.aead = _aead(key) if key else None
        self.tenant = tenant

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        if self.aead is None:
            return super().open_entry(meta)
        rel = self.files.setdefault(meta.name, entry_file(len(self.files)))
        return _EncryptedFile(self.writer.tmp / rel, self.aead, meta.name)

    def commit(self, manifest: Manifest, pickles: dict[str, bytes]) -> dict[str, Any]:
        for name, blob in pickles.items():
            target = self.open_entry(EntryMeta(name=name, kind="pickle", nbytes=len(blob)))
            if blob:
                target.write(0, memoryview(blob))
        extras = dict(manifest.extras)
        if self.aead is not None:
            extras["encryption"] = {"alg": ALG, "tenant": self.tenant}
        manifest = Manifest(workload_id=manifest.workload_id, step=manifest.step, entries=manifest.entries,
                            created=manifest.created, extras=extras, checksum=manifest.checksum)
        out = super().commit(manifest, {})
        return {**out, "step": manifest.step, "bytes": manifest.nbytes, "encrypted": self.aead is not None}


def _plain_chunks(path: Path, start: int, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            b = f.read(chunk_bytes)
            if not b:
                return
            yield b


def _decrypted_chunks(path: Path, aead: Any, name: str, start: int) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise FormatError(f"{path}: not an encrypted checkpoint entry")
        offset = 0
        while True:
            head = f.read(_LEN.size)
            if not head:
                return
            (n,) = _LEN.unpack(head)
            nonce, ct = f.read(12), f.read(n)
            try:
                pt = aead.decrypt(nonce, ct, f"{name}:{offset}".encode())
            except InvalidTag:
                raise KeyError_(f"entry {name!r} at byte {offset}: the key does not open it (wrong tenant key, "
                                f"or the file was altered)") from None
            end = offset + len(pt)
            if end > start:
                yield pt[max(0, start - offset):]
            offset = end


def encrypted(manifest: Manifest) -> bool:
    return bool(manifest.extras.get("encryption"))


def push_checkpoint(path: str, client: TransferClient, key: bytes | None = None,
                    chunk_bytes: int = CHUNK_BYTES) -> SendStats:
    """Sends the stored checkpoint at `path` through `client` and commits it (the receiver, a
    restoring workload, applies it). Decrypts with `key` when the checkpoint is encrypted."""
    manifest = read_manifest(path)
    root = Path(path)
    aead = None
    if encrypted(manifest):
        if not key:
            raise KeyError_(f"{path} is encrypted (tenant {manifest.extras['encryption'].get('tenant', '?')!r}) "
                            f"and no key was given: set checkpoint_keys_file")
        aead = _aead(key)
    out = []
    for e in manifest.entries:
        file = root / e.file

        def chunks(start: int, file: Path = file, name: str = e.name) -> Iterator[bytes]:
            if aead is not None:
                return _decrypted_chunks(file, aead, name, start)
            return _plain_chunks(file, start, chunk_bytes)
        out.append(OutEntry(EntryMeta(**{**e.to_json(), "file": ""}), chunks, gen=0))
    client.algo = manifest.checksum
    commit = Manifest(workload_id=manifest.workload_id, step=manifest.step, created=manifest.created,
                      extras={k: v for k, v in manifest.extras.items() if k != "encryption"},
                      entries=[EntryMeta(**{**e.to_json(), "file": ""}) for e in manifest.entries],
                      checksum=manifest.checksum)
    stats = client.send(out, commit=commit)
    if stats.committed is None:
        raise CheckpointError(f"the receiver did not commit the checkpoint from {path}")
    return stats

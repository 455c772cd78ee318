"""The checkpoint store: checkpoint directories under one root (a shared filesystem), each
optionally encrypted at rest with its tenant's key.

    keys = load_keys("/etc/gpumesh/checkpoint-keys.yaml")      # {tenant: base64 of 32 bytes}
    sink = StoreSink(path, workload_id, key=keys.get("team-a")) # a transfer Sink (receive a checkpoint)
    push_checkpoint(path, client, key=...)                      # send a stored checkpoint to a restoring process

Layout: the checkpoint format of `format.py` (manifest.json + data/NNNNN.bin). With a key,
every entry file (tensors and the small data entries alike) is a sequence of AES-256-GCM
records, one per received chunk: `GMENC2` once, then per record a 4-byte little-endian
ciphertext length, a 12-byte random nonce and the ciphertext with its 16-byte tag. Each
record's associated data is `gpumesh-ckpt-v2|<tenant>|<checkpoint id>|<entry name>|<plaintext
offset>`, so a record cannot be reordered, moved to another entry, or moved to another
checkpoint or tenant unnoticed. The manifest stays readable (names, shapes, checksums of the
plaintext: listing needs no key), says `extras.encryption` and carries an HMAC-SHA256 of
itself (`extras.encryption.manifest_mac`, key derived from the tenant key with HKDF, bound to
the tenant and the checkpoint id): a changed manifest, or a checkpoint directory copied under
another ID or tenant, is refused (`StoreTampered`) before a byte is sent to a restoring process.
A tenant without a key in `checkpoint_keys_file` gets the same records under a key of the
checkpoint's own: 32 random bytes the control plane draws for it, keeps in etcd beside the
checkpoint record (`/gpumesh/v1/checkpoint-keys/<id>`) and sends only to the agents that write
and restore it (`extras.encryption.key` says which: "tenant" or "checkpoint"). So every stored
checkpoint is authenticated and bound to its tenant and ID; only a tenant key keeps it
confidential from the control plane's operators too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh.checkpoint.format import (CHUNK_BYTES, CheckpointError, EntryMeta, FormatError, Manifest, entry_file,
                                    read_manifest)
from mesh.checkpoint.transfer import DirectorySink, EntryTarget, OutEntry, SendStats, TransferClient

MAGIC = b"GMENC2"
KEY_KINDS = ("tenant", "checkpoint")
_AD = "gpumesh-ckpt-v2"
ALG = "AES-256-GCM"
_LEN = struct.Struct("<I")


class KeyError_(CheckpointError):
    """A tenant key is missing, malformed, or does not open a checkpoint."""


class StoreFull(CheckpointError):
    """A checkpoint would pass what its tenant's checkpoint quota leaves (StoreSink max_bytes)."""


QUOTA_NAME = "checkpoint quota (checkpoint_quota_bytes)"


class StoreTampered(KeyError_):
    """A stored checkpoint's manifest or records do not authenticate under its tenant's key for the
    checkpoint ID asked for (altered, or moved to another ID or tenant); nothing is restored."""


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


def _record_ad(tenant: str, checkpoint_id: str, name: str, offset: int) -> bytes:
    return f"{_AD}|{tenant}|{checkpoint_id}|{name}|{offset}".encode()


def _manifest_mac(key: bytes, tenant: str, checkpoint_id: str, doc: dict[str, Any]) -> str:
    """HMAC-SHA256 of the manifest (without its mac), key = HKDF(tenant key, tenant, checkpoint id)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    mkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"{_AD}|manifest|{tenant}|{checkpoint_id}".encode()).derive(key)
    doc = json.loads(json.dumps(doc))
    doc.get("extras", {}).get("encryption", {}).pop("manifest_mac", None)
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(mkey, canon, hashlib.sha256).hexdigest()


def verify_manifest(path: str, manifest: Manifest, key: bytes, tenant: str, checkpoint_id: str) -> None:
    """Raises StoreTampered unless the encrypted checkpoint's manifest authenticates for this tenant
    and checkpoint ID."""
    enc = manifest.extras.get("encryption") or {}
    mac = str(enc.get("manifest_mac", "")) if isinstance(enc, dict) else ""
    if not mac:
        raise StoreTampered(f"{path}: the manifest carries no authentication code (written by an older build, "
                            f"or altered): refused")
    if not hmac.compare_digest(_manifest_mac(key, tenant, checkpoint_id, manifest.to_json()), mac):
        raise StoreTampered(f"{path}: the manifest does not authenticate as checkpoint {checkpoint_id!r} of tenant "
                            f"{tenant!r} (altered, or moved from another checkpoint or tenant): refused")


class _EncryptedFile:
    """Appends one encrypted record per write; writes must come in order (the transfer resumes
    an entry at the receiver's contiguous offset, so they do)."""

    def __init__(self, path: Path, aead: Any, name: str, tenant: str, checkpoint_id: str) -> None:
        from mesh.fsmodes import private_file
        self.path, self.aead, self.name = path, aead, name
        self.tenant, self.checkpoint_id = tenant, checkpoint_id
        self.written = 0
        with private_file(path) as f:
            f.write(MAGIC)

    def write(self, offset: int, data: memoryview) -> None:
        if offset != self.written:
            raise CheckpointError(f"entry {self.name!r}: encrypted write at byte {offset}, expected {self.written}")
        nonce = os.urandom(12)
        ct = self.aead.encrypt(nonce, bytes(data), _record_ad(self.tenant, self.checkpoint_id, self.name, offset))
        with open(self.path, "ab") as f:
            f.write(_LEN.pack(len(ct)) + nonce + ct)
        self.written += len(data)


class StoreSink(DirectorySink):
    """Receives a checkpoint into the store; encrypts each entry file when given a key (bound to
    `tenant` and `checkpoint_id`). Unlike the plain DirectorySink it also stores the data entries
    (step, RNG, optimizer meta)."""

    def __init__(self, path: str, workload_id: str = "", key: bytes | None = None, tenant: str = "",
                 checkpoint_id: str = "", key_kind: str = "tenant", max_bytes: int = 0) -> None:
        super().__init__(path, workload_id, private=True)      # a process's state: the agents' alone
        if max_bytes < 0:
            raise CheckpointError(f"max_bytes: {max_bytes} (allowed: 0, no limit, or more)")
        self.max_bytes = max_bytes      # what the tenant's checkpoint quota leaves for this one (0: no limit)
        self.declared: dict[str, int] = {}      # entry name -> the size its latest generation declared
        self.refused = ""               # why an entry or the commit passed max_bytes (the agent's answer says it)
        if key_kind not in KEY_KINDS:
            raise KeyError_(f"key_kind: {key_kind!r} (allowed: {', '.join(KEY_KINDS)})")
        self.key = key
        self.key_kind = key_kind
        self.aead = _aead(key) if key else None
        self.tenant = tenant
        self.checkpoint_id = checkpoint_id or Path(path).name

    def _bound(self, what: str, total: int) -> None:
        """Refuse (StoreFull) before anything is written when the checkpoint would hold more than max_bytes."""
        if self.max_bytes and total > self.max_bytes:
            self.refused = (f"{what}: the checkpoint would hold {total} bytes, more than the {self.max_bytes} left "
                            f"of tenant {self.tenant or 'default'!r}'s {QUOTA_NAME}")
            raise StoreFull(self.refused)

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        # the declared size bounds what the entry may take (the receiver refuses bytes past it): sum the latest
        # generation's of every entry, before the file is made
        others = sum(n for name, n in self.declared.items() if name != meta.name)
        self._bound(f"entry {meta.name!r} of {meta.nbytes} bytes", others + meta.nbytes)
        self.declared[meta.name] = meta.nbytes
        if self.aead is None:
            return super().open_entry(meta)
        rel = self.files.setdefault(meta.name, entry_file(len(self.files)))
        return _EncryptedFile(self.writer.tmp / rel, self.aead, meta.name, self.tenant, self.checkpoint_id)

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict[str, Any]:
        # the data entries (held in memory until now) count too: the manifest's size is what the record says
        self._bound("commit", max(manifest.nbytes, sum(self.declared.values()) + sum(len(b) for b in data.values())))
        for name, blob in data.items():
            target = self.open_entry(EntryMeta(name=name, kind="data", nbytes=len(blob)))
            if blob:
                target.write(0, memoryview(blob))
        extras = dict(manifest.extras)
        extras.pop("encryption", None)
        if self.aead is not None:
            extras["encryption"] = {"alg": ALG, "tenant": self.tenant, "checkpoint": self.checkpoint_id,
                                    "key": self.key_kind}
        entries = [EntryMeta(**{**e.to_json(), "file": self.files[e.name]}) for e in manifest.entries]
        manifest = Manifest(workload_id=manifest.workload_id, step=manifest.step, entries=entries,
                            created=manifest.created, extras=extras, checksum=manifest.checksum)
        if self.aead is not None:
            extras["encryption"]["manifest_mac"] = _manifest_mac(self.key, self.tenant, self.checkpoint_id,
                                                                 manifest.to_json())
        out = super().commit(manifest, {})
        return {**out, "step": manifest.step, "bytes": manifest.nbytes,
                "encrypted": self.aead is not None and self.key_kind == "tenant"}


def _plain_chunks(path: Path, start: int, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            b = f.read(chunk_bytes)
            if not b:
                return
            yield b


def _decrypted_chunks(path: Path, aead: Any, name: str, start: int, tenant: str,
                      checkpoint_id: str) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise StoreTampered(f"{path}: not an encrypted checkpoint entry of this format ({MAGIC.decode()})")
        offset = 0
        while True:
            head = f.read(_LEN.size)
            if not head:
                return
            (n,) = _LEN.unpack(head)
            nonce, ct = f.read(12), f.read(n)
            try:
                pt = aead.decrypt(nonce, ct, _record_ad(tenant, checkpoint_id, name, offset))
            except (InvalidTag, ValueError):
                raise StoreTampered(f"checkpoint {checkpoint_id!r} entry {name!r} at byte {offset}: the record does "
                                    f"not authenticate (altered, moved from another checkpoint or tenant, or the "
                                    f"wrong tenant key): refused") from None
            end = offset + len(pt)
            if end > start:
                yield pt[max(0, start - offset):]
            offset = end


def encrypted(manifest: Manifest) -> bool:
    return bool(manifest.extras.get("encryption"))


def push_checkpoint(path: str, client: TransferClient, key: bytes | None = None,
                    chunk_bytes: int = CHUNK_BYTES, tenant: str = "", checkpoint_id: str = "",
                    checkpoint_key: bytes | None = None, allow_plain: bool = False) -> SendStats:
    """Sends the stored checkpoint at `path` through `client` and commits it (the receiver, a
    restoring workload, applies it). Decrypts with the tenant's `key` or the `checkpoint_key`
    (whichever the manifest names), after checking that its manifest authenticates as
    `checkpoint_id` (default: the directory's name) of `tenant`; every record is checked as it is
    read, and the receiver applies nothing before the commit, which follows the last record. A
    checkpoint that is not encrypted is refused unless `allow_plain` (a directory the caller wrote
    itself): the store's are always authenticated."""
    manifest = read_manifest(path)
    root = Path(path)
    checkpoint_id = checkpoint_id or root.name
    aead = None
    if not encrypted(manifest):
        if not allow_plain:
            raise StoreTampered(f"{path}: the checkpoint's manifest says it is neither encrypted nor authenticated "
                                f"(altered, or written by an older build): refused")
    else:
        enc = manifest.extras["encryption"]
        kind = enc.get("key", "tenant") if isinstance(enc, dict) else "tenant"
        use = key if kind == "tenant" else checkpoint_key if kind == "checkpoint" else None
        if not use:
            raise KeyError_(f"{path} is encrypted with the {kind} key (tenant {tenant!r}) and no such key was given"
                            + (": set checkpoint_keys_file" if kind == "tenant" else ""))
        verify_manifest(path, manifest, use, tenant, checkpoint_id)
        aead = _aead(use)
    out = []
    for e in manifest.entries:
        file = root / e.file

        if "/" in e.file.replace("data/", "", 1) or ".." in e.file:
            raise StoreTampered(f"{path}: entry {e.name!r} names the file {e.file!r} outside its data directory")

        def chunks(start: int, file: Path = file, name: str = e.name) -> Iterator[bytes]:
            if aead is not None:
                return _decrypted_chunks(file, aead, name, start, tenant, checkpoint_id)
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

"""The encrypted checkpoint store authenticates what it holds: every record is bound to its tenant,
checkpoint ID, entry and offset, and the manifest carries an HMAC bound to the tenant and the
checkpoint ID. A tampered record, a changed manifest, or a checkpoint (or record) moved to another
ID or tenant is refused with StoreTampered, and the restoring receiver commits nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from mesh.checkpoint.format import EntryMeta, Manifest
from mesh.checkpoint.store import StoreSink, StoreTampered, push_checkpoint
from mesh.checkpoint.transfer import BufferTarget, OutEntry, TransferClient, TransferError, TransferServer

SECRET = bytes(range(32))
KEY = bytes(range(50, 82))
CHUNK = 1000
BLOBS = {"t": bytes(range(256)) * 12, "meta": b'{"step":5,"extras":{}}'}


class Restorer:
    """Stands for the restoring workload: records what it was given and whether it committed."""

    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}
        self.committed: Manifest | None = None
        self.data: dict[str, bytes] = {}

    def open_entry(self, meta: EntryMeta) -> BufferTarget:
        self.buffers[meta.name] = b = bytearray(meta.nbytes)
        return BufferTarget(memoryview(b))

    def commit(self, manifest: Manifest, data: dict) -> dict:
        self.committed, self.data = manifest, data
        return {"step": manifest.step}


@pytest.fixture
def server():
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


def store(server, root, tenant: str, ck: str, key: bytes | None = KEY) -> str:
    """A checkpoint received into the store at root/<tenant>/w/<ck>, as the agent's CHECKPOINT does."""
    path = str(root / tenant / "w" / ck)
    server.expect(f"in-{tenant}-{ck}", StoreSink(path, "w", key=key, tenant=tenant, checkpoint_id=ck), secret=SECRET)
    t = BLOBS["t"]
    out = [OutEntry(EntryMeta(name="t", kind="tensor", nbytes=len(t), dtype="uint8", shape=[len(t)]),
                    lambda start: (memoryview(t)[o:o + CHUNK] for o in range(start, len(t), CHUNK))),
           OutEntry(EntryMeta(name="meta", kind="data", nbytes=len(BLOBS["meta"])),
                    lambda start: [memoryview(BLOBS["meta"])[start:]])]
    with TransferClient(server.address, f"in-{tenant}-{ck}", secret=SECRET, chunk_bytes=CHUNK) as c:
        c.send(out, commit=lambda st: Manifest(workload_id="w", step=5, checksum=c.algo, entries=[
            EntryMeta(name="t", kind="tensor", nbytes=len(t), dtype="uint8", shape=[len(t)],
                      checksum=st.checksums["t"]),
            EntryMeta(name="meta", kind="data", nbytes=len(BLOBS["meta"]), checksum=st.checksums["meta"])]))
    return path


def restore(server, path: str, tenant: str, ck: str, session: str) -> Restorer:
    r = Restorer()
    server.expect(session, r, secret=SECRET)
    with TransferClient(server.address, session, secret=SECRET, chunk_bytes=CHUNK, retries=0) as c:
        push_checkpoint(path, c, KEY, tenant=tenant, checkpoint_id=ck)
    return r


def test_an_intact_checkpoint_restores(server, tmp_path):
    path = store(server, tmp_path, "team-a", "ck-1")
    doc = json.loads(open(f"{path}/manifest.json").read())
    assert doc["extras"]["encryption"]["checkpoint"] == "ck-1" and doc["extras"]["encryption"]["manifest_mac"]
    r = restore(server, path, "team-a", "ck-1", "r1")
    assert r.committed is not None and r.committed.step == 5
    assert bytes(r.buffers["t"]) == BLOBS["t"] and r.data["meta"] == BLOBS["meta"]


def test_a_tampered_record_is_refused_and_nothing_is_restored(server, tmp_path):
    path = store(server, tmp_path, "team-a", "ck-1")
    f = tmp_path / "team-a" / "w" / "ck-1" / "data" / "00000.bin"
    b = bytearray(f.read_bytes())
    b[-20] ^= 0x01                                # the last record of the tensor entry
    f.write_bytes(bytes(b))
    with pytest.raises((StoreTampered, TransferError), match="does not authenticate"):
        restore(server, path, "team-a", "ck-1", "r2")
    assert server.sessions["r2"].committed is None


def test_a_checkpoint_moved_to_another_id_or_tenant_is_refused(server, tmp_path):
    path = store(server, tmp_path, "team-a", "ck-1")
    moved = tmp_path / "team-a" / "w" / "ck-2"
    shutil.copytree(path, moved)                  # a record under another checkpoint's ID
    with pytest.raises(StoreTampered, match="does not authenticate as checkpoint 'ck-2'"):
        restore(server, str(moved), "team-a", "ck-2", "r3")
    assert server.sessions["r3"].committed is None and server.sessions["r3"].entries == {}
    other = tmp_path / "team-b" / "w" / "ck-1"
    shutil.copytree(path, other)                  # another tenant's (same key, to show the binding)
    with pytest.raises(StoreTampered, match="of tenant 'team-b'"):
        restore(server, str(other), "team-b", "ck-1", "r4")
    assert server.sessions["r4"].committed is None


def test_records_swapped_between_checkpoints_are_refused(server, tmp_path):
    """A forged manifest cannot help: with the manifest of ck-2 intact, ck-1's data file in its place
    fails its records' binding to ck-2."""
    a = store(server, tmp_path, "team-a", "ck-1")
    b = store(server, tmp_path, "team-a", "ck-2")
    shutil.copyfile(f"{a}/data/00000.bin", f"{b}/data/00000.bin")
    with pytest.raises((StoreTampered, TransferError), match="does not authenticate"):
        restore(server, b, "team-a", "ck-2", "r5")
    assert server.sessions["r5"].committed is None


def test_a_changed_manifest_is_refused(server, tmp_path):
    path = store(server, tmp_path, "team-a", "ck-1")
    doc = json.loads(open(f"{path}/manifest.json").read())
    doc["step"] = 1000
    open(f"{path}/manifest.json", "w").write(json.dumps(doc))
    with pytest.raises(StoreTampered, match="does not authenticate"):
        restore(server, path, "team-a", "ck-1", "r6")
    doc["extras"]["encryption"].pop("manifest_mac")
    doc["step"] = 5
    open(f"{path}/manifest.json", "w").write(json.dumps(doc))
    with pytest.raises(StoreTampered, match="no authentication code"):
        restore(server, path, "team-a", "ck-1", "r7")
    doc["extras"].pop("encryption")              # claims to be a plain checkpoint of a tenant that has a key
    open(f"{path}/manifest.json", "w").write(json.dumps(doc))
    with pytest.raises(StoreTampered, match="neither encrypted nor authenticated"):
        restore(server, path, "team-a", "ck-1", "r8")


def test_a_tenant_without_a_key_gets_checkpoints_sealed_with_their_own_key(server, tmp_path):
    """No tenant key: the checkpoint is sealed with a key of its own (the control plane's), so it is
    authenticated and bound all the same; without that key it does not restore."""
    from mesh.checkpoint.store import KeyError_
    ck_key = bytes(range(7, 39))
    path = str(tmp_path / "plain" / "w" / "ck-1")
    server.expect("in", StoreSink(path, "w", key=ck_key, tenant="plain", checkpoint_id="ck-1", key_kind="checkpoint"),
                  secret=SECRET)
    t = BLOBS["t"]
    with TransferClient(server.address, "in", secret=SECRET, chunk_bytes=CHUNK) as c:
        done = c.send([OutEntry(EntryMeta(name="t", kind="tensor", nbytes=len(t), dtype="uint8", shape=[len(t)]),
                                lambda start: [memoryview(t)[start:]])],
                      commit=lambda st: Manifest(workload_id="w", step=5, checksum=c.algo, entries=[EntryMeta(
                          name="t", kind="tensor", nbytes=len(t), dtype="uint8", shape=[len(t)],
                          checksum=st.checksums["t"])]))
    assert done.committed["encrypted"] is False      # not with a tenant key (CheckpointInfo.encrypted)
    assert json.loads(open(f"{path}/manifest.json").read())["extras"]["encryption"]["key"] == "checkpoint"
    assert open(f"{path}/data/00000.bin", "rb").read(6) == b"GMENC2"

    def push(p: str, ck: str, session: str, **kw) -> Restorer:
        r = Restorer()
        server.expect(session, r, secret=SECRET)
        with TransferClient(server.address, session, secret=SECRET, chunk_bytes=CHUNK, retries=0) as c:
            push_checkpoint(p, c, None, tenant="plain", checkpoint_id=ck, **kw)
        return r
    assert bytes(push(path, "ck-1", "o1", checkpoint_key=ck_key).buffers["t"]) == t
    with pytest.raises(KeyError_, match="no such key"):
        push(path, "ck-1", "o2")
    moved = tmp_path / "plain" / "w" / "ck-9"
    shutil.copytree(path, moved)
    with pytest.raises(StoreTampered, match="does not authenticate as checkpoint 'ck-9'"):
        push(str(moved), "ck-9", "o3", checkpoint_key=ck_key)
    assert server.sessions["o3"].committed is None

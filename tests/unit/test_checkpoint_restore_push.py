"""The target agent's PUSH_CHECKPOINT (a restore from the store into the restoring workload) sends every
byte on the gRPC stream, never into the shared-memory ring the workload's receiver offers. The ring is
the tenant's own segment: where it lies in the host's /dev/shm (a workload labelled
gpumesh.io/isolation=criu has no mount namespace, or permissive isolation without one) the agent mapped
it and copied into it through the mapping, and the tenant, shrinking its segment during that copy, killed
the agent with SIGBUS."""

from __future__ import annotations

import asyncio
import types

from gpumesh.v1 import migration_service_pb2 as M
from mesh.checkpoint.format import EntryMeta, Manifest
from mesh.checkpoint.store import StoreSink
from mesh.checkpoint.transfer import BufferTarget, OutEntry, TransferClient, TransferServer
from nodeagent.migrate import MigrationAgent
from nodeagent.migrate_base import Job

SECRET = bytes(range(32))
CK_KEY = bytes(range(100, 132))
BLOB = bytes(range(256)) * (64 << 10)       # 16 MiB: large enough that the mesh would be chosen


class Restorer:
    """Stands for the restoring workload's receiver."""

    def __init__(self) -> None:
        self.buf = bytearray(len(BLOB))
        self.committed = None

    def open_entry(self, meta: EntryMeta) -> BufferTarget:
        return BufferTarget(memoryview(self.buf))

    def commit(self, manifest: Manifest, data: dict) -> dict:
        self.committed = manifest
        return {"step": manifest.step}


def stored(server: TransferServer, root) -> None:
    """A checkpoint of workload w-1 in the store at root/t/w-1/ck-1, as the agent's CHECKPOINT writes it."""
    server.expect("in", StoreSink(str(root / "t" / "w-1" / "ck-1"), "w-1", key=CK_KEY, tenant="t",
                                  checkpoint_id="ck-1", key_kind="checkpoint"), secret=SECRET)
    meta = EntryMeta(name="t", kind="tensor", nbytes=len(BLOB), dtype="uint8", shape=[len(BLOB)])
    with TransferClient(server.address, "in", secret=SECRET, mesh="grpc") as c:
        c.send([OutEntry(meta, lambda start: (memoryview(BLOB)[o:o + (4 << 20)] for o in range(start, len(BLOB),
                                                                                            4 << 20)))],
               commit=lambda st: Manifest(workload_id="w-1", step=9, checksum=c.algo, entries=[
                   EntryMeta(**{**meta.to_json(), "checksum": st.checksums["t"]})]))


def _push(tmp_path, server, restorer, outbox: list) -> tuple[MigrationAgent, M.MigrationCommand]:
    """Starts the target agent's PUSH_CHECKPOINT of the stored checkpoint into `restorer`'s session "restore";
    what the agent sends to the control plane is appended to `outbox`."""
    m = MigrationAgent(types.SimpleNamespace(node="n1"), types.SimpleNamespace(workloads={}, meta={}), str(tmp_path))
    m._send = lambda rep: outbox.append(rep)
    m.jobs[("ck-r", "target")] = Job("ck-r", "w-1", address=server.address)
    cmd = M.MigrationCommand(migration_id="ck-r", action=M.MigrationCommand.PUSH_CHECKPOINT, workload_id="w-1",
                             path="t/w-1/ck-1", tenant="t", session="restore", secret=SECRET, checkpoint_key=CK_KEY)
    asyncio.run(m._push_checkpoint(cmd, lambda *a, **k: None))
    return m, cmd


def test_a_restore_never_writes_into_the_workloads_ring(tmp_path):
    server = TransferServer("127.0.0.1:0").start()
    try:
        stored(server, tmp_path)
        restorer = Restorer()
        session = server.expect("restore", restorer, mesh=True, secret=SECRET)    # the workload offers its ring
        assert session.ring is not None
        took, take = [], session.ring.take
        session.ring.take = lambda slot, n: (took.append(n), take(slot, n))[1]
        m, _ = _push(tmp_path, server, restorer, [])
        job = m.jobs[("ck-r", "push")]
        job.thread.join(120)
        assert job.final.event == M.MigrationReport.RESTORED, job.final.message
        assert bytes(restorer.buf) == BLOB and restorer.committed.step == 9
        assert took == [], "the agent wrote into the workload's shared-memory ring"
    finally:
        server.stop(0)


def test_a_repeat_while_the_push_runs_is_answered_with_the_bytes_pushed_so_far(tmp_path):
    """The control plane waits for a restore's push as long as it progresses (controllers/copy_wait.py): each
    repeat of PUSH_CHECKPOINT while the push runs is answered with PROGRESS and the bytes sent so far. Here the
    restoring workload holds its commit, so every byte is sent and the push is still running."""
    import threading
    server = TransferServer("127.0.0.1:0").start()
    release = threading.Event()
    restorer = Restorer()
    commit = restorer.commit
    restorer.commit = lambda manifest, data: (release.wait(60), commit(manifest, data))[1]
    try:
        stored(server, tmp_path)
        server.expect("restore", restorer, secret=SECRET)
        outbox: list = []
        m, cmd = _push(tmp_path, server, restorer, outbox)
        job = m.jobs[("ck-r", "push")]
        for _ in range(600):
            if job.bytes_sent >= len(BLOB):
                break
            job.thread.join(0.1)
        asyncio.run(m._push_checkpoint(cmd, lambda *a, **k: None))      # the control plane asks again
        assert [(r.event, r.bytes) for r in outbox] == [(M.MigrationReport.PROGRESS, len(BLOB))], outbox
        release.set()
        job.thread.join(120)
        assert job.final.event == M.MigrationReport.RESTORED, job.final.message
    finally:
        release.set()
        server.stop(0)

"""Workload records are written on the condition that etcd still holds the record they were computed from (its
mod revision), against a real etcd with the real group-commit writer: a source node's status report computed
before a live migration's commit and written after it no longer puts the workload back on the source, and a
commit that a report went before is computed again rather than rolled back (workloadrecords.py)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migration_phases import P, R
from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.workloadrecords import RECORDS_PER_TXN
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from tests.unit._leader import leader_controller

WID, MID = "w-1", "m-1"


@pytest.fixture
async def world(etcd_server, etcd_client):
    """A leader over etcd holding workload WID running on nA and migration MID copying it to nB."""
    async with leader_controller(etcd_server, "workload-revisions-test") as ctl:
        for name in ("nA", "nB"):
            ctl.fleet.upsert_node(T.Node(name=name, inventory=T.NodeInventory(hostname=name))).ready = True
        # the target's slice, READY (a commit onto a released one rolls back: migration_steps._commit)
        ctl.fleet.put_slice(T.Slice(id="s-b", node="nB", tenant="t", state=T.SLICE_STATE_READY))
        w = T.Workload(id=WID, node="nA", slice_id="s-a", tenant="t", state=T.WORKLOAD_STATE_RUNNING, pid=7)
        m = M.Migration(id=MID, workload_id=WID, tenant="t", source_node="nA", source_slice="s-a", target_node="nB",
                        target_slice="s-b", phase=P.MIGRATION_PHASE_COPYING)
        await etcd_client.put(keys.workload(WID), w.SerializeToString())
        await etcd_client.put(keys.migration(MID), m.SerializeToString())
        wm = WorkloadManager(ctl)
        await wm.load()
        mm = MigrationManager(ctl, wm)
        mm.migrations[MID] = m
        try:
            yield ctl, wm, mm, m
        finally:
            await wm.stop()


def report(pid: int, state: int = T.WORKLOAD_STATE_RUNNING, started: int = 0) -> N.WorkloadStatusReport:
    st = T.Workload(id=WID, state=state, pid=pid)
    if started:
        st.started_at.seconds = started
    return N.WorkloadStatusReport(workloads=[st])


async def in_etcd(etcd_client) -> tuple[T.Workload, int]:
    kv = await etcd_client.get(keys.workload(WID))
    return T.Workload.FromString(kv.value), kv.mod_revision


async def test_a_source_report_written_after_the_commit_leaves_the_workload_on_the_target(world, etcd_client):
    ctl, wm, mm, m = world
    # both run to their writes in this order before the writer takes either: the report is computed from the
    # record on nA (the commit is not adopted yet) and reaches etcd after the commit
    commit = asyncio.create_task(mm._commit(m, M.MigrationReport(migration_id=MID, event=R.RESTORED, step=5)))
    late = asyncio.create_task(wm._report("nA", report(pid=99, state=T.WORKLOAD_STATE_FAILED)))
    await asyncio.wait_for(asyncio.gather(commit, late), 30)
    rec, rev = await in_etcd(etcd_client)
    assert (rec.node, rec.slice_id, rec.state) == ("nB", "s-b", T.WORKLOAD_STATE_RUNNING), rec
    assert rec.pid != 99
    assert wm.workloads[WID] == rec and wm.revisions[WID] == rev
    assert m.phase == P.MIGRATION_PHASE_COMMITTED
    assert wm.conflicts == 1        # the report's write was refused, read back, and found stale
    # a report from nA now changes nothing, and writes nothing
    await wm._report("nA", report(pid=98))
    assert (await in_etcd(etcd_client))[1] == rev


async def test_a_commit_that_a_source_report_went_before_is_computed_again_not_rolled_back(world, etcd_client):
    ctl, wm, mm, m = world
    early = asyncio.create_task(wm._report("nA", report(pid=99, started=1234)))
    commit = asyncio.create_task(mm._commit(m, M.MigrationReport(migration_id=MID, event=R.RESTORED, step=5)))
    await asyncio.wait_for(asyncio.gather(early, commit), 30)
    rec, rev = await in_etcd(etcd_client)
    assert (rec.node, rec.slice_id, rec.state) == ("nB", "s-b", T.WORKLOAD_STATE_RUNNING), rec
    assert m.phase == P.MIGRATION_PHASE_COMMITTED
    # the commit's first write, computed before the report landed, was refused; the second, computed from the
    # report's record, keeps what the report said that is still true (it did not undo the report)
    assert rec.started_at.seconds == 1234
    assert wm.workloads[WID] == rec and wm.revisions[WID] == rev


async def test_concurrent_changes_of_one_record_are_both_kept(world, etcd_client):
    ctl, wm, mm, m = world

    def change(**fields):
        def apply(w: T.Workload) -> T.Workload:
            n = T.Workload()
            n.CopyFrom(w)
            for k, v in fields.items():
                setattr(n, k, v)
            return n
        return apply
    # computed from the same record: the second is refused by etcd and applied again to the first's
    await asyncio.wait_for(asyncio.gather(wm.update([WID], change(pid=42), "a"),
                                          wm.update([WID], change(network_address="10.1.0.2"), "b")), 30)
    rec, rev = await in_etcd(etcd_client)
    assert (rec.pid, rec.network_address, rec.node) == (42, "10.1.0.2", "nA")
    assert wm.workloads[WID] == rec and wm.revisions[WID] == rev and wm.conflicts == 1


async def test_an_update_of_many_records_stays_within_etcds_operations_per_transaction(world, etcd_client):
    """A node's many workloads changed at once (here 150: NotReady, a status report, a node deleted) were one
    transaction of a put each, which etcd refuses past 128 ("too many operations in txn request")."""
    ctl, wm, mm, m = world
    ids = [f"w-many-{i:03d}" for i in range(150)]
    for wid in ids:
        w = T.Workload(id=wid, node="nA", slice_id="s-a", tenant="t", state=T.WORKLOAD_STATE_RUNNING, pid=7)
        await wm.save([w], created=True)

    def lost(w):
        return wm._copy(w, state=T.WORKLOAD_STATE_UNKNOWN, message="node nA NotReady")
    written = await asyncio.wait_for(wm.update(ids, lost, "node NotReady"), 60)
    assert [w.id for w in written] == ids
    for wid in ids:
        kv = await etcd_client.get(keys.workload(wid))
        assert T.Workload.FromString(kv.value).state == T.WORKLOAD_STATE_UNKNOWN


async def test_a_later_transaction_of_an_update_does_not_undo_a_write_made_during_an_earlier_one(world, etcd_client):
    """An update of more than RECORDS_PER_TXN records (a node's status report) writes them a transaction at a
    time; a record of a later transaction was computed before the earlier ones were awaited. A migration's commit
    of that workload written meanwhile must refuse its stale write, not be overwritten by it (the record put back
    on the source): the later transaction is conditioned on the revision the record was computed from."""
    ctl, wm, mm, m = world
    others = [f"w-other-{i:03d}" for i in range(RECORDS_PER_TXN + 5)]
    for wid in others:
        await wm.save([T.Workload(id=wid, node="nA", slice_id="s-x", tenant="t", state=T.WORKLOAD_STATE_RUNNING,
                                  pid=7)], created=True)
    # WID last: it is in the report's second transaction, computed (on nA) before the first one is awaited
    rep = N.WorkloadStatusReport(workloads=[T.Workload(id=wid, state=T.WORKLOAD_STATE_RUNNING, pid=99)
                                            for wid in [*others, WID]])
    # the commit's write is queued first, the report's first transaction right after it (computed before the
    # commit is adopted); the commit is adopted before the report's second transaction is written
    commit = asyncio.create_task(mm._commit(m, M.MigrationReport(migration_id=MID, event=R.RESTORED, step=5)))
    late = asyncio.create_task(wm._report("nA", rep))
    await asyncio.wait_for(asyncio.gather(commit, late), 30)
    rec, rev = await in_etcd(etcd_client)
    assert (rec.node, rec.slice_id, rec.state) == ("nB", "s-b", T.WORKLOAD_STATE_RUNNING), rec
    assert rec.pid != 99
    assert wm.workloads[WID] == rec and wm.revisions[WID] == rev
    for wid in others:      # the report's own changes all written
        kv = await etcd_client.get(keys.workload(wid))
        assert T.Workload.FromString(kv.value).pid == 99, wid


async def test_no_workload_starts_on_a_migrations_target_or_a_slice_being_resized(world):
    """Run did not look at migrations: a tenant could start a workload on the slice a migration copies onto (stopped
    with it when the migration rolls back, sharing it with the migrated one when it commits) or on a slice being
    resized (torn down with the old placement). Both are refused, naming the migration, until it ends."""
    from mesh import errors
    from gpumesh.v1 import workload_service_pb2 as WS
    ctl, wm, mm, m = world
    for sid in ("s-a", "s-b", "s-x"):
        ctl.fleet.put_slice(T.Slice(id=sid, node="nB", tenant="t", state=T.SLICE_STATE_READY))
    with pytest.raises(errors.FailedPrecondition, match=f"slice s-b is the target of migration {MID} \\(copying\\)"):
        await wm.run(WS.RunWorkloadRequest(slice_id="s-b", command=["true"]))
    mm.migrations["m-2"] = M.Migration(id="m-2", tenant="t", source_slice="s-x", resize_slice="s-x", target_slice="s-r",
                                       reason="resize", phase=P.MIGRATION_PHASE_PLANNED)
    with pytest.raises(errors.FailedPrecondition, match="slice s-x is being resized \\(migration m-2, planned\\)"):
        await wm.run(WS.RunWorkloadRequest(slice_id="s-x", command=["true"]))
    started = await wm.run(WS.RunWorkloadRequest(slice_id="s-a", command=["true"]))     # the source: as before
    assert started.slice_id == "s-a"
    m.phase = P.MIGRATION_PHASE_DONE
    assert (await wm.run(WS.RunWorkloadRequest(slice_id="s-b", command=["true"]))).slice_id == "s-b"

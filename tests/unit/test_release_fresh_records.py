"""A release builds its RELEASING records from the slices as they are once its hooks are done, against a real
etcd with the real group-commit writer and workload manager. The hook (stopping the workload on the slice) awaits
its agent; meanwhile another task may change the slice (its agent's status report, a resize in place) or release
it and see it deleted. The release used to write RELEASING built from the copies it read before the hook: the
change made meanwhile was undone in memory and in etcd (a resize's memory_bytes back to the old size, under-
counting the GPU), and a slice deleted meanwhile came back in the fleet as a READY ghost holding its GPU."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from mesh import gpumodels
from tests.unit._leader import leader_controller
from tests.unit._wait import until

GiB = 1 << 30
NODE, SID, AID, WID = "nA", "s-1", "a-1", "w-1"


class Session:
    """The node's agent stream: what the control plane sends it is kept, nothing answers by itself."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def send_upserts(self, slices, revision) -> None:
        self.sent.append(("upserts", [s.id for s in slices]))

    def send_removals(self, ids, revision) -> None:
        self.sent.append(("removals", list(ids)))


@pytest.fixture
async def world(etcd_server, etcd_client):
    """A leader over etcd: slice SID (MPS, 4 GiB, READY) on NODE's L4, workload WID running on it, the agent
    connected."""
    async with leader_controller(etcd_server, "release-fresh-records-test", release_timeout=30.0) as ctl:
        l4 = gpumodels.get_model("L4")
        inv = T.NodeInventory(hostname=NODE)
        inv.gpus.add(index=0, uuid="GPU-0", model=l4.name, memory_bytes=l4.memory_mib << 20)
        ctl.fleet.upsert_node(T.Node(name=NODE, inventory=inv)).ready = True
        s = T.Slice(id=SID, allocation_id=AID, tenant="t", node=NODE, gpu_index=0, gpu_uuid="GPU-0", gpu_model=l4.name,
                    isolation=T.ISOLATION_MPS, memory_bytes=4 * GiB, compute_share=0.25, state=T.SLICE_STATE_READY,
                    device_uuid="MPS-old")
        w = T.Workload(id=WID, node=NODE, slice_id=SID, tenant="t", state=T.WORKLOAD_STATE_RUNNING, pid=7)
        await etcd_client.put(keys.slice_(SID), s.SerializeToString())
        await etcd_client.put(keys.workload(WID), w.SerializeToString())
        ctl.fleet.put_slice(s)
        wm = WorkloadManager(ctl)
        await wm.load()
        mm = MigrationManager(ctl, wm)
        session = ctl.sessions.by_node[NODE] = Session()
        try:
            yield ctl, wm, mm, session
        finally:
            await wm.stop()


def stop_sent(session: Session) -> bool:
    return any(isinstance(m, N.ControllerMessage) and WID in m.workloads.stop for m in session.sent)


async def workload_stopped(wm: WorkloadManager) -> None:
    await wm._report(NODE, N.WorkloadStatusReport(workloads=[T.Workload(id=WID, state=T.WORKLOAD_STATE_STOPPED)]))


async def in_etcd(etcd_client) -> T.Slice | None:
    kv = await etcd_client.get(keys.slice_(SID))
    return None if kv is None else T.Slice.FromString(kv.value)


async def test_changes_made_while_the_workload_stops_survive_the_release(world, etcd_client):
    ctl, wm, mm, session = world
    release = asyncio.create_task(ctl.release(AID, wait=True, message="released by its tenant"))
    await until(lambda: stop_sent(session), "the release hook to ask the agent to stop the workload")
    # while the hook waits for the agent: the slice is resized in place, and its agent reports a new device
    resized = await asyncio.wait_for(mm.resize(SID, 8 * GiB, 0.0), 20)
    assert resized.memory_bytes == 8 * GiB
    await asyncio.wait_for(ctl.report(NODE, False, [N.SliceStatus(slice_id=SID, state=T.SLICE_STATE_READY,
                                                                  device_uuid="MPS-new")], []), 20)
    assert not release.done()
    await workload_stopped(wm)
    await until(lambda: ctl.fleet.slices[SID].state == T.SLICE_STATE_RELEASING, "the release to be written")
    await until(lambda: ("removals", [SID]) in session.sent, "the agent to be told to tear the slice down")
    rec = await in_etcd(etcd_client)
    assert rec.state == T.SLICE_STATE_RELEASING and rec.message == "released by its tenant"
    assert (rec.memory_bytes, rec.device_uuid) == (8 * GiB, "MPS-new"), rec
    assert ctl.fleet.slices[SID] == rec
    assert ctl.fleet.gpu(NODE, 0).allocated_memory == 8 * GiB       # the GPU counts what the slice holds
    await asyncio.wait_for(ctl.report(NODE, False, [], [SID]), 20)   # torn down: the release's wait ends
    await asyncio.wait_for(release, 20)
    assert await in_etcd(etcd_client) is None


async def test_a_slice_released_and_deleted_meanwhile_does_not_come_back(world, etcd_client):
    ctl, wm, mm, session = world
    first = asyncio.create_task(ctl.release(AID, wait=True))
    await until(lambda: stop_sent(session), "the first release to ask the agent to stop the workload")
    # another release (a preemption: it does not wait for the stop) goes through, and the agent tears the slice
    # down and says so: the record is deleted
    await asyncio.wait_for(ctl.release(AID, wait=False, message="preempted"), 20)
    await asyncio.wait_for(ctl.report(NODE, False, [], [SID]), 20)
    assert SID not in ctl.fleet.slices and await in_etcd(etcd_client) is None
    await workload_stopped(wm)
    await asyncio.wait_for(first, 20)     # nothing left to release: it ends without writing
    assert SID not in ctl.fleet.slices and await in_etcd(etcd_client) is None
    assert ctl.fleet.gpu(NODE, 0).allocated_memory == 0 and not ctl.fleet.slices_of(AID)

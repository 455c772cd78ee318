"""One migration has one writer of its record: its state machine (`_drive`), one step after another. A resize by
migration reserves its target slice before that state machine starts (resize.py `_reserve`, which writes the
record too); a node deletion meanwhile (`end_for_node`) used to start a state machine for it at once, since no task
was registered yet: two writers of one record, each building on its own copy. Against a real etcd with the real
writer: the second one rolled the migration back while the reservation still waited for its target, and the
reservation then wrote its own rollback over the ABORTED record (ABORTED -> ROLLING_BACK -> ABORTED, its
phases' events and metrics twice). Now a node deletion waits for the reservation, which starts the one state
machine."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from mesh import errors, gpumodels
from tests.unit._leader import leader_controller
from tests.unit._wait import until

GiB = 1 << 30
SID = "s-x"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def emit(self, kind, name, type_, reason, *args, **kw) -> None:
        self.events.append((kind, name, reason))


@pytest.fixture
async def world(etcd_server, etcd_client):
    """A leader over etcd: nodes nA and nB with an L4 each, slice SID held exclusively on nA's (no workload), no
    agent connected (a target slice stays PENDING until the ready timeout)."""
    async with leader_controller(etcd_server, "migration-single-driver-test", recorder=Recorder(),
                                 ready_timeout=2.0) as ctl:
        l4 = gpumodels.get_model("L4")
        for name in ("nA", "nB"):
            inv = T.NodeInventory(hostname=name)
            inv.gpus.add(index=0, uuid=f"GPU-{name}", model=l4.name, memory_bytes=l4.memory_mib << 20)
            ctl.fleet.upsert_node(T.Node(name=name, inventory=inv)).ready = True
        s = T.Slice(id=SID, allocation_id="a-x", tenant="t", node="nA", gpu_index=0, gpu_uuid="GPU-nA",
                    gpu_model=l4.name, isolation=T.ISOLATION_EXCLUSIVE, memory_bytes=l4.memory_mib << 20,
                    compute_share=1.0, state=T.SLICE_STATE_READY)
        await etcd_client.put(keys.slice_(SID), s.SerializeToString())
        ctl.fleet.put_slice(s)
        wm = WorkloadManager(ctl)
        await wm.load()
        mm = MigrationManager(ctl, wm)
        try:
            yield ctl, wm, mm
        finally:
            await mm.stop()
            await wm.stop()


async def test_a_node_deleted_while_a_resize_reserves_its_target_starts_no_second_state_machine(world, etcd_client):
    ctl, wm, mm = world
    resize = asyncio.create_task(mm.resize(SID, 16 * GiB, 0.0))

    def reserved() -> M.Migration | None:
        return next((m for m in mm.migrations.values() if m.resize_slice == SID and m.target_slice), None)
    await until(lambda: reserved() is not None, "the resize to reserve its target")
    m = reserved()
    assert ctl.fleet.slices[m.target_slice].state == T.SLICE_STATE_PENDING    # waiting for its agent
    ctl.deleted_nodes.add("nA")
    assert await asyncio.wait_for(mm.end_for_node("nA", 20.0), 30) == [m.id]
    with pytest.raises(errors.FailedPrecondition, match="failed"):
        await asyncio.wait_for(resize, 30)
    phases = [r for kind, name, r in ctl.recorder.events if kind == "Migration" and name == m.id]
    assert phases == ["MigrationPlanned", "MigrationRollingBack", "MigrationAborted"], phases
    rec = M.Migration.FromString((await etcd_client.get(keys.migration(m.id))).value)
    assert rec.phase == M.MIGRATION_PHASE_ABORTED and mm.migrations[m.id].phase == M.MIGRATION_PHASE_ABORTED
    assert ctl.fleet.slices[m.target_slice].state == T.SLICE_STATE_RELEASING    # the reserved target is let go
    assert not mm.tasks

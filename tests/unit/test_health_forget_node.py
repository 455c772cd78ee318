"""HealthController.forget_node (a deleted node, controllers/nodedelete.py) ends the tasks moving workloads off
the node's unhealthy GPUs, but never cuts a migration's planning short: `MigrationManager.migrate` writes the
migration's record and only then adopts and starts it. A cancel between the two left a PLANNED record in etcd
that this leader neither knew (no deletion step ended it) nor drove."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.controllers.healthpolicy import HealthPolicy
from controlplane.controllers.telemetry import Policy, TelemetryManager
from gpumesh.v1 import types_pb2 as t
from tests.unit._wait import until
from tests.unit.test_placement import make_fleet


class Planning:
    """`migrate` as the migration manager runs it: the record's write (awaited), then its adoption."""

    def __init__(self) -> None:
        self.wm = SimpleNamespace(workloads={})
        self.migrations: dict = {}
        self.writing = asyncio.Event()          # the record's write is under way
        self.written = asyncio.Event()          # ... and etcd took it
        self.tasks: dict = {}

    def active_for(self, wid):
        return None

    async def migrate(self, wid, to_node="", to_slice="", mode=0, reason="migrate"):
        self.writing.set()
        await self.written.wait()
        m = SimpleNamespace(id=f"m-{wid}")
        self.migrations[m.id] = m               # adopted (and started) once written
        return m


async def test_a_deletion_does_not_cut_a_migration_s_planning_in_two():
    fleet = make_fleet(("n1", [("H100-80GB", False)]))
    s = t.Slice(id="s-1", node="n1", gpu_index=0, state=t.SLICE_STATE_READY)
    fleet.put_slice(s)
    mm = Planning()
    mm.wm.workloads["w-1"] = t.Workload(id="w-1", slice_id="s-1", node="n1", state=t.WORKLOAD_STATE_RUNNING)
    events = []
    ctl = SimpleNamespace(fleet=fleet, migrations=mm, sessions=SimpleNamespace(get=lambda node: None),
                          agent_handlers={})
    tm = TelemetryManager(ctl, Policy(health=HealthPolicy()))
    tm.record = lambda node, kind, reason, text, index=None: events.append((node, reason))
    h = tm.health
    g = fleet.gpu("n1", 0)
    g.health = "unhealthy"
    h._migrate_off(g, h.rec(g))
    (task,) = h.tasks
    await asyncio.wait_for(mm.writing.wait(), 30)

    assert h.forget_node("n1") == 1                       # mid-write: the task ends, the write's adoption does not
    mm.written.set()
    await until(task.done, "the health task to end", timeout=30.0)
    await until(lambda: "m-w-1" in mm.migrations, "the migration written to be adopted", timeout=30.0)
    assert task.cancelled() and h.tasks == set() and h.task_nodes == {}
    assert events == []                                   # nothing recorded on the deleted node

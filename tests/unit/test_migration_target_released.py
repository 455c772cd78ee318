"""A migration whose target slice was released before its commit (its client's Release of a named target slice,
answered OK; a preemption; the reserved slice let go) rolls back: the source stays the workload.

Committed onto a RELEASING (or deleted) slice, the workload's record named a slice whose agent tears it down,
killing the target process, while the commit's STOP_SOURCE stopped the source: the workload ran nowhere.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import P
from gpumesh.v1 import types_pb2
from tests.unit.test_migration_durability import (CROSS_NODE, MID, WID, Agent, Etcd, manager, migration,
                                                  running_on_source, start, wait_for)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeats (the product's are seconds); nothing here depends on timing."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)


def slice_(sid: str, node: str, state: int) -> types_pb2.Slice:
    return types_pb2.Slice(id=sid, node=node, tenant="t", state=state)


@pytest.mark.parametrize("target", ["releasing", "deleted"])
def test_a_migration_whose_target_slice_was_released_rolls_back_and_the_source_runs_on(target):
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        mm.ctl.fleet = types.SimpleNamespace(slices={"s-a": slice_("s-a", "nA", types_pb2.SLICE_STATE_READY)})
        if target == "releasing":       # its Release answered OK, the agent about to tear it down
            mm.ctl.fleet.slices["s-b"] = slice_("s-b", "nB", types_pb2.SLICE_STATE_RELEASING)
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase in (P.MIGRATION_PHASE_DONE, P.MIGRATION_PHASE_ABORTED),
                       "the migration's end")
        assert "STOP_SOURCE" not in a.actions(), "the source was stopped though the target's slice is released"
        assert "RESUME_TARGET" not in b.actions()
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED
        assert "ABORT_SOURCE" in a.actions() and "STOP_TARGET" in b.actions()
        assert etcd.workload().node == "nA" and etcd.workload().slice_id == "s-a"
        assert wm.workloads[WID].node == "nA"
        assert "s-b" in mm.migrations[MID].message
    asyncio.run(main())

"""A Stop of the workload, acknowledged while it migrates, is not undone by the commit.

The commit wrote the record on the target RUNNING ("migrated from ...") and dropped the workload from the
workload manager's `stopping`, so the target was resumed and ran on: the Stop, answered OK (its command perhaps never
delivered, the source's agent away, or the source's end reported after the commit and ignored as from a node that no
longer holds the workload), was lost. Now a workload being stopped is not committed: the migration rolls back, and
the Stop ends the workload where it is.
"""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import P
from tests.unit.test_migration_durability import (CROSS_NODE, MID, WID, Agent, Etcd, manager, migration,
                                                  running_on_source, start, wait_for)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeats (the product's are seconds); nothing here depends on timing."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)


def test_a_workload_stopped_while_it_migrates_is_not_committed_and_not_resumed_on_the_target():
    async def main():
        etcd = Etcd()
        w = running_on_source()
        w.message = "stopping"              # Stop's mark (workloads.STOPPING), the stop sent to nA
        mm, sessions, wm = manager(etcd, w)
        wm.stopping.add(WID)
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase in (P.MIGRATION_PHASE_DONE, P.MIGRATION_PHASE_ABORTED),
                       "the migration's end")
        assert "RESUME_TARGET" not in b.actions(), "the target was resumed though the workload was being stopped"
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED
        assert "STOP_TARGET" in b.actions()
        assert etcd.workload().node == "nA"
        assert WID in wm.stopping
    asyncio.run(main())

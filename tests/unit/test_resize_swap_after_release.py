"""SWAP_SLICES asked again after the resize's old placement was released (a control plane restarted between the
release of the old placement and the DONE write asks for the swap again, with that record RELEASING).

The agent had torn the old placement down: the swap asked again found no instance at its placement and failed
(MIG), so the restarted control plane asked it forever (the resize stuck COMMITTED: the slice refused every later
resize, the workload every migration); meanwhile the RELEASING record was kept (the control plane's swap guard
passed over its absence in the agent's full report). A slice being released is never realized again by a swap,
and one the agent no longer holds is reported released.
"""

from __future__ import annotations

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from tests.unit.test_migration_swap import NEW, OLD, agent_with, mig_slice, swap


def records(old_state: int) -> list[t.Slice]:
    x = mig_slice("s-x", "a", "3g.40gb", 4)          # the client's ID at the new placement
    old = mig_slice("s-t", "a", "1g.10gb", 0)        # the reserved slice's ID at the old placement
    x.state, old.state = t.SLICE_STATE_READY, old_state
    return [x, old]


def test_a_swap_asked_again_after_the_old_placement_was_torn_down_answers_swapped_and_reports_it_released():
    ma, sent = agent_with("a", {"s-x": OLD, "s-t": NEW})
    assert swap(ma, records(t.SLICE_STATE_READY)) == [M.MigrationReport.SLICES_SWAPPED]
    # the old placement released and torn down (nodeagent/agent.py removals)
    ma.agent.slicer.mig.pop("s-t")
    ma.agent.desired.pop("s-t")
    ma.agent.realized.pop("s-t")
    sent.clear()
    assert swap(ma, records(t.SLICE_STATE_RELEASING)) == [M.MigrationReport.SLICES_SWAPPED]
    assert ma.agent.slicer.mig == {"s-x": NEW}
    assert "s-t" not in ma.agent.desired and "s-t" not in ma.agent.realized
    assert [list(m.report.released) for m in sent] == [["s-t"]]
    assert [s.slice_id for m in sent for s in m.report.statuses] == ["s-x"]


def test_a_swap_naming_a_record_being_released_renames_it_but_never_realizes_it_again():
    ma, sent = agent_with("a", {"s-x": OLD, "s-t": NEW})
    assert swap(ma, records(t.SLICE_STATE_RELEASING)) == [M.MigrationReport.SLICES_SWAPPED]
    # the instance at the old placement carries the released record's name, for its removal to tear it down
    assert ma.agent.slicer.mig == {"s-x": NEW, "s-t": OLD}
    assert "s-t" not in ma.agent.desired and "s-t" not in ma.agent.realized
    assert ma.agent.realized["s-x"].device_uuid == "MIG-new"

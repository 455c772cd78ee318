"""A resize's reserved slice is not released by anyone else between the commit and the resize's own release of
it (controllers/resize.py `_refuse_old_placement`). The commit writes the old placement under the reserved
slice's ID while the agent still names the new placement by it until SWAP_SLICES: an admin's (or its tenant's:
the slice is visible) Release of it in between sent its removal to the agent, which tore down the new placement,
the one the client's slice and its workload now hold. A release before the commit still rolls the resize back."""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.controllers.migration_phases import P
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit.test_resize_release_race import FailingCommit
from tests.unit.test_resize_swap_reports import _controller, _manager, _slice


def _session(removed: list):
    return types.SimpleNamespace(send_removals=lambda ids, rev: removed.extend(ids),
                                 send_upserts=lambda *a, **k: None, send=lambda msg: None)


def _resize_on_nA(write=None):
    """A resize of s-x (GPU-0) into the reserved s-t (GPU-1) on node nA, planned; the removals sent to nA's agent
    are in `removed`; `write`: the etcd writer's stand-in, when given."""
    ctl = _controller({"nA": ["GPU-0", "GPU-1"]})
    removed: list[str] = []
    ctl.sessions.by_node["nA"] = _session(removed)
    if write is not None:
        ctl.writer.write = write
    mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
    return ctl, removed, mm, m


def test_the_reserved_slice_of_a_committed_resize_is_released_only_by_the_resize():
    async def main():
        ctl, removed, mm, m = _resize_on_nA()
        await mm._commit_idle_resize(m)
        assert mm.migrations[m.id].phase == P.MIGRATION_PHASE_COMMITTED
        # the agent on nA still holds s-t at GPU-1 (the new placement) until it answers SWAP_SLICES
        assert ctl.fleet.slices["s-t"].device_uuid == "GPU-0" and ctl.fleet.slices["s-x"].device_uuid == "GPU-1"
        with pytest.raises(errors.FailedPrecondition, match="s-t is the old placement of slice s-x.*m-1"):
            await ctl.release("s-t", wait=False, message="released by an admin")
        with pytest.raises(errors.FailedPrecondition, match="s-t"):
            await ctl.release("a-s-t", wait=False)      # by its allocation
        assert removed == [] and ctl.fleet.slices["s-t"].state == T.SLICE_STATE_READY
        await mm._release_old_placement(mm.migrations[m.id])       # after the swap: the resize's own release
        assert removed == ["s-t"] and ctl.fleet.slices["s-t"].state == T.SLICE_STATE_RELEASING
        assert not mm.releasing_old
    asyncio.run(main())


def test_a_release_while_the_commit_is_written_is_refused():
    """The fleet holds the swapped records from the commit's write on (its retry after a failed write included)."""
    async def main():
        etcd = FailingCommit()
        ctl, removed, mm, m = _resize_on_nA(etcd.write)
        commit = asyncio.create_task(mm._commit_idle_resize(m))
        await asyncio.wait_for(etcd.commit_waiting.wait(), 20)
        assert ctl.fleet.slices["s-t"].device_uuid == "GPU-0"
        with pytest.raises(errors.FailedPrecondition, match="s-t"):
            await ctl.release("s-t", wait=False)
        etcd.fail.set()
        await asyncio.wait_for(commit, 20)          # written by its retry
        assert removed == [] and ctl.fleet.slices["s-t"].state == T.SLICE_STATE_READY
        assert etcd.records["s-t"].state == T.SLICE_STATE_READY
    asyncio.run(main())


def test_a_release_of_the_reserved_slice_before_the_commit_passes():
    async def main():
        ctl, removed, mm, m = _resize_on_nA()
        await ctl.release("s-t", wait=False)
        assert removed == ["s-t"]
    asyncio.run(main())

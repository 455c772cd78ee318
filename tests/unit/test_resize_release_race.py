"""A resize's commit never brings back a slice that was released while the resize ran. The commit swaps the two
records (controllers/resize.py `_swapped`): the client's ID takes the reserved slice's placement and state. A
release of the client's slice before the commit (its tenant, a preemption, a drain) left it RELEASING, and the
commit wrote it READY at the new placement: the release, answered OK, was undone and the slice held for good. Now
the commit refuses a slice being released (the resize rolls back, the release goes on)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migration_phases import StepFailed
from gpumesh.v1 import types_pb2 as T
from tests.unit.test_resize_swap_reports import _controller, _manager, _slice


def test_a_slice_released_before_the_commit_stays_released():
    async def main():
        ctl = _controller({"nA": ["GPU-0", "GPU-1"]})
        mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
        await ctl.release("s-x", wait=False, message="preempted")
        with pytest.raises(StepFailed, match="s-x.*released"):
            await mm._commit_idle_resize(m)
        x = ctl.fleet.slices["s-x"]
        assert (x.state, x.device_uuid, x.message) == (T.SLICE_STATE_RELEASING, "GPU-0", "preempted")
        assert ctl.fleet.slices["s-t"].device_uuid == "GPU-1"
    asyncio.run(main())


class FailingCommit:
    """The writer's `write`: the first commit of the migration waits for `fail` and then fails as an etcd outage
    does (nothing applied); every other write succeeds. `records` keeps each slice's last written record."""

    def __init__(self) -> None:
        self.commit_waiting = asyncio.Event()
        self.fail = asyncio.Event()
        self.failed = False
        self.records: dict[str, T.Slice] = {}

    async def write(self, ops, conds=()):
        if not self.failed and any(b"/migrations/" in op.key for op in ops):
            self.failed = True
            self.commit_waiting.set()
            await self.fail.wait()
            from mesh import errors
            raise errors.Unavailable("etcd: no leader")
        for op in ops:
            if b"/slices/" in op.key and getattr(op, "value", None):
                s = T.Slice.FromString(op.value)
                self.records[s.id] = s
        await asyncio.sleep(0)
        return 7


def test_a_release_built_on_a_commit_that_failed_is_not_undone_by_the_retry():
    """The release lands while the commit's write is in flight: built on the swapped records the commit put in the
    fleet, and written (a later transaction) though the commit then fails. The failed commit put both prior records
    back over it (READY, the release gone from memory), and its retry wrote the client's slice READY: the release,
    answered OK, undone. Now the put-back keeps the release in the prior placement's record (written, as etcd has
    the swapped one) and the retry refuses the released slice."""
    async def main():
        ctl = _controller({"nA": ["GPU-0", "GPU-1"]})
        etcd = FailingCommit()
        ctl.writer.write = etcd.write
        mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
        commit = asyncio.create_task(mm._commit_idle_resize(m))
        await asyncio.wait_for(etcd.commit_waiting.wait(), 20)
        assert ctl.fleet.slices["s-x"].device_uuid == "GPU-1"        # swapped in the fleet while it is written
        await ctl.release("s-x", wait=False, message="preempted")
        assert etcd.records["s-x"].state == T.SLICE_STATE_RELEASING
        etcd.fail.set()
        with pytest.raises(StepFailed, match="s-x.*released"):
            await asyncio.wait_for(commit, 20)
        for x in (ctl.fleet.slices["s-x"], etcd.records["s-x"]):
            assert (x.state, x.device_uuid, x.message) == (T.SLICE_STATE_RELEASING, "GPU-0", "preempted"), x
        t = ctl.fleet.slices["s-t"]
        assert (t.state, t.device_uuid) == (T.SLICE_STATE_READY, "GPU-1")
    asyncio.run(main())

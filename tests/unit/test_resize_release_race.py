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

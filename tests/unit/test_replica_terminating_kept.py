"""A replica marked TERMINATING stays TERMINATING: a write of a copy read before the mark keeps the mark.

`meshctl recommend --apply` removes the idle replica it lists by marking it TERMINATING (ScalingOps.remove_replica)
while the controller's pass may hold a copy of the same replica read earlier: a migrated replica's record following
its workload (replicamove.follow awaits the old slice's release first) or a crashed backend's FAILED record
(Actuator.failed awaits the workload's log first). Written whole, that copy put the replica back to READY or FAILED:
the mark was lost, and the controller then picked which replica to remove itself (the newest READY one), not the
one listed. The store keeps the mark (and its message) and takes the rest of the copy (the slice it moved to)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.serving.deploystore import DeploymentStore
from controlplane.state import keys
from gpumesh.v1 import deployment_service_pb2 as D


class _Writer:
    """`ctl.writer.write(ops)` over a dict; `hold` (an Event) keeps a write waiting until it is set."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.hold: asyncio.Event | None = None

    async def write(self, ops, conditions=()) -> int:
        hold, self.hold = self.hold, None
        if hold is not None:
            await hold.wait()
        for op in ops:
            self.kv[op.key] = op.value
        return 1


def _store() -> tuple[DeploymentStore, _Writer]:
    w = _Writer()
    st = DeploymentStore(SimpleNamespace(writer=w, store=None))
    st.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat", replicas=1), generation=2)
    return st, w


def _durable(w: _Writer, rid: str = "r-1") -> D.Replica:
    return D.Replica.FromString(w.kv[keys.replica("chat", rid)])


async def test_a_copy_read_before_the_mark_keeps_the_mark_and_takes_the_move():
    st, w = _store()
    ready = D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, slice_id="s-old")
    await st.put_replica(ready)
    marked = D.Replica()
    marked.CopyFrom(ready)
    marked.state, marked.message = D.REPLICA_STATE_TERMINATING, "removed: idle (meshctl recommend --apply)"
    await st.put_with_replica(st.deployments["chat"], marked)
    moved = D.Replica()
    moved.CopyFrom(ready)                       # the pass's copy, read before the mark
    moved.slice_id = "s-new"
    await st.put_replica(moved)
    for r in (st.replicas["chat"]["r-1"], _durable(w)):
        assert r.state == D.REPLICA_STATE_TERMINATING and r.message.startswith("removed: idle")
        assert r.slice_id == "s-new"           # where it runs now: its removal releases that slice


async def test_a_mark_written_while_the_copy_is_written_is_kept():
    """The mark lands while the copy's own write waits: the copy's write may be the later one in etcd, so the
    store writes the mark again."""
    st, w = _store()
    ready = D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, slice_id="s-old")
    await st.put_replica(ready)
    failed = D.Replica()
    failed.CopyFrom(ready)
    failed.state = D.REPLICA_STATE_FAILED
    held = w.hold = asyncio.Event()
    copy_write = asyncio.ensure_future(st.put_replica(failed))
    await asyncio.sleep(0)                      # the copy's write now waits
    marked = D.Replica()
    marked.CopyFrom(ready)
    marked.state, marked.message = D.REPLICA_STATE_TERMINATING, "removed: idle"
    await st.put_with_replica(st.deployments["chat"], marked)
    held.set()                                  # the copy's write lands after the mark's
    await copy_write
    for r in (st.replicas["chat"]["r-1"], _durable(w)):
        assert r.state == D.REPLICA_STATE_TERMINATING and r.message == "removed: idle"

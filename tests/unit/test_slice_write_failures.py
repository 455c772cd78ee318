"""A slice change that etcd did not take leaves the fleet as etcd has it: a failed Release can be retried,
a failed preempting Allocate leaves no slice behind and its victim as it was, and a failed Allocate never
drops the request id of a concurrent call that owns it."""

import asyncio
from types import SimpleNamespace as NS

import pytest

from controlplane.controllers.slices import Controller
from controlplane.state import keys
from gpumesh.v1 import types_pb2 as T
from mesh import errors, slicespec


def _controller():
    ctl = Controller(store=None)
    ctl.fleet.upsert_node(T.Node(name="n1", inventory=T.NodeInventory(
        gpus=[T.Gpu(index=0, uuid="GPU-1", model="A100-80GB")])))
    return ctl


def _slice(sid: str, tenant: str = "t") -> T.Slice:
    return T.Slice(id=sid, allocation_id="a-" + sid, tenant=tenant, node="n1", gpu_uuid="GPU-1", gpu_index=0,
                   gpu_model="A100-80GB", isolation=T.ISOLATION_MPS, memory_bytes=1 << 30, compute_share=0.1,
                   state=T.SLICE_STATE_READY)


class Etcd:
    """The writer's stand-in: fails the next `fail` writes with etcd's UNAVAILABLE, then takes them."""

    def __init__(self, fail: int) -> None:
        self.fail, self.writes = fail, []

    async def write(self, ops, conds=()):
        self.writes.append([o.key for o in ops])
        if self.fail:
            self.fail -= 1
            raise errors.Unavailable("etcd: deadline exceeded")
        return 7


async def test_release_whose_write_fails_leaves_the_slice_ready_and_a_retry_writes_it():
    ctl = _controller()
    ctl.fleet.put_slice(_slice("s-1"))
    etcd = Etcd(fail=1)
    ctl.writer.write = etcd.write
    with pytest.raises(errors.Unavailable):
        await ctl.release("s-1", wait=True)
    assert ctl.fleet.slices["s-1"].state == T.SLICE_STATE_READY       # as etcd has it
    assert not ctl.gone_waiters                                          # no waiter left behind
    out = await ctl.release("s-1", wait=False)
    assert [s.state for s in out] == [T.SLICE_STATE_RELEASING]
    assert len(etcd.writes) == 2                                         # the retry wrote it


async def test_node_lost_whose_write_fails_leaves_the_slices_as_they_were():
    ctl = _controller()
    ctl.fleet.put_slice(_slice("s-1"))
    ctl.writer.write = Etcd(fail=1).write
    with pytest.raises(errors.Unavailable):
        await ctl.mark_node_lost("n1", "heartbeat missed")
    assert ctl.fleet.slices["s-1"].state == T.SLICE_STATE_READY
    await ctl.mark_node_lost("n1", "heartbeat missed")
    assert ctl.fleet.slices["s-1"].state == T.SLICE_STATE_UNKNOWN


def _preempting(ctl) -> slicespec.SliceRequest:
    choice = NS(node="n1", gpu_uuid="GPU-1", gpu_index=0, gpu_model="A100-80GB", isolation="mps", profile="",
                memory_bytes=1 << 30, compute_share=0.1, start=0, size=0, cpu_milli=0, host_memory_bytes=0)
    ctl.scheduler = NS(schedule=lambda req, fleet: NS(ok=True, choices=[choice], victims=["s-victim"]))
    return slicespec.validate(T.SliceSpec(tenant="hi", memory_bytes=1 << 30, isolation=T.ISOLATION_MPS, count=1,
                                          priority=10))


@pytest.mark.parametrize("fail", [1, 2], ids=["victim-release-fails", "allocation-write-fails"])
async def test_failed_preempting_allocate_leaves_no_slice_in_memory(fail):
    ctl = _controller()
    ctl.fleet.put_slice(_slice("s-victim", tenant="low"))
    req = _preempting(ctl)
    etcd = Etcd(fail=fail if fail == 1 else 0)
    if fail == 2:      # the victim's release is durable, the allocation's own write is not
        async def write(ops, conds=()):
            etcd.writes.append([o.key for o in ops])
            if len(etcd.writes) == 2:
                raise errors.Unavailable("etcd: deadline exceeded")
            return 7
        ctl.writer.write = write
    else:
        ctl.writer.write = etcd.write
    with pytest.raises(errors.Unavailable):
        await ctl.allocate(req, request_id="r1", no_wait=True)
    left = {sid: s.state for sid, s in ctl.fleet.slices.items()}
    # only the victim is left, ready when its release was not written, releasing when it was
    assert list(left) == ["s-victim"]
    assert left["s-victim"] == (T.SLICE_STATE_READY if fail == 1 else T.SLICE_STATE_RELEASING)
    assert ("hi", "r1") not in ctl.requests


async def test_failed_allocate_keeps_the_request_id_a_concurrent_call_owns():
    ctl = _controller()
    ctl.fleet.put_slice(_slice("s-victim", tenant="low"))
    req = _preempting(ctl)

    async def write(ops, conds=()):
        if not any(o.key.startswith(keys.REQUESTS.encode()) for o in ops):
            return 7                    # the victim's release
        # while this call waits on etcd, a duplicate call with the same request id took it over
        ctl.requests[("hi", "r1")] = "a-other"
        await asyncio.sleep(0)
        raise errors.Unavailable("etcd: deadline exceeded")
    async def lease():
        return 1
    ctl.writer.write, ctl._request_lease = write, lease
    with pytest.raises(errors.Unavailable, match="deadline exceeded"):
        await ctl.allocate(req, request_id="r1", no_wait=True)
    assert ctl.requests[("hi", "r1")] == "a-other"

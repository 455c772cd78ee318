"""A hand-started vLLM's GPU memory share follows its slice (controlplane/controllers/backendshare.py).

vLLM takes its --gpu-memory-utilization of the whole GPU at start (an MPS slice sees the whole GPU). Before, a
slice resized in place kept its workload's share: shrunk, the server went on holding the old amount while the
slice's freed room was the scheduler's to give to another tenant; grown, it never used the new room. A migration's
target (a GPU with another amount of memory) carried the source's share into the record, so a later restart took
a share of the wrong GPU. Now:

* a shrink writes the smaller share into the workload's record and has the agent restart the server with it
  BEFORE the slice's smaller size is written (the room is released only once the old server has ended);
* a growth writes the slice first, then the larger share (the server never holds more than the slice);
* a shrink that cannot restart the server (its node not connected) is refused, the slice unchanged;
* a migration's target is started, and its record committed, with the share derived from the target slice.

The agent's side (the restart in place) is tests/unit/test_vllm_share_restart.py."""

from __future__ import annotations

import asyncio
import types

import pytest
from google.protobuf import timestamp_pb2

from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit.test_resize_run_race import Etcd

GiB = 2**30


class Session:
    """An agent's stream as the control plane sees it: what was sent, with the slice's size when it was."""

    def __init__(self, ctl, on_start=None) -> None:
        self.ctl, self.sent, self.on_start = ctl, [], on_start

    def send(self, msg) -> None:
        sizes = {sid: s.memory_bytes for sid, s in self.ctl.fleet.slices.items()}
        self.sent.append((msg, sizes))
        if msg.HasField("workloads") and self.on_start is not None:
            for w in msg.workloads.start:
                asyncio.get_running_loop().call_soon(self.on_start, w)

    def send_upserts(self, slices, rev) -> None:
        self.sent.append(("upserts", [s.id for s in slices]))

    def starts(self):
        return [(w, sizes) for m, sizes in self.sent if m != "upserts" and m.HasField("workloads")
                for w in m.workloads.start]


def _world(models=("A100-80GB",)):
    etcd = Etcd()
    ctl = Controller(store=None)
    ctl.recorder = types.SimpleNamespace(emit=lambda *a, **k: None)
    ctl.writer.write = etcd.write
    gpus = [T.Gpu(index=i, uuid=f"GPU-{i}", model=m, memory_bytes=(40 if "40GB" in m else 80) * GiB)
            for i, m in enumerate(models)]
    ctl.fleet.upsert_node(T.Node(name="nA", inventory=T.NodeInventory(gpus=gpus))).ready = True
    ctl.fleet.upsert_node(T.Node(name="nB", inventory=T.NodeInventory(gpus=[
        T.Gpu(index=0, uuid="GPU-B0", model="A100-40GB", memory_bytes=40 * GiB)]))).ready = True
    wm = WorkloadManager(ctl)
    mm = MigrationManager(ctl, wm)
    return etcd, ctl, wm, mm


def _slice(sid="s-x", mem_gib=40, node="nA", gpu=0, uuid="GPU-0", model="A100-80GB") -> T.Slice:
    return T.Slice(id=sid, allocation_id="a-" + sid, tenant="t", node=node, gpu_uuid=uuid, gpu_index=gpu,
                   gpu_model=model, isolation=T.ISOLATION_MPS, memory_bytes=mem_gib * GiB, compute_share=0.25,
                   device_uuid=uuid, state=T.SLICE_STATE_READY, message="ready")


def _put(etcd, ctl, wm, s: T.Slice, share=0.5, kind="vllm", wid="w-1", **labels) -> T.Workload:
    ctl.fleet.put_slice(s)
    etcd.kv[keys.slice_(s.id)] = s.SerializeToString()
    w = T.Workload(id=wid, slice_id=s.id, node=s.node, tenant="t", state=T.WORKLOAD_STATE_RUNNING, pid=100,
                   labels=labels, backend=T.ServingBackend(kind=kind, artifact="/m", gpu_memory_utilization=share))
    w.started_at.FromSeconds(1000)
    etcd.rev += 1
    etcd.kv[keys.workload(w.id)], etcd.revs[keys.workload(w.id)] = w.SerializeToString(), etcd.rev
    wm.adopt(w, etcd.rev)
    return w


def _restarted_by_agent(wm):
    """What the agent answers a start for a running workload with a new share: the server restarted."""
    def on_start(w: T.Workload) -> None:
        st = T.Workload()
        st.CopyFrom(w)
        st.pid, st.endpoint = w.pid + 1, "10.0.0.1:8000"
        st.started_at.CopyFrom(timestamp_pb2.Timestamp(seconds=2000))
        asyncio.ensure_future(wm._report("nA", N.WorkloadStatusReport(workloads=[st])))
    return on_start


def test_the_share_follows_the_slice_an_explicit_one_is_kept_within_it():
    from controlplane.controllers.backendshare import follow_slice
    mps, mig = T.ISOLATION_MPS, T.ISOLATION_MIG
    vllm = T.ServingBackend(kind="vllm", gpu_memory_utilization=0.5)
    assert follow_slice(vllm, (40 * GiB, 80 * GiB, mps), (20 * GiB, 80 * GiB, mps)) == 0.25      # the slice's
    assert follow_slice(vllm, (40 * GiB, 80 * GiB, mps), (60 * GiB, 80 * GiB, mps)) == 0.75
    assert follow_slice(vllm, (40 * GiB, 80 * GiB, mps), (40 * GiB, 40 * GiB, mps)) == 0.95      # another GPU
    explicit = T.ServingBackend(kind="vllm", gpu_memory_utilization=0.3)     # the tenant's own, under the slice
    assert follow_slice(explicit, (40 * GiB, 80 * GiB, mps), (60 * GiB, 80 * GiB, mps)) == 0.3   # kept ...
    assert follow_slice(explicit, (40 * GiB, 80 * GiB, mps), (20 * GiB, 80 * GiB, mps)) == 0.25  # ... within it
    assert follow_slice(T.ServingBackend(kind="vllm", gpu_memory_utilization=0.9),
                        (40 * GiB, 40 * GiB, mig), (20 * GiB, 80 * GiB, mps)) == 0.25           # MIG -> MPS
    llama = T.ServingBackend(kind="llama.cpp")
    assert follow_slice(llama, (40 * GiB, 80 * GiB, mps), (20 * GiB, 80 * GiB, mps)) == 0.0      # no share


def test_a_shrink_restarts_the_server_with_the_smaller_share_before_the_room_is_released():
    async def main():
        etcd, ctl, wm, mm = _world()
        _put(etcd, ctl, wm, _slice())
        session = Session(ctl, _restarted_by_agent(wm))
        ctl.sessions = {"nA": session}
        got = await mm.resize("s-x", 20 * GiB, 0)
        assert got.memory_bytes == 20 * GiB
        starts = session.starts()
        assert [(w.id, w.backend.gpu_memory_utilization) for w, _ in starts] == [("w-1", 0.25)]
        assert starts[0][1]["s-x"] == 40 * GiB          # the restart was asked while the slice still had its room
        w = wm.workloads["w-1"]
        assert w.backend.gpu_memory_utilization == 0.25 and w.pid == 101
        assert T.Workload.FromString(etcd.kv[keys.workload("w-1")]).backend.gpu_memory_utilization == 0.25
        assert T.Slice.FromString(etcd.kv[keys.slice_("s-x")]).memory_bytes == 20 * GiB
    asyncio.run(main())


def test_a_growth_writes_the_slice_then_restarts_the_server_with_the_larger_share():
    async def main():
        etcd, ctl, wm, mm = _world()
        _put(etcd, ctl, wm, _slice())
        session = Session(ctl, _restarted_by_agent(wm))
        ctl.sessions = {"nA": session}
        await mm.resize("s-x", 60 * GiB, 0)
        starts = session.starts()
        assert [(w.id, w.backend.gpu_memory_utilization) for w, _ in starts] == [("w-1", 0.75)]
        assert starts[0][1]["s-x"] == 60 * GiB          # the slice had grown before the server takes more
        assert wm.workloads["w-1"].backend.gpu_memory_utilization == 0.75
    asyncio.run(main())


def test_a_shrink_whose_server_cannot_be_restarted_is_refused_and_the_slice_is_unchanged():
    async def main():
        etcd, ctl, wm, mm = _world()
        _put(etcd, ctl, wm, _slice())
        with pytest.raises(errors.FailedPrecondition, match=r"vLLM server w-1.*not connected"):
            await mm.resize("s-x", 20 * GiB, 0)          # its node's agent is away: nobody can restart it
        assert ctl.fleet.slices["s-x"].memory_bytes == 40 * GiB
        assert wm.workloads["w-1"].backend.gpu_memory_utilization == 0.5
    asyncio.run(main())


def test_a_replica_and_a_llamacpp_server_are_not_restarted_by_a_resize():
    async def main():
        etcd, ctl, wm, mm = _world()
        _put(etcd, ctl, wm, _slice(), **{"gpumesh.replica": "r-1"})
        _put(etcd, ctl, wm, _slice("s-y", 10), kind="llama.cpp", share=0, wid="w-2")
        session = Session(ctl)
        ctl.sessions = {"nA": session}
        assert (await mm.resize("s-x", 20 * GiB, 0)).memory_bytes == 20 * GiB
        assert (await mm.resize("s-y", 5 * GiB, 0)).memory_bytes == 5 * GiB
        assert session.starts() == []
        assert wm.workloads["w-1"].backend.gpu_memory_utilization == 0.5
    asyncio.run(main())


def test_a_migration_target_gets_the_share_of_its_own_slice():
    etcd, ctl, wm, mm = _world()
    w = _put(etcd, ctl, wm, _slice())                          # 40 GiB of an 80 GiB GPU: 0.5
    t = _slice("s-t", 40, node="nB", uuid="GPU-B0", model="A100-40GB")
    ctl.fleet.put_slice(t)                                     # 40 GiB of a 40 GiB GPU: the slice's is 0.95
    m = M.Migration(id="m-1", workload_id=w.id, source_node="nA", source_slice="s-x", target_node="nB",
                    target_slice="s-t", mode=M.MIGRATION_MODE_TRANSPARENT)
    assert mm._target_spec(m, w).backend.gpu_memory_utilization == 0.95
    assert wm.workloads["w-1"].backend.gpu_memory_utilization == 0.5      # the record moves at the commit

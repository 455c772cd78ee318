"""The agent's side of a resize's commit (SWAP_SLICES) and of a same-node hand-over."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from nodeagent.gpu import MigInstance
from nodeagent.migrate import MigrationAgent
from nodeagent.slicer import Slicer

OLD = MigInstance(0, 1, 0, "1g.10gb", 0, "MIG-old")
NEW = MigInstance(0, 2, 0, "3g.40gb", 4, "MIG-new")


def mig_slice(sid: str, node: str, profile: str, start: int) -> t.Slice:
    s = t.Slice(id=sid, node=node, gpu_index=0, gpu_uuid="GPU-0", isolation=t.ISOLATION_MIG, profile=profile)
    s.placement.start = start
    return s


def agent_with(node: str, mig: dict) -> tuple[MigrationAgent, list]:
    slicer = Slicer(SimpleNamespace(uuids={0: "GPU-0"}), "/tmp/mps-unused")
    slicer.mig.update(mig)
    agent = SimpleNamespace(node=node, slicer=slicer, realized={k: None for k in mig}, desired={k: None for k in mig})
    ma = MigrationAgent(agent, SimpleNamespace(workloads={}))
    sent = []
    ma.outbox = SimpleNamespace(put_nowait=sent.append)
    return ma, sent


def swap(ma: MigrationAgent, records: list[t.Slice]) -> list:
    reports = []
    cmd = M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.SWAP_SLICES, slices=records)
    asyncio.run(ma._swap_slices(cmd, lambda ev, **kw: reports.append(ev)))
    return reports


def test_same_node_swap_renames_both_and_is_idempotent():
    ma, sent = agent_with("a", {"s-x": OLD, "s-t": NEW})
    records = [mig_slice("s-x", "a", "3g.40gb", 4), mig_slice("s-t", "a", "1g.10gb", 0)]
    for _ in range(2):
        assert swap(ma, records) == [M.MigrationReport.SLICES_SWAPPED]
        assert ma.agent.slicer.mig == {"s-x": NEW, "s-t": OLD}
    st = ma.agent.realized["s-x"]
    assert st.state == t.SLICE_STATE_READY and st.device_uuid == "MIG-new" and st.env["GPUMESH_SLICE_ID"] == "s-x"
    assert sent and sent[0].report.statuses[0].slice_id == "s-x"


def test_cross_node_swap_each_node_renames_its_part():
    src, _ = agent_with("a", {"s-x": OLD})
    dst, _ = agent_with("b", {"s-t": NEW})
    records = [mig_slice("s-x", "b", "3g.40gb", 4), mig_slice("s-t", "a", "1g.10gb", 0)]
    swap(src, records)
    swap(dst, records)
    assert src.agent.slicer.mig == {"s-t": OLD} and "s-x" not in src.agent.realized
    assert dst.agent.slicer.mig == {"s-x": NEW} and dst.agent.realized["s-x"].device_uuid == "MIG-new"


def test_hand_over_gives_the_workload_id_to_the_target(tmp_path):
    from nodeagent.workloads import WorkloadRunner
    agent = SimpleNamespace(node="a", desired={}, realized={})
    runner = WorkloadRunner(agent, str(tmp_path))
    for wid, sl in (("w-1", "s-src"), ("w-1~m-1", "s-dst")):
        runner.workloads[wid] = t.Workload(id=wid, slice_id=sl, state=t.WORKLOAD_STATE_RUNNING)
        runner.meta[wid] = {}
        runner.save(wid)
    ma = MigrationAgent(agent, runner)
    assert ma._hand_over("w-1", "w-1~m-1") == "w-1~m-1~source"
    assert runner.workloads["w-1"].slice_id == "s-dst" and runner.meta["w-1"]["stem"] == "w-1~m-1"
    assert runner.workloads["w-1~m-1~source"].slice_id == "s-src" and "hand_over_to" not in runner.meta["w-1"]
    again = WorkloadRunner(agent, str(tmp_path))           # durable: a restarted agent sees the same
    assert {k: w.slice_id for k, w in again.workloads.items()} == {"w-1": "s-dst", "w-1~m-1~source": "s-src"}

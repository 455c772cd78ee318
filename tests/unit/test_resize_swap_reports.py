"""An agent's report about a resize's old placement, arriving between the commit (both slice records swapped in
etcd) and the agents' SWAP_SLICES, is not written over the swapped records (controllers/resize.py `_swapping`,
Controller.report): the agent still names each realized slice by its ID before the swap, so it gave the client's
slice the old placement's device, MIG instances, state and message (and a full report from a node that holds the
new placement under the reserved slice's ID turned the client's READY slice PENDING). The agent's statuses after
the swap, and every report after it, are applied as before."""

from __future__ import annotations

import asyncio
import types

from controlplane.controllers import migrations
from controlplane.controllers.migration_phases import C, P, R
from controlplane.controllers.slices import Controller
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from tests.unit._workloads_standin import workloads_standin

MID = "m-1"


class Etcd:
    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        return 7


class Agent:
    """A node's session: on SWAP_SLICES it renames (sends `after`, the statuses under the new names), then
    answers SLICES_SWAPPED."""

    def __init__(self, node: str, ctl: Controller, mm, after: list) -> None:
        self.node, self.ctl, self.mm, self.after = node, ctl, mm, after

    def send(self, msg) -> None:
        if msg.WhichOneof("kind") != "migration" or msg.migration.action != C.SWAP_SLICES:
            return

        async def swap():
            await self.ctl.report(self.node, False, self.after, [])
            await self.mm._on_report(self.node, M.MigrationReport(migration_id=MID, event=R.SLICES_SWAPPED))
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(swap()))


def _controller(nodes: dict[str, list[str]]) -> Controller:
    ctl = Controller(store=None)
    ctl.recorder = types.SimpleNamespace(emit=lambda *a, **k: None)
    ctl.writer.write = Etcd().write
    for node, gpus in nodes.items():
        ctl.fleet.upsert_node(T.Node(name=node, inventory=T.NodeInventory(
            gpus=[T.Gpu(index=i, uuid=u, model="A100-80GB") for i, u in enumerate(gpus)]))).ready = True
    return ctl


def _slice(sid: str, node: str, gpu: int, uuid: str, mem_gib: int) -> T.Slice:
    return T.Slice(id=sid, allocation_id="a-" + sid, tenant="t", node=node, gpu_uuid=uuid, gpu_index=gpu,
                   gpu_model="A100-80GB", isolation=T.ISOLATION_MPS, memory_bytes=mem_gib << 30,
                   compute_share=0.1, device_uuid=uuid, state=T.SLICE_STATE_READY, message="ready")


def _status(sid: str, uuid: str, message: str = "ready") -> N.SliceStatus:
    return N.SliceStatus(slice_id=sid, state=T.SLICE_STATE_READY, device_uuid=uuid, message=message)


def _manager(ctl: Controller, x: T.Slice, t: T.Slice):
    wm = workloads_standin()
    mm = migrations.MigrationManager(ctl, wm)
    for s in (x, t):
        ctl.fleet.put_slice(s)
    m = M.Migration(id=MID, source_node=x.node, source_slice=x.id, target_node=t.node, target_slice=t.id,
                    resize_slice=x.id, phase=P.MIGRATION_PHASE_PLANNED)
    mm.migrations[MID] = m
    return mm, m


def test_a_full_report_of_the_old_placement_between_commit_and_swap_is_not_written_over_the_records():
    async def main():
        ctl = _controller({"nA": ["GPU-0", "GPU-1"]})
        mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
        await mm._commit_idle_resize(m)
        assert ctl.fleet.slices["s-x"].device_uuid == "GPU-1"          # the client's ID at the new placement
        # the agent has not swapped yet: its full report names s-x on GPU-0 and s-t on GPU-1, as before
        await ctl.report("nA", True, [_status("s-x", "GPU-0"), _status("s-t", "GPU-1")], [])
        x, t = ctl.fleet.slices["s-x"], ctl.fleet.slices["s-t"]
        assert (x.gpu_index, x.device_uuid, x.state) == (1, "GPU-1", T.SLICE_STATE_READY)
        assert (t.gpu_index, t.device_uuid) == (0, "GPU-0")
        assert x.message.startswith("resized from")
        # the agent swaps: its statuses under the new names are applied, and the guard ends with the answer
        ctl.sessions.by_node["nA"] = Agent("nA", ctl, mm, [_status("s-x", "GPU-1", "swapped"),
                                                          _status("s-t", "GPU-0", "swapped")])
        await asyncio.wait_for(mm._swap_on_agents(m), 30)
        assert ctl.fleet.slices["s-x"].message == "swapped" and ctl.fleet.slices["s-t"].message == "swapped"
        assert ctl.swapping == {}
        await ctl.report("nA", False, [N.SliceStatus(slice_id="s-x", state=T.SLICE_STATE_FAILED,
                                                     device_uuid="GPU-1", message="gone")], [])
        assert ctl.fleet.slices["s-x"].state == T.SLICE_STATE_FAILED    # the normal report path, as before
    asyncio.run(main())


def test_a_full_report_from_the_new_placements_node_before_the_swap_leaves_the_client_slice_ready():
    async def main():
        ctl = _controller({"nA": ["GPU-a"], "nB": ["GPU-b"]})
        mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2))
        await mm._commit_idle_resize(m)
        # nB realized the new placement as s-t: its full report lists s-t only, and s-x's record is on nB now
        await ctl.report("nB", True, [_status("s-t", "GPU-b")], [])
        await ctl.report("nA", True, [_status("s-x", "GPU-a")], [])
        x, t = ctl.fleet.slices["s-x"], ctl.fleet.slices["s-t"]
        assert (x.node, x.device_uuid, x.state) == ("nB", "GPU-b", T.SLICE_STATE_READY)
        assert (t.node, t.device_uuid, t.state) == ("nA", "GPU-a", T.SLICE_STATE_READY)
        ctl.sessions.by_node["nA"] = Agent("nA", ctl, mm, [_status("s-t", "GPU-a")])
        ctl.sessions.by_node["nB"] = Agent("nB", ctl, mm, [_status("s-x", "GPU-b")])
        await asyncio.wait_for(mm._swap_on_agents(m), 30)
        assert ctl.swapping == {}
        await ctl.report("nB", True, [_status("s-x", "GPU-b")], [])      # after the swap: a full report as usual
        assert ctl.fleet.slices["s-x"].state == T.SLICE_STATE_READY
    asyncio.run(main())


def _realized(sid: str, uuid: str, mem_gib: int, share: float) -> dict[str, str]:
    """The env an agent gives an MPS slice (nodeagent/slicer.py slice_env): its limits, not its GPU, tell two
    placements on one GPU apart."""
    return {"CUDA_VISIBLE_DEVICES": uuid, "GPUMESH_SLICE_ID": sid, "GPUMESH_MEMORY_LIMIT_BYTES": str(mem_gib << 30),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(round(share * 100)),
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={mem_gib << 10}M"}


async def _same_gpu_resize_committed():
    """A resize of s-x (MPS, 1 GiB -> 2 GiB) that the scheduler placed on its own GPU-0 on nA (target s-t),
    committed: each placement's env carries its own limits, so only those tell the two apart."""
    ctl = _controller({"nA": ["GPU-0"]})
    x, t = _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 0, "GPU-0", 2)
    x.env.update(_realized("s-x", "GPU-0", 1, 0.1))
    t.env.update(_realized("s-t", "GPU-0", 2, 0.1))
    mm, m = _manager(ctl, x, t)
    await mm._commit_idle_resize(m)
    return ctl, mm, m


def test_a_report_of_the_old_placement_on_the_same_gpu_is_told_apart_by_its_limits():
    """A resize the scheduler placed on the slice's own GPU (MPS, 1 GiB -> 2 GiB on GPU-0): both placements have
    the same device and no MIG instances, so the old one's status under the client's ID matched the swapped
    record and put the old limits (its env: 1 GiB) and message back on it until the agent swapped."""
    async def main():
        ctl, mm, m = await _same_gpu_resize_committed()
        new_env = dict(ctl.fleet.slices["s-x"].env)
        assert new_env["GPUMESH_MEMORY_LIMIT_BYTES"] == str(2 << 30) and new_env["GPUMESH_SLICE_ID"] == "s-x"
        old = _status("s-x", "GPU-0", "old placement still")
        old.env.update(_realized("s-x", "GPU-0", 1, 0.1))
        await ctl.report("nA", False, [old], [])
        x = ctl.fleet.slices["s-x"]
        assert dict(x.env) == new_env and x.message.startswith("resized from"), x
        # the agent swaps: the new placement's status under the client's ID (its limits: 2 GiB) is applied
        after = _status("s-x", "GPU-0", "swapped")
        after.env.update(_realized("s-x", "GPU-0", 2, 0.1))
        ctl.sessions.by_node["nA"] = Agent("nA", ctl, mm, [after])
        await asyncio.wait_for(mm._swap_on_agents(m), 30)
        assert ctl.fleet.slices["s-x"].message == "swapped" and ctl.swapping == {}
    asyncio.run(main())


def test_the_guard_ends_for_a_record_gone_before_the_swap():
    """The old placement's record dropped between the commit and SWAP_SLICES (its node deleted): the guard of
    its ID ends with the swap too, not kept for good."""
    async def main():
        ctl = _controller({"nA": ["GPU-a"], "nB": ["GPU-b"]})
        mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2))
        await mm._commit_idle_resize(m)
        assert set(ctl.swapping) == {"s-x", "s-t"}
        ctl.fleet.drop_slice("s-t")                     # on nA now: end_node_slices of a deleted nA
        ctl.sessions.by_node["nB"] = Agent("nB", ctl, mm, [_status("s-x", "GPU-b")])
        await asyncio.wait_for(mm._swap_on_agents(m), 30)
        assert ctl.swapping == {}
    asyncio.run(main())


def test_a_status_without_env_naming_the_records_placement_is_applied():
    """A status that carries no env (any state but READY: the agent gives the env of a ready slice only) is
    judged by its device and MIG instances alone: a failure of the new placement is not taken for the old one."""
    async def main():
        ctl, mm, m = await _same_gpu_resize_committed()
        await ctl.report("nA", False, [N.SliceStatus(slice_id="s-x", state=T.SLICE_STATE_FAILED,
                                                     device_uuid="GPU-0", message="MPS daemon died")], [])
        assert ctl.fleet.slices["s-x"].state == T.SLICE_STATE_FAILED
    asyncio.run(main())

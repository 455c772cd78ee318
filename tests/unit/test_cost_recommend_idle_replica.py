"""`meshctl recommend --apply` of an `idle-replica` recommendation removes the replica it lists, not another.

The recommendation names one replica (idle over the window, with another READY one beside it). Its apply used to
scale the deployment down by one and leave the choice to the deployment controller, which removes the newest
READY replica first: a busy replica went and the idle one listed stayed. Now the apply marks the listed replica
TERMINATING and lowers `spec.replicas` by one in one etcd transaction, so the controller removes that one and no
other; when the replica is gone, no longer READY, the last READY one, or the deployment changed before the write,
the apply is refused (FAILED_PRECONDITION naming what changed) and nothing is written.

The real DeploymentManager (store, reconcile pass) and Recommender; etcd is an in-memory writer, replica actions
(probes, removals) are recorded instead of run."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.cost.recommender import Recommender
from controlplane.cost.service import CostService
from controlplane.serving.deployments import DeploymentManager
from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from mesh.cost import recommend as R
from tests.unit._wait import until

GiB = 1 << 30
REPLICAS = ("r-1", "r-2", "r-3")        # created in this order: r-3 is the newest


class Etcd:
    def __init__(self) -> None:
        self.writes: list[list] = []

    async def write(self, ops, conds=()):
        self.writes.append(list(ops))
        return len(self.writes)


def world(idle: str = "r-1"):
    slices, workloads = {}, {}
    for i, rid in enumerate(REPLICAS):
        slices[f"s-{rid}"] = T.Slice(id=f"s-{rid}", node="n1", gpu_index=i, gpu_model="H100-80GB",
                                     isolation=T.ISOLATION_MPS, memory_bytes=10 * GiB, state=T.SLICE_STATE_READY)
        workloads[f"w-{rid}"] = T.Workload(id=f"w-{rid}", node="n1", slice_id=f"s-{rid}",
                                           state=T.WORKLOAD_STATE_RUNNING)
    etcd = Etcd()
    ctl = SimpleNamespace(fleet=SimpleNamespace(slices=slices, nodes={"n1": SimpleNamespace(
                              ready=True, record=T.Node(name="n1"))}, gpu=lambda node, index: None),
                          writer=etcd, recorder=SimpleNamespace(emit=lambda *a, **k: None),
                          telemetry=SimpleNamespace(backend_listeners=[]),
                          migrations=SimpleNamespace(active_for=lambda wid: None))
    dm = DeploymentManager(ctl, workloads=SimpleNamespace(workloads=workloads), registry=None)
    dm.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat", tenant="t", replicas=3),
                                                generation=4)
    dm.store.replicas["chat"] = {}
    for i, rid in enumerate(REPLICAS):
        r = D.Replica(id=rid, deployment="chat", state=D.REPLICA_STATE_READY, slice_id=f"s-{rid}", node="n1",
                      gpu_index=i, workload_id=f"w-{rid}", memory_bytes=10 * GiB)
        r.created_at.FromSeconds(1000 + i)
        dm.store.replicas["chat"][rid] = r
        dm.last_probe[rid] = float("inf")        # probed just now: the pass probes none
    removed = []

    async def remove(r, why):
        removed.append(r.id)
    dm.act.remove = remove

    def facts():
        out = []
        for i, r in enumerate(dm.store.replicas_of("chat")):
            ready = [x for x in dm.store.replicas_of("chat") if x.state == D.REPLICA_STATE_READY]
            out.append(R.ReplicaFacts("chat", r.id, r.slice_id, "n1", i, "H100-80GB", "mps", "", 10 * GiB, 0.125,
                                      2.40, 1, 10 * GiB, 0.0, 10 * GiB, 7200.0, ready=r.state == D.REPLICA_STATE_READY,
                                      idle=r.id == idle, ready_peers=len(ready) - (r in ready)))
        return out, [], []
    rec = Recommender(ctl, dm, None, None)
    rec.facts = facts
    return dm, CostService(None, rec), removed, etcd


async def call(svc: CostService, **kw) -> C.RecommendResponse:
    return await CostService.Recommend.__wrapped__(svc, C.RecommendRequest(**kw), None)


async def test_the_controller_alone_would_remove_the_newest_replica():
    dm, _, removed, _ = world()
    await dm.scale("chat", 2)
    await dm.reconcile_one("chat")
    await until(lambda: removed, "a removal")
    assert removed == ["r-3"]


async def test_apply_removes_the_listed_replica_and_no_other():
    dm, svc, removed, etcd = world(idle="r-1")
    (listed,) = (await call(svc, kinds=["idle-replica"])).recommendations
    assert listed.id == "idle-replica:chat/r-1"
    got = await call(svc, apply=True, ids=[listed.id])
    assert [r.result for r in got.recommendations] == ["applied"]
    written = etcd.writes[-1]
    await dm.reconcile_one("chat")
    await until(lambda: removed, "a removal")
    await asyncio.sleep(0)
    assert removed == ["r-1"]                        # the listed one; r-3 (the newest) stays
    d = dm.store.deployments["chat"]
    assert d.spec.replicas == 2 and d.generation == 5
    assert dm.store.replicas["chat"]["r-1"].state == D.REPLICA_STATE_TERMINATING
    assert [op.key for op in written] == [b"/gpumesh/v1/deployments/chat", b"/gpumesh/v1/replicas/chat/r-1"]


@pytest.mark.parametrize("change,why", [
    ("scaled", r"deployment chat changed.*generation 4 .* 5"),
    ("removed", r"replica r-1 of deployment chat is gone"),
    ("not-ready", r"replica r-1 of deployment chat is STARTING now"),
])
async def test_a_change_before_the_write_refuses_the_apply(change, why):
    """The recommendation is checked, then the write waits for the deployments' lock: what changed meanwhile
    refuses it, naming the change, and nothing is written."""
    dm, svc, removed, etcd = world(idle="r-1")
    (listed,) = (await call(svc, kinds=["idle-replica"])).recommendations
    await dm._lock.acquire()
    applying = asyncio.create_task(call(svc, apply=True, ids=[listed.id]))
    await asyncio.sleep(0.05)
    writes = len(etcd.writes)
    d, r = dm.store.deployments["chat"], dm.store.replicas["chat"]["r-1"]
    if change == "scaled":
        n = D.Deployment()
        n.CopyFrom(d)
        n.spec.replicas, n.generation = 4, 5
        dm.store.deployments["chat"] = n
    elif change == "removed":
        del dm.store.replicas["chat"]["r-1"]
    else:
        n = D.Replica()
        n.CopyFrom(r)
        n.state = D.REPLICA_STATE_STARTING
        dm.store.replicas["chat"]["r-1"] = n
    dm._lock.release()
    with pytest.raises(errors.FailedPrecondition, match=r"idle-replica of chat/r-1 no longer holds: " + why):
        await applying
    assert len(etcd.writes) == writes
    assert all(x.state != D.REPLICA_STATE_TERMINATING for x in dm.store.replicas["chat"].values())


async def test_never_the_last_wanted_replica():
    """The deployment wants one replica (a scale-down to it is under way): one fewer would be none, refused."""
    dm, svc, _, etcd = world(idle="r-1")
    (listed,) = (await call(svc, kinds=["idle-replica"])).recommendations
    dm.store.deployments["chat"].spec.replicas = 1
    with pytest.raises(errors.FailedPrecondition, match="wants 1 replica"):
        await call(svc, apply=True, ids=[listed.id])
    assert not etcd.writes

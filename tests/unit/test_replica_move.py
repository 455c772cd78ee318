"""A deployment replica follows its workload once a migration moved it (controlplane/serving/replicamove.py): not
while the migration runs; after it, the replica names the workload's slice, node, GPU, allocation and endpoint, its
old slice is released (once: a pass after a crash between the release and the write only writes), and the load
signals the target node's agent reports land on it (they are matched by node)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.serving import replicamove
from controlplane.serving.deployments import DeploymentManager
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as t


class Fleet:
    def __init__(self, slices):
        self.slices = {s.id: s for s in slices}

    def slices_of(self, alloc):
        return [s for s in self.slices.values() if s.allocation_id == alloc]

    def gpu(self, node, index):
        return None


def setup(active=None):
    src = t.Slice(id="s-src", node="a", gpu_uuid="GPU-a", gpu_index=0, gpu_model="H100-80GB", isolation=t.ISOLATION_MIG,
                  profile="1g.10gb", memory_bytes=10 << 30, allocation_id="al-r1", state=t.SLICE_STATE_READY)
    dst = t.Slice(id="s-dst", node="b", gpu_uuid="GPU-b", gpu_index=3, gpu_model="H100-80GB", isolation=t.ISOLATION_MIG,
                  profile="1g.10gb", memory_bytes=10 << 30, allocation_id="al-m1", state=t.SLICE_STATE_READY)
    released, writes = [], []
    fleet = Fleet([src, dst])

    async def release(ident, wait=True, message=""):
        released.append(ident)
        fleet.slices.pop(ident, None)

    async def write(ops, conds=()):
        writes.append(ops)
    ctl = SimpleNamespace(fleet=fleet, release=release, writer=SimpleNamespace(write=write),
                          telemetry=SimpleNamespace(backend_listeners=[]),
                          migrations=SimpleNamespace(active_for=lambda wid: active))
    w = t.Workload(id="w-1", slice_id="s-dst", node="b", state=t.WORKLOAD_STATE_RUNNING, endpoint="127.0.0.1:40001",
                   backend=t.ServingBackend(kind="llama.cpp", artifact="/m.gguf"))
    workloads = SimpleNamespace(workloads={"w-1": w})
    m = DeploymentManager(ctl, workloads=workloads, registry=None)
    r = D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, endpoint="127.0.0.1:40001",
                  slice_id="s-src", node="a", gpu_uuid="GPU-a", gpu_index=0, gpu_model="H100-80GB",
                  isolation=t.ISOLATION_MIG, profile="1g.10gb", memory_bytes=10 << 30, workload_id="w-1",
                  allocation_id="al-r1", template="tpl")
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat"))
    m.store.replicas["chat"] = {"r-1": r}
    return m, ctl, r, released, writes


def follow(m, r):
    return asyncio.run(replicamove.follow(m.ctl, m.workloads, m.store, r))


def test_a_replica_stays_put_while_its_migration_runs():
    m, _, r, released, writes = setup(active=SimpleNamespace(id="m-1"))
    assert follow(m, r) is None and not released and not writes
    assert m.store.replicas["chat"]["r-1"].slice_id == "s-src"


def test_after_the_migration_the_replica_names_the_new_slice_and_releases_the_old():
    m, _, r, released, writes = setup()
    n = follow(m, r)
    assert (n.slice_id, n.node, n.gpu_uuid, n.gpu_index, n.allocation_id) == ("s-dst", "b", "GPU-b", 3, "al-m1")
    assert n.endpoint == "127.0.0.1:40001" and n.workload_id == "w-1"
    assert (n.state, n.template, n.id) == (D.REPLICA_STATE_READY, "tpl", "r-1")      # the rest is kept
    assert released == ["s-src"] and len(writes) == 1
    assert m.store.replicas["chat"]["r-1"] == n
    assert follow(m, n) is None and released == ["s-src"] and len(writes) == 1        # done once


def test_a_pass_after_a_crash_between_release_and_write_only_writes():
    m, ctl, r, released, writes = setup()
    del ctl.fleet.slices["s-src"]           # released before the crash; the replica still names it
    n = follow(m, r)
    assert n.slice_id == "s-dst" and released == [] and len(writes) == 1


def test_an_ended_workload_is_not_followed():
    m, _, r, released, _ = setup()
    m.workloads.workloads["w-1"].state = t.WORKLOAD_STATE_STOPPED
    assert follow(m, r) is None and not released


def test_the_target_nodes_loads_land_on_the_moved_replica():
    m, _, r, _, _ = setup()
    load = t.BackendLoad(workload_id="w-1", scraped=True, requests_waiting=5)
    asyncio.run(m.on_loads("b", [load]))
    assert not m.store.full("chat").replicas[0].HasField("load")      # before: the replica says node a
    follow(m, r)
    asyncio.run(m.on_loads("b", [load]))
    assert m.store.full("chat").replicas[0].load.requests_waiting == 5

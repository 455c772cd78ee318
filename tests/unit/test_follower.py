"""The standby's read-only fleet (controlplane/state/follower.py): watch events applied, reads routed by Switch."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.state import keys
from controlplane.state.follower import Follower
from controlplane.controllers.standby import READS, Switch
from controlplane.state.store import Snapshot
from gpumesh.v1 import admin_service_pb2, slice_service_pb2, types_pb2
from mesh import errors


def node(name="n1"):
    n = types_pb2.Node(name=name)
    n.inventory.gpus.add(index=0, uuid="GPU-0", model="H100-80GB", mig_enabled=True, memory_bytes=80 << 30)
    return n


def slice_(sid="s-1", tenant="t", state=types_pb2.SLICE_STATE_READY):
    return types_pb2.Slice(id=sid, allocation_id="a-1", tenant=tenant, node="n1", gpu_uuid="GPU-0", gpu_index=0,
                           memory_bytes=10 << 30, state=state, isolation=types_pb2.ISOLATION_MIG, profile="1g.10gb")


class FakeStore:
    def __init__(self, kvs):
        self.kvs = kvs

    async def load(self, prefix=keys.PREFIX):
        return Snapshot(revision=7, kvs=self.kvs)


def test_snapshot_then_events():
    async def main():
        f = Follower(FakeStore({keys.node("n1"): (node().SerializeToString(), 3, 0),
                                keys.alive("n1"): (b"n1", 4, 99)}))
        assert f.reader("SliceService") is None
        await f._load()
        admin, slices = f.reader("AdminService"), f.reader("SliceService")
        nodes = (await admin.ListNodes(admin_service_pb2.ListNodesRequest(), None)).nodes
        assert [(n.name, n.state) for n in nodes] == [("n1", types_pb2.NODE_STATE_READY)]
        q = f.ctl.events.subscribe()
        f.apply(False, keys.slice_("s-1").decode(), slice_().SerializeToString(), 8)
        assert (await slices.Get(slice_service_pb2.GetSliceRequest(id="s-1"), None)).state == types_pb2.SLICE_STATE_READY
        assert f.ctl.fleet.gpu("n1", 0).allocated_memory == 10 << 30
        f.apply(False, keys.slice_("s-1").decode(), slice_(state=types_pb2.SLICE_STATE_UNKNOWN).SerializeToString(), 9)
        f.apply(True, keys.alive("n1").decode(), b"", 10)
        assert (await admin.GetNode(admin_service_pb2.GetNodeRequest(name="n1"), None)).state == \
            types_pb2.NODE_STATE_NOT_READY
        f.apply(True, keys.slice_("s-1").decode(), b"", 11)
        assert not f.ctl.fleet.slices and f.ctl.fleet.gpu("n1", 0).allocated_memory == 0
        kinds = [q.get_nowait().type for _ in range(3)]
        assert kinds == [slice_service_pb2.SliceEvent.ADDED, slice_service_pb2.SliceEvent.MODIFIED,
                         slice_service_pb2.SliceEvent.DELETED]
        assert f.ctl.revision == 11
    asyncio.run(main())


def test_switch_routes_only_reads_to_the_reader():
    sw = Switch(slice_service_pb2.DESCRIPTOR.services_by_name["SliceService"], lambda: None)

    class Reader:
        async def Get(self, request, context):
            return "read"
    sw.reader = lambda name: Reader() if name == "SliceService" else None
    assert READS["SliceService"] == {"Get", "List", "Watch"}
    assert asyncio.run(sw.Get(None, None)) == "read"
    assert sw._pick("Allocate") is None and sw._pick("Release") is None


def test_workload_and_mesh_records_follow_etcd():
    from gpumesh.v1 import mesh_service_pb2 as M
    w = types_pb2.Workload(id="w-1", tenant="t", slice_id="s-1", node="n1", state=types_pb2.WORKLOAD_STATE_RUNNING)
    c = M.MeshConnection(id="m-1", tenant="t", slice_a="s-1", slice_b="s-2")
    g = M.MeshGrant(from_tenant="t", to_tenant="u")

    async def main():
        f = Follower(FakeStore({keys.workload("w-1"): (w.SerializeToString(), 5, 0),
                                keys.mesh_grant("t", "u"): (g.SerializeToString(), 6, 0)}))
        await f._load()
        assert f.workloads.workloads["w-1"].slice_id == "s-1" and ("t", "u") in f.mesh.grants
        f.apply(False, keys.mesh(c.id).decode(), c.SerializeToString(), 8)
        assert f.mesh.connections["m-1"].slice_b == "s-2"
        f.apply(True, keys.mesh(c.id).decode(), b"", 9)
        f.apply(True, keys.mesh_grant("t", "u").decode(), b"", 10)
        f.apply(True, keys.workload("w-1").decode(), b"", 11)
        assert not f.mesh.connections and not f.mesh.grants and not f.workloads.workloads
        assert f.reader("WorkloadService") is not None and f.reader("MeshService") is not None
    asyncio.run(main())


def test_migration_and_checkpoint_records_follow_etcd():
    from gpumesh.v1 import migration_service_pb2 as MS
    m = MS.Migration(id="m-1", workload_id="w-1", tenant="t", source_node="n1", target_node="n2",
                     phase=MS.MIGRATION_PHASE_COPYING)
    ck = MS.CheckpointInfo(id="c-1", workload_id="w-1", tenant="t", step=12)

    async def main():
        f = Follower(FakeStore({keys.migration("m-1"): (m.SerializeToString(), 5, 0)}))
        await f._load()
        svc = f.reader("MigrationService")
        got = await svc.Get(MS.GetMigrationRequest(id="m-1"), None)
        assert got.phase == MS.MIGRATION_PHASE_COPYING and got.target_node == "n2"
        done = MS.Migration()
        done.CopyFrom(m)
        done.phase = MS.MIGRATION_PHASE_DONE
        f.apply(False, keys.migration("m-1").decode(), done.SerializeToString(), 6)
        f.apply(False, keys.checkpoint("c-1").decode(), ck.SerializeToString(), 7)
        assert [x.phase for x in (await svc.List(MS.ListMigrationsRequest(), None)).migrations] == \
            [MS.MIGRATION_PHASE_DONE]
        assert [c.step for c in (await svc.ListCheckpoints(MS.ListCheckpointsRequest(), None)).checkpoints] == [12]
        f.apply(True, keys.checkpoint("c-1").decode(), b"", 8)
        assert not f.migrations.checkpoints
    asyncio.run(main())


def test_deployment_records_follow_etcd_and_serve_reads():
    """A standby answers DeploymentService Get/List/Watch from the deployment and replica records it follows."""
    from gpumesh.v1 import deployment_service_pb2 as D
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", model="smollm2", tenant="t", replicas=2), generation=3)
    r1 = D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, endpoint="127.0.0.1:9001")
    assert READS["DeploymentService"] == {"Get", "List", "Watch"}

    async def main():
        f = Follower(FakeStore({keys.deployment("chat"): (d.SerializeToString(), 5, 0),
                                keys.replica("chat", "r-1"): (r1.SerializeToString(), 6, 0)}))
        await f._load()
        svc = f.reader("DeploymentService")
        got = await svc.Get(D.GetDeploymentRequest(name="chat"), None)
        assert got.generation == 3 and [(r.id, r.endpoint) for r in got.replicas] == [("r-1", "127.0.0.1:9001")]
        listed = await svc.List(D.ListDeploymentsRequest(model="smollm2"), None)
        assert [x.spec.name for x in listed.deployments] == ["chat"]
        assert not (await svc.List(D.ListDeploymentsRequest(model="other"), None)).deployments
        # a Watch sees the deployment, then each change of a replica, and ends when it is deleted
        seen = []

        async def watch():
            async for x in svc.Watch(D.WatchDeploymentRequest(name="chat"), None):
                seen.append(sorted((r.id, r.state) for r in x.replicas))
        async def until(cond, what):
            """The Watch answers the state when woken (changes in between coalesce): each change is waited for
            in what it sent, not given a fixed sleep, which a stalled worker can end before the watch ran."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not cond():
                assert loop.time() < deadline and not task.done(), f"the watch never sent {what}: {seen}"
                await asyncio.sleep(0.01)
        task = asyncio.create_task(watch())
        await until(lambda: seen, "the deployment")
        r2 = D.Replica(id="r-2", deployment="chat", state=D.REPLICA_STATE_STARTING)
        f.apply(False, keys.replica("chat", "r-2").decode(), r2.SerializeToString(), 7)
        await until(lambda: any(len(s) == 2 for s in seen), "both replicas")
        f.apply(True, keys.replica("chat", "r-1").decode(), b"", 8)
        await until(lambda: seen[-1] == [("r-2", D.REPLICA_STATE_STARTING)], "r-1 gone")
        f.apply(True, keys.deployment("chat").decode(), b"", 9)
        await asyncio.wait_for(task, 30)
        assert seen[0] == [("r-1", D.REPLICA_STATE_READY)]
        assert seen[-1] == [("r-2", D.REPLICA_STATE_STARTING)]
        assert any(len(s) == 2 for s in seen)
        with pytest.raises(errors.NotFound, match="chat"):      # Get answers NOT_FOUND, as on the leader
            f.deployments.store.get("chat")
        assert f.deployments.store.replicas_of("chat") == [r2]
    asyncio.run(main())


def test_a_deployment_watch_is_ended_to_watch_again_on_reload_and_stop():
    """On a standby's reload its records are cleared: a Watch woken then read its deployment as deleted and
    ended as if it were; after the standby's promotion (its follower stops) a Watch kept sending the stopped
    copy's record at every heartbeat. Both now end ABORTED: watch again."""
    from gpumesh.v1 import deployment_service_pb2 as D
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", model="smollm2", tenant="t", replicas=1), generation=1)

    async def main():
        f = Follower(FakeStore({keys.deployment("chat"): (d.SerializeToString(), 5, 0)}))
        await f._load()
        svc = f.reader("DeploymentService")

        async def first_then_rest(stream, seen):
            async for x in stream:
                seen.append(x)
        class Context:              # gRPC's: the stream's MeshError becomes its status
            async def abort_with_status(self, status):
                raise errors.Aborted(status.details)
        for end in (f._load, f.stop):
            seen = []
            task = asyncio.create_task(first_then_rest(svc.Watch(D.WatchDeploymentRequest(name="chat"), Context()),
                                                       seen))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not seen:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            await end()
            with pytest.raises(errors.Aborted, match="watch again"):
                await asyncio.wait_for(task, 30)
            assert [x.spec.name for x in seen] == ["chat"]
    asyncio.run(main())


def test_request_ids_are_followed_with_their_fingerprints():
    """A standby keeps the request ids as etcd has them: a bare id (the old format) and one with its fingerprint
    (before, the JSON value itself would have been taken for the allocation id)."""
    from controlplane.state import requestids

    async def main():
        f = Follower(FakeStore({keys.request("t", "old"): (b"a-1", 3, 5)}))
        await f._load()
        f.apply(False, keys.request("t", "new").decode(), requestids.encode("a-2", "sha256:ab"), 8)
        assert f.ctl.requests.lookup("t", "old") == "a-1" and f.ctl.requests.fingerprints[("t", "old")] == ""
        assert f.ctl.requests.check("t", "new", "sha256:ab") == "a-2"
        with pytest.raises(errors.RequestIdReused):
            f.ctl.requests.check("t", "new", "sha256:cd")
        f.apply(True, keys.request("t", "new").decode(), b"", 9)
        assert f.ctl.requests.lookup("t", "new") is None and ("t", "new") not in f.ctl.requests.fingerprints
    asyncio.run(main())


def test_gpu_health_follows_etcd():
    # a quarantined GPU read as healthy on a standby (its ListGpus / GetNode) until it led
    bad = types_pb2.GpuTelemetry(index=0, health=types_pb2.GPU_HEALTH_QUARANTINED, health_reason="XID 79 recurring")

    async def main():
        f = Follower(FakeStore({keys.node("n1"): (node().SerializeToString(), 3, 0),
                                keys.alive("n1"): (b"n1", 4, 99),
                                keys.gpu_health("n1", 0): (bad.SerializeToString(), 5, 0)}))
        await f._load()
        g = f.ctl.fleet.gpu("n1", 0)
        assert g.health == "quarantined" and g.telemetry.health_reason == "XID 79 recurring"
        ok = types_pb2.GpuTelemetry(index=0, health=types_pb2.GPU_HEALTH_HEALTHY)
        f.apply(False, keys.gpu_health("n1", 0).decode(), ok.SerializeToString(), 8)
        assert g.health == "healthy"
        f.apply(False, keys.gpu_health("n1", 0).decode(), bad.SerializeToString(), 9)
        assert g.health == "quarantined"
    asyncio.run(main())

"""A standby control plane serves reads from a read-only fleet that follows etcd (controlplane/state/follower.py):
a slice allocated on the leader shows through the standby's Get/List/Watch and ListNodes/GetNode/ListGpus,
its workload and mesh connection through WorkloadService and MeshService Get/List, a registered model
through ModelService Get/List, the leader's events through EventService List/Watch, a deployment through
DeploymentService Get/List/Watch, a write on the standby is refused naming the leader, and after the leader dies
the standby leads with the slice, the model and the events still there."""

from __future__ import annotations

import pytest

from gpumesh.v1 import types_pb2
from mesh import errors
from mesh import version as release
from mesh.client import MeshClient
from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster, sim_hosts


def test_standby_serves_reads_and_takes_over(tmp_path):
    # a 10 s leader lease: with 2 s, the leader's keepalive (refresh within 0.5 s, given up after 1.2 s) lapsed on a
    # loaded machine, and the leader stepped down mid-test; the failover at the end takes at most the TTL
    cluster = LocalCluster(tmp_path, sim_hosts(1, 2), lease_ttl=3, agents_per_process=1, controlplanes=2,
                           etcd_members=1, controlplane_args=["--leader-ttl", "10"], log_level="warning")
    try:
        cluster.start(timeout=60)
        leader = cluster.leader_index()
        standby = 1 - leader
        node = cluster.nodes[0]
        with MeshClient(cluster.cp_endpoints[leader], timeout=10) as lead, \
                MeshClient(cluster.cp_endpoints[standby], timeout=10) as sb:
            # the standby's view of the fleet: the node Ready, its GPUs (the standby follows etcd: it may see the
            # node Ready a moment after the leader did)
            wait_for(lambda: [n.name for n in sb.list_nodes(state="ready")] == [node], 30,
                     "the node Ready on the standby")
            assert sb.get_node(node).state == types_pb2.NODE_STATE_READY
            # versions: each control plane answers for itself (`meshctl version`), the standby too
            v_lead, v_sb = lead.version(), sb.version()
            assert (v_lead.leader, v_sb.leader) == (True, False)
            assert v_lead.identity and v_sb.identity and v_lead.identity != v_sb.identity
            assert v_lead.version == v_sb.version == release.VERSION and v_lead.api == "gpumesh.v1"
            assert len(v_lead.etcd_members) == len(cluster.etcd_endpoints) and all(v_lead.etcd_members.values())
            assert len(sb.list_gpus(node=node)) == 2
            with pytest.raises(errors.NotFound):
                sb.get_slice("s-missing")
            watch = sb.watch_slices(tenant="team-sb")
            alloc = lead.allocate(tenant="team-sb", mig_profile="1g.10gb", request_id="sb-1")
            sid = alloc.slices[0].id
            got = wait_for(lambda: _get(sb, sid), 30, "the slice on the standby")
            assert got.state == types_pb2.SLICE_STATE_READY and got.device_uuid == alloc.slices[0].device_uuid
            assert [s.id for s in sb.list_slices(tenant="team-sb")] == [sid]
            assert sb.get_node(node).slices == 1
            assert any(g.slices == 1 for g in sb.list_gpus(node=node))
            ev = next(iter(watch))
            assert ev.slice.id == sid
            watch.close()
            # a write on the standby: refused (UNAVAILABLE), naming the leader
            with pytest.raises(errors.Unavailable) as refused:
                sb.allocate(tenant="team-sb", mig_profile="1g.10gb", no_wait=True)
            assert cluster.cp_endpoints[leader] in str(refused.value)
            with pytest.raises(errors.Unavailable):
                sb.cordon(node)
            # workloads and mesh connections read on the standby too
            w = lead.run_workload(sid, ["sleep", "30"])
            got_w = wait_for(lambda: _maybe(sb.get_workload, w.id), 30, "the workload on the standby")
            assert got_w.slice_id == sid and [x.id for x in sb.list_workloads(slice_id=sid)] == [w.id]
            other = lead.allocate(tenant="team-sb", mig_profile="1g.10gb").slices[0].id
            conn = lead.mesh_connect(sid, other, size_bytes=1 << 20)
            got_c = wait_for(lambda: _maybe(sb.mesh_get, conn.id), 30, "the mesh connection on the standby")
            assert {got_c.slice_a, got_c.slice_b} == {sid, other}
            assert [c.id for c in sb.mesh_list(slice_id=other)] == [conn.id]
            lead.mesh_disconnect(conn.id)
            wait_for(lambda: not sb.mesh_list(slice_id=other), 30, "the disconnect on the standby")
            lead.stop_workload(w.id)
            # the model registry reads on the standby too; registering there is refused
            model = _tiny_model(tmp_path)
            lead.register_model(model)
            got_m = wait_for(lambda: _maybe(sb.get_model, model.name), 30, "the model on the standby")
            assert got_m.generation == 1 and [m.name for m in sb.list_models()] == [model.name]
            with pytest.raises(errors.Unavailable):
                sb.delete_model(model.name)
            # events: the slice's, listed on the standby; a new one reaches a watch on the standby
            wait_for(lambda: [e for e in sb.list_events(kind="Slice", name=sid) if e.reason == "SliceReady"], 30,
                     "the slice's events on the standby")
            stream = sb.watch_events(kind="Node", name=node, timeout=180)
            first = next(stream)
            assert first.type == first.SYNCED
            lead.cordon(node)
            lead.uncordon(node)
            notice = next(n for n in stream if n.event.reason == "Cordoned")
            assert notice.event.name == node
            stream.close()
            # deployments read on the standby (Get, List, Watch); changing one there is refused
            lead.deploy(model.name, name="tiny-dep", replicas=0, context=128)
            got_d = wait_for(lambda: _maybe(sb.get_deployment, "tiny-dep"), 30, "the deployment on the standby")
            assert got_d.spec.model == "tiny" and got_d.generation == 1
            assert [d.spec.name for d in sb.list_deployments()] == ["tiny-dep"]
            watched = sb.watch_deployment("tiny-dep", timeout=180)
            assert next(watched).spec.name == "tiny-dep"
            lead.scale_deployment("tiny-dep", 0)
            assert any(x.generation == 2 for x in watched)      # the scale, seen through the standby's Watch
            watched.close()
            with pytest.raises(errors.Unavailable):
                sb.scale_deployment("tiny-dep", 1)
            lead.undeploy("tiny-dep")
            wait_for(lambda: _maybe(sb.get_deployment, "tiny-dep") is None, 30, "the undeploy on the standby")
        cluster.kill_controlplane(index=leader)
        assert cluster.leader_index(timeout=30) == standby
        with MeshClient(cluster.cp_endpoints[standby], timeout=10) as new:
            assert new.get_slice(sid).allocation_id == alloc.allocation_id
            cluster.wait_ready(timeout=30)
            wait_for(lambda: new.get_slice(sid).state == types_pb2.SLICE_STATE_READY, 30, "the slice READY again")
            new.cordon(node)                # the former standby takes writes now
            new.uncordon(node)
            assert notice.event.id in {e.id for e in new.list_events(kind="Node", name=node)}
            assert new.delete_model("tiny").generation == 1
    finally:
        cluster.stop(grace=5)


def _maybe(read, ident):
    try:
        return read(ident)
    except errors.NotFound:
        return None


def _get(client, sid):
    try:
        s = client.get_slice(sid)
    except errors.NotFound:
        return None
    return s if s.state == types_pb2.SLICE_STATE_READY else None


def _tiny_model(tmp_path):
    from gpumesh.v1 import model_service_pb2 as M
    from tests.models_util import TINY_WEIGHT_BYTES, write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    return M.Model(name="tiny", variants=[M.Variant(
        name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), weight_bytes=TINY_WEIGHT_BYTES, max_context=256,
        architecture=M.Architecture(block_count=2, embedding_length=64, head_count=4, head_count_kv=2))])

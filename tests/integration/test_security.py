"""mTLS between agents and the control plane, tokens and roles for clients, tenant isolation."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from gpumesh.v1 import node_service_pb2, node_service_pb2_grpc, types_pb2
from mesh import errors, tls
from mesh.client import MeshClient
from tests.integration.conftest import HOSTS, wait_for
from tests.integration.secure import QUOTA_A_PRIORITY, QUOTA_A_SLICES, TOKENS, agent_channel, client, start

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    c = start(tmp_path_factory.mktemp("secure"), HOSTS)
    yield c
    c.stop()


@pytest.fixture
def clean(sc):
    yield
    with client(sc, "admin") as admin:
        for s in admin.list_slices():
            try:
                admin.release(s.id)
            except errors.MeshError:
                pass
        wait_for(lambda: not admin.list_slices(), 30, "slices to be released")


# -- transport ---------------------------------------------------------------------------------

def test_plaintext_client_is_refused_by_a_tls_server(sc):
    with MeshClient(sc.endpoint, token=TOKENS["admin"], timeout=5) as plain:
        with pytest.raises(errors.Unavailable):
            plain.list_nodes()


def test_missing_or_invalid_credentials_are_unauthenticated(sc):
    with client(sc, None) as anon, pytest.raises(errors.Unauthenticated, match="no credentials"):
        anon.list_nodes()
    with MeshClient(sc.endpoint, token="not-a-token-at-all", ca=str(sc.tls_dir / "ca.crt")) as bad, \
            pytest.raises(errors.Unauthenticated, match="invalid bearer token"):
        bad.list_slices()
    with client(sc, None) as anon:
        assert anon.health() == "serving"        # health checking stays open to load balancers


def test_agent_with_another_nodes_certificate_is_refused(sc):
    with agent_channel(sc, "gpu-a") as ch:
        stub = node_service_pb2_grpc.NodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Register(node_service_pb2.RegisterRequest(node_name="gpu-b"), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'gpu-a'" in e.value.details() and "'gpu-b'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(node_service_pb2.HeartbeatRequest(node_name="gpu-b"), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        hello = node_service_pb2.AgentMessage(hello=node_service_pb2.SyncHello(node_name="gpu-b"))
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.Sync(iter([hello]), timeout=10)))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # its own name is accepted
        assert stub.Heartbeat(node_service_pb2.HeartbeatRequest(node_name="gpu-a"), timeout=10).lease_ttl_seconds > 0


def test_agent_without_a_certificate_is_refused(sc):
    ca = tls.channel_credentials(str(sc.tls_dir / "ca.crt"))
    with grpc.secure_channel(sc.endpoint, ca) as ch:          # the token port: no client certificate
        stub = node_service_pb2_grpc.NodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Register(node_service_pb2.RegisterRequest(node_name="gpu-a"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:               # a client token does not make an agent
            stub.Register(node_service_pb2.RegisterRequest(node_name="gpu-a"), timeout=10,
                          metadata=[("authorization", f"Bearer {TOKENS['admin']}")])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(sc.mtls_endpoint, ca) as ch:     # the mTLS port refuses the handshake
        with pytest.raises(grpc.RpcError) as e:
            node_service_pb2_grpc.NodeServiceStub(ch).Heartbeat(
                node_service_pb2.HeartbeatRequest(node_name="gpu-a"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(sc, tmp_path):
    tls.write_ca(tmp_path)
    crt, key = tls.issue(tmp_path, "agent", "gpu-a")
    creds = tls.channel_credentials(str(sc.tls_dir / "ca.crt"), str(crt), str(key))
    with grpc.secure_channel(sc.mtls_endpoint, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            node_service_pb2_grpc.NodeServiceStub(ch).Heartbeat(
                node_service_pb2.HeartbeatRequest(node_name="gpu-a"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_agents_with_their_certificates_are_ready(sc):
    with client(sc, "admin") as admin:
        assert {n.name for n in admin.list_nodes() if n.state == types_pb2.NODE_STATE_READY} == {"gpu-a", "gpu-b"}


# -- roles -----------------------------------------------------------------------------------------

def test_viewer_and_tenant_cannot_cordon_admin_can(sc):
    for who in ("viewer-a", "team-a"):
        with client(sc, who) as c:
            assert {n.name for n in c.list_nodes()} == {"gpu-a", "gpu-b"}     # reads are allowed
            with pytest.raises(errors.PermissionDenied, match="needs the admin role"):
                c.cordon("gpu-a")
            with pytest.raises(errors.PermissionDenied):
                c.drain("gpu-a", dry_run=True)
            with pytest.raises(errors.PermissionDenied):
                c.mesh_grant("team-a", "team-b")
    with client(sc, "admin") as admin:
        assert admin.cordon("gpu-b").cordoned
        assert not admin.uncordon("gpu-b").cordoned


def test_viewer_cannot_allocate(sc):
    with client(sc, "viewer-a") as v, pytest.raises(errors.PermissionDenied, match="needs the tenant role"):
        v.allocate(tenant="team-a", mig_profile="1g.10gb")


# -- tenants -----------------------------------------------------------------------------------------

def test_tenants_see_and_change_only_their_own_slices(sc, clean):
    with client(sc, "team-a") as a, client(sc, "team-b") as b, client(sc, "admin") as admin, \
            client(sc, "viewer-a") as viewer:
        mine = a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB")      # tenant filled in from the token
        sa = mine.slices[0]
        assert sa.tenant == "team-a"
        theirs = b.allocate(tenant="team-b", mig_profile="1g.5gb", gpu_model="A100-40GB").slices[0]
        assert [s.id for s in a.list_slices()] == [sa.id]
        assert [s.id for s in viewer.list_slices()] == [sa.id]
        assert [s.id for s in b.list_slices()] == [theirs.id]
        assert {s.id for s in admin.list_slices()} == {sa.id, theirs.id}
        with pytest.raises(errors.NotFound):
            b.get_slice(sa.id)
        for sid in (sa.id, mine.allocation_id):
            with pytest.raises(errors.NotFound):
                b.release(sid)
        assert b.list_slices(allocation_id=mine.allocation_id) == []
        with pytest.raises(errors.PermissionDenied, match="team-a"):
            b.list_slices(tenant="team-a")
        with pytest.raises(errors.PermissionDenied, match="spec.tenant"):
            b.allocate(tenant="team-a", mig_profile="1g.5gb")
        for key in ("gpumesh.io/warm", "gpumesh.pool", "gpumesh.deployment", "gpumesh.replaces"):   # counted as such
            with pytest.raises(errors.InvalidArgument, match="set by gpumesh itself"):
                b.allocate(mig_profile="1g.5gb", labels={key: "true"})
        with pytest.raises(errors.PermissionDenied):
            viewer.release(sa.id)
        with b.watch_slices(send_initial=True) as w:
            assert [ev.slice.id for ev in w.initial] == [theirs.id]
        assert a.get_slice(sa.id).id == sa.id
        a.release(sa.id)


def test_workloads_and_mesh_stay_within_a_tenant(sc, clean):
    with client(sc, "team-a") as a, client(sc, "team-b") as b:
        s1, s2 = a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB", count=2).slices
        w = a.run_workload(s1.id, ["sleep", "30"])
        with pytest.raises(errors.NotFound):
            b.run_workload(s1.id, ["true"])
        with pytest.raises(errors.NotFound):
            b.get_workload(w.id)
        with pytest.raises(errors.NotFound):
            b.stop_workload(w.id)
        assert b.list_workloads() == [] and [x.id for x in a.list_workloads()] == [w.id]
        with pytest.raises(errors.NotFound):
            b.mesh_connect(s1.id, s2.id, 4096)
        conn = a.mesh_connect(s1.id, s2.id, 4096)
        with pytest.raises(errors.NotFound):
            b.mesh_get(conn.id)
        with pytest.raises(errors.NotFound):
            b.mesh_disconnect(conn.id)
        assert b.mesh_list() == [] and [c.id for c in a.mesh_list()] == [conn.id]
        a.mesh_disconnect(conn.id)
        a.stop_workload(w.id, grace_seconds=1)


def test_quota_from_the_tenants_file_is_enforced(sc, clean):
    with client(sc, "team-a") as a:
        a.allocate(mig_profile="1g.5gb", gpu_model="A100-40GB", count=QUOTA_A_SLICES)
        with pytest.raises(errors.ResourceExhausted, match="max_slices"):
            a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB")
        # a priority above the tenant's cap would outbid other tenants into preemption: refused first
        with pytest.raises(errors.ResourceExhausted, match=f"max_priority={QUOTA_A_PRIORITY} exceeded"):
            a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB", priority=QUOTA_A_PRIORITY + 1)


def test_client_certificate_authenticates_a_tenant(sc, clean):
    crt, key = tls.issue(sc.tls_dir, "client", "carol", tenant="team-b", role="tenant")
    with client(sc, "team-a") as a:
        a.allocate(mig_profile="1g.10gb", gpu_model="H100-80GB")
    with MeshClient(sc.mtls_endpoint, ca=str(sc.tls_dir / "ca.crt"), cert=str(crt), key=str(key)) as carol:
        assert carol.list_slices() == []
        s = carol.allocate(mig_profile="1g.5gb", gpu_model="A100-40GB").slices[0]
        assert s.tenant == "team-b"
        with pytest.raises(errors.PermissionDenied):
            carol.cordon("gpu-a")


# -- daemons refuse plaintext unless asked --------------------------------------------------------------

def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def test_daemons_refuse_to_start_without_tls_unless_insecure(tmp_path):
    res = _run("controlplane.main", "--state-dir", str(tmp_path / "cp"))
    assert res.returncode == 2 and "tls_cert" in res.stderr and "insecure" in res.stderr, res.stderr
    host = tmp_path / "h.yaml"
    host.write_text("node: n1\ngpus: [{model: H100-80GB, count: 1}]\n")
    res = _run("nodeagent.main", "--gpu-backend", "sim", "--sim-host-file", str(host))
    assert res.returncode == 2 and "tls_ca" in res.stderr and "insecure" in res.stderr, res.stderr
    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants: {a: {}}\ntokens: [{name: x, tenant: b, role: tenant, token: 0123456789abcdefgh}]\n")
    res = _run("controlplane.main", "--insecure", "--tenants-file", str(bad), "--state-dir", str(tmp_path / "cp"))
    assert res.returncode == 2 and "tenant 'b' is not under tenants" in res.stderr, res.stderr

"""What one tenant's request fields could do to another tenant (found by review), now refused or scoped:

- a deployment labelled `gpumesh.overflow-of=<another tenant's deployment>` became that deployment's
  variant-overflow companion (the autoscaler held the victim's own overflow back and scaled the intruder with its
  demand); the label is refused from tenants and a companion must be of the parent's tenant;
- anti-affinity rules in Allocate kept other tenants' slices off the nodes the rules' slices were on;
- a preempted slice's message named the preempting tenant and its allocation to the victim tenant;
- Migrate took any mode number and stored it.
"""

from __future__ import annotations

import pytest

from controlplane.api import auth
from controlplane.api.migrationsvc import MigrationService
from controlplane.controllers import autoscale_variants
from controlplane.controllers.slices import Controller
from controlplane.scheduler.framework import CycleState
from controlplane.scheduler.plugins.antiaffinity import Plugin as AntiAffinity
from controlplane.serving.deploysvc import DeploymentService
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from mesh import errors, slicespec
from tests.unit.test_deployment_requests import Aborted as Refused, Context
from tests.unit.test_slice_write_failures import _controller, _preempting, _slice

OVERFLOW = autoscale_variants.LABEL_OVERFLOW_OF


class as_tenant:
    def __init__(self, tenant: str, role: str = "tenant") -> None:
        self.who = auth.Principal("client", f"{tenant}-client", tenant=tenant, role=role)

    def __enter__(self):
        self.token = auth._current.set(self.who)

    def __exit__(self, *exc):
        auth._current.reset(self.token)


def dep(name: str, tenant: str, **labels) -> D.Deployment:
    return D.Deployment(spec=D.DeploymentSpec(name=name, tenant=tenant, model="smol", labels=labels))


def test_a_companion_is_of_its_parents_tenant():
    deps = {"chat": dep("chat", "b"), "aaa": dep("aaa", "a", **{OVERFLOW: "chat"}),
            "chat-q2": dep("chat-q2", "b", **{OVERFLOW: "chat"})}
    assert autoscale_variants.companion_of(deps, "chat").spec.name == "chat-q2"     # not a's "aaa", first in order
    del deps["chat-q2"]
    assert autoscale_variants.companion_of(deps, "chat") is None
    assert autoscale_variants.companion_of(deps, "gone") is None


def test_a_tenant_cannot_set_the_overflow_label():
    spec = dep("aaa", "a", **{OVERFLOW: "chat"}).spec
    with as_tenant("a"):
        with pytest.raises(errors.InvalidArgument) as e:
            DeploymentService._check_system_labels(spec)
        assert e.value.field == f"spec.labels[{OVERFLOW!r}]"
        DeploymentService._check_system_labels(spec, before=spec)          # an Update that keeps the stored value
        with pytest.raises(errors.InvalidArgument):
            DeploymentService._check_system_labels(spec, before=dep("aaa", "a").spec)
        DeploymentService._check_system_labels(dep("x", "a", team="ml").spec)
    with as_tenant("", role="admin"):
        DeploymentService._check_system_labels(spec)


def test_a_tenant_cannot_set_the_overflow_parents_creation_label():
    key = autoscale_variants.LABEL_OVERFLOW_PARENT_CREATED
    spec = dep("aaa", "a", **{key: "1"}).spec
    with as_tenant("a"):
        with pytest.raises(errors.InvalidArgument) as e:
            DeploymentService._check_system_labels(spec)
        assert e.value.field == f"spec.labels[{key!r}]"
        DeploymentService._check_system_labels(spec, before=spec)


def _node_with(*slices: T.Slice):
    ctl = _controller()
    for s in slices:
        ctl.fleet.put_slice(s)
    return ctl.fleet.nodes["n1"]


def _request(tenant: str, labels=None, rules=None) -> slicespec.SliceRequest:
    return slicespec.validate(T.SliceSpec(tenant=tenant, memory_bytes=1 << 30, isolation=T.ISOLATION_MPS,
                                          labels=labels or {}, anti_affinity=rules or {}))


def test_anti_affinity_does_not_reach_across_tenants():
    b_replica = _slice("s-b", tenant="b")
    b_replica.labels["app"] = "chat"
    a_blocker = _slice("s-a", tenant="a")
    a_blocker.anti_affinity["app"] = "chat"
    plugin = AntiAffinity()
    # a's rule on its resident slice does not keep b's replica away; b's own rule still spreads b
    assert plugin.filter(CycleState(), _request("b", labels={"app": "chat"}), _node_with(a_blocker)).ok
    b_spread = _slice("s-b2", tenant="b")
    b_spread.anti_affinity["app"] = "chat"
    assert not plugin.filter(CycleState(), _request("b", labels={"app": "chat"}), _node_with(b_spread)).ok
    # a's request with a rule naming b's label is not kept off b's node; b's request with it is
    assert plugin.filter(CycleState(), _request("a", rules={"app": "chat"}), _node_with(b_replica)).ok
    assert not plugin.filter(CycleState(), _request("b", rules={"app": "chat"}), _node_with(b_replica)).ok


async def test_a_preempted_tenant_is_not_told_who_preempted_it():
    ctl = _controller()
    ctl.fleet.put_slice(_slice("s-victim", tenant="low"))
    req = _preempting(ctl)                 # tenant "hi", priority 10, evicts s-victim

    async def write(ops, conds=()):
        return 7
    ctl.writer.write = write
    alloc, _ = await ctl.allocate(req, no_wait=True)
    victim = ctl.fleet.slices["s-victim"]
    assert victim.state == T.SLICE_STATE_RELEASING
    assert victim.message == "preempted by a higher-priority allocation (priority 10) of another tenant"
    assert "tenant hi" not in victim.message and alloc not in victim.message


async def test_migrate_refuses_an_unknown_mode():
    svc = MigrationService(manager=None)
    with pytest.raises(Refused) as e:
        await svc.Migrate(M.MigrateRequest(workload_id="w-1", mode=42), Context())
    assert e.value.args[0] == errors.InvalidArgument.code and "mode: 42 is not a migration mode" in e.value.args[1]


def test_a_tenant_certificate_without_its_tenant_is_refused(monkeypatch):
    """A tenant or viewer client certificate with no O (tenant) would be scoped to "", which List reads as all
    tenants; `tls.issue` never makes one, but another issuer under the same CA could."""
    from mesh import tls

    class Ctx:
        def auth_context(self):
            return {"x509_pem_cert": [b"(verified by the handshake)"]}

    a = auth.Authenticator(tenants=None, insecure=False)
    for role in ("tenant", "viewer"):
        monkeypatch.setattr(auth, "_subject", lambda pem, role=role: tls.Subject("client", "c", "", role))
        with pytest.raises(errors.Unauthenticated, match="without a tenant"):
            a.principal(Ctx())
    monkeypatch.setattr(auth, "_subject", lambda pem: tls.Subject("client", "c", "acme", "viewer"))
    assert a.principal(Ctx()).tenant == "acme"
    monkeypatch.setattr(auth, "_subject", lambda pem: tls.Subject("client", "ops", "", "admin"))
    assert a.principal(Ctx()).admin


def test_a_tenant_reads_only_the_pools_it_may_use_and_not_who_else_may():
    from controlplane.pools.service import shown
    from gpumesh.v1 import pool_service_pb2 as P
    shared, theirs, open_ = (P.Pool(name="shared", tenants=["a", "b"]), P.Pool(name="theirs", tenants=["b"]),
                             P.Pool(name="open"))
    with as_tenant("a", role="viewer"):
        assert list(shown(P.Pool(name="shared", tenants=["a", "b"])).tenants) == ["a"]
        assert shown(theirs) is None
        assert list(shown(open_).tenants) == []              # open to every tenant: nothing to hide
    with as_tenant("", role="admin"):
        assert list(shown(shared).tenants) == ["a", "b"]


def test_a_deployment_watch_ends_when_its_name_is_taken_by_another_deployment():
    """Watch re-read the deployment by name only: deleted and created again by another tenant between two
    sends (a watcher slow to read), the stream went on with the other tenant's deployment."""
    import asyncio
    from types import SimpleNamespace
    from google.protobuf.timestamp_pb2 import Timestamp
    from controlplane.serving.deploystore import DeploymentStore

    store = DeploymentStore(SimpleNamespace())
    mine = dep("chat", "a")
    mine.created_at.CopyFrom(Timestamp(seconds=100))
    store.deployments["chat"] = mine
    svc = DeploymentService(SimpleNamespace(store=store))

    async def watch():
        with as_tenant("a"):
            stream = svc.Watch(D.WatchDeploymentRequest(name="chat"), Context())
            first = await anext(stream)
            theirs = dep("chat", "b", secret="b's")
            theirs.created_at.CopyFrom(Timestamp(seconds=200))
            del store.deployments["chat"]
            store.deployments["chat"] = theirs
            store.changed("chat")
            return first, await anext(stream, None)

    first, after = asyncio.run(watch())
    assert first.spec.tenant == "a"
    assert after is None                    # the stream ended: b's deployment was not sent


def test_a_drained_nodes_event_carries_no_deployments_names_or_messages():
    """DrainWaiting on the node (GetNode, which every tenant's caller may read) named the deployment, its
    replicas and their messages (a FAILED replacement's holds its server's last log lines)."""
    from types import SimpleNamespace
    from controlplane.serving import drainstatus
    from controlplane.serving.deployments import DeploymentManager

    events = []
    telemetry = SimpleNamespace(record=lambda node, kind, reason, message: events.append((node, reason, message)))
    nodes = {"n1": SimpleNamespace(record=SimpleNamespace(draining=True)),
             "n2": SimpleNamespace(record=SimpleNamespace(draining=False))}
    m = DeploymentManager(SimpleNamespace(telemetry=telemetry, fleet=SimpleNamespace(nodes=nodes)), None, None)
    replicas = [D.Replica(id="r-old", deployment="secret-chat", node="n1", state=D.REPLICA_STATE_READY),
                D.Replica(id="r-new", deployment="secret-chat", node="n2", state=D.REPLICA_STATE_FAILED,
                          message="backend ended; last log lines:\nprompt: the merger with acme")]
    reason, message = drainstatus.status(m, "secret-chat", replicas, "WaitingForReplacements", "")
    assert "r-new" in message and "acme" in message                 # the deployment's own condition says it all
    [(node, why, text)] = events
    assert node == "n1" and why == "DrainWaiting" and "1 replica(s)" in text
    for private in ("secret-chat", "r-old", "r-new", "acme", "log lines"):
        assert private not in text


async def test_node_events_about_workloads_name_none_to_tenants():
    """GetNode and ListNodes showed every caller the health controller's events, which name a workload (any
    tenant's), its migration and the error that kept it from moving."""
    from types import SimpleNamespace

    from controlplane.api.services import AdminService
    from gpumesh.v1 import admin_service_pb2 as A
    secret = "GPU 0: workload w-other cannot be migrated off (no room for tenant acme's 40GiB); it keeps running"
    node = T.Node(name="n1", events=[T.NodeEvent(reason="GpuWorkloadNotMoved", message=secret, gpu_index=0),
                                     T.NodeEvent(reason="XidError", message="GPU 0: Xid 48", gpu_index=0)])
    nodes = SimpleNamespace(view=lambda name: T.Node().__class__.FromString(node.SerializeToString()))
    svc = AdminService(SimpleNamespace(fleet=SimpleNamespace(nodes={"n1": None})), nodes)
    with as_tenant("team-a"):
        got = await svc.GetNode(A.GetNodeRequest(name="n1"), Context())
        listed = (await svc.ListNodes(A.ListNodesRequest(), Context())).nodes[0]
    for n in (got, listed):
        assert [e.message for e in n.events] == [
            "GPU 0: GpuWorkloadNotMoved (the workload and the details are shown to administrators)", "GPU 0: Xid 48"]
    with as_tenant("ops", role="admin"):
        assert (await svc.GetNode(A.GetNodeRequest(name="n1"), Context())).events[0].message == secret


async def test_node_events_name_no_other_tenants_slices():
    """GetNode and ListNodes showed every caller the health controller's GpuUnhealthy/GpuLost/GpuQuarantined
    events ("...; slices on it: <every slice's ID>") and the agents' ReleaseBlocked ("slice <ID> cannot be released
    yet"): the IDs of other tenants' slices on the node, to any tenant's token."""
    from types import SimpleNamespace

    from controlplane.api.services import AdminService
    from gpumesh.v1 import admin_service_pb2 as A
    mine, theirs = "s-0123456789ab", "s-ba9876543210"
    node = T.Node(name="n1", events=[
        T.NodeEvent(reason="GpuUnhealthy", gpu_index=0, message=f"GPU 0 unhealthy: Xid 79; takes no new slices; "
                                                                f"slices on it: {mine}, {theirs}"),
        T.NodeEvent(reason="ReleaseBlocked", gpu_index=0, message=f"slice {theirs} cannot be released yet: busy"),
        T.NodeEvent(reason="XidError", gpu_index=0, message="GPU 0: Xid 48")])
    nodes = SimpleNamespace(view=lambda name: T.Node.FromString(node.SerializeToString()))
    slices = {mine: T.Slice(id=mine, tenant="team-a"), theirs: T.Slice(id=theirs, tenant="team-b")}
    svc = AdminService(SimpleNamespace(fleet=SimpleNamespace(nodes={"n1": None}, slices=slices)), nodes)
    for role in ("tenant", "viewer"):
        with as_tenant("team-a", role=role):
            got = await svc.GetNode(A.GetNodeRequest(name="n1"), Context())
            listed = (await svc.ListNodes(A.ListNodesRequest(), Context())).nodes[0]
        for n in (got, listed):
            text = "\n".join(e.message for e in n.events)
            assert theirs not in text and mine in text, text
            assert n.events[0].message.startswith("GPU 0 unhealthy: Xid 79; takes no new slices; slices on it: ")
            assert n.events[2].message == "GPU 0: Xid 48"
    with as_tenant("ops", role="admin"):
        assert [e.message for e in (await svc.GetNode(A.GetNodeRequest(name="n1"), Context())).events] == \
            [e.message for e in node.events]


async def test_a_viewer_reads_a_workloads_environment_names_not_its_values():
    """A workload's environment is what its tenant set, often its credentials (HF_TOKEN, a database password); a
    viewer (a dashboard, an on-call reader) got them from Get and List. It now reads the names with the values
    hidden; the tenant itself and admins read them, and the manager's record keeps them."""
    from types import SimpleNamespace
    from controlplane.controllers.workloads import ENV_HIDDEN, WorkloadService
    from gpumesh.v1 import workload_service_pb2 as WS
    # many variables: values set while iterating over a protobuf map were left unhidden now and then (upb)
    many = {f"VAR_{i}": f"value-{i}" for i in range(40)}
    w = T.Workload(id="w-1", tenant="a", slice_id="s-1", env={"HF_TOKEN": "hf_s3cret", "MODE": "eval", **many})
    manager = SimpleNamespace(workloads={"w-1": w}, get=lambda wid: w, list=lambda *a: [w])
    svc = WorkloadService(manager)

    async def answers():
        got = await WorkloadService.Get.__wrapped__(svc, WS.GetWorkloadRequest(id="w-1"), None)
        listed = await WorkloadService.List.__wrapped__(svc, WS.ListWorkloadsRequest(), None)
        return [got, listed.workloads[0]]
    with as_tenant("a", role="viewer"):
        for a in await answers():
            assert dict(a.env) == {k: ENV_HIDDEN for k in ("HF_TOKEN", "MODE", *many)}
            assert b"hf_s3cret" not in a.SerializeToString()
    for role in ("tenant", "admin"):
        with as_tenant("a", role=role):
            for a in await answers():
                assert dict(a.env) == {"HF_TOKEN": "hf_s3cret", "MODE": "eval", **many}
    assert w.env["HF_TOKEN"] == "hf_s3cret"

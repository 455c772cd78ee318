"""meshctl commands over a fake client: `update deployment` (flags and -f, through the real SDK code of
mesh.deployapi over a fake DeploymentService stub), `alloc`'s scheduler flags, `get grants|connections`,
`get ... -w`, `wake deployment`, the list filters, and the flag errors. Each test checks what reaches the
API and what is printed."""

from __future__ import annotations

import json

import pytest
import yaml

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import mesh_service_pb2 as MS
from gpumesh.v1 import migration_service_pb2 as MG
from gpumesh.v1 import slice_service_pb2 as S
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.deployapi import DeploymentApi
from tests.unit._meshctl_fake import install, run
from tools.meshctl import main as meshctl


class FakeDeployStub:
    """DeploymentService with one stored deployment; Update honours the generation like the server."""

    def __init__(self, d: D.Deployment) -> None:
        self.d = d
        self.updates: list[D.UpdateDeploymentRequest] = []
        self.woken: list[str] = []

    def Get(self, req, timeout=None):
        if req.name != self.d.spec.name:
            raise errors.NotFound(f"deployment {req.name!r} not found")
        return self.d

    def Update(self, req, timeout=None):
        self.updates.append(req)
        if req.generation and req.generation != self.d.generation:
            raise errors.MeshError(f"generation {req.generation} is stale (now {self.d.generation})")
        d = D.Deployment()
        d.CopyFrom(self.d)
        d.spec.replicas = req.spec.replicas
        d.spec.backend.CopyFrom(req.spec.backend)
        d.spec.labels.clear()
        d.spec.labels.update(req.spec.labels)
        d.generation += 1
        self.d = d
        return d

    def List(self, req, timeout=None):
        self.listed = req
        return D.ListDeploymentsResponse(deployments=[self.d])

    def Wake(self, req, timeout=None):
        self.woken.append(req.name)
        return D.WakeDeploymentResponse(woke=True, replicas=1, ready_replicas=0)

    def Watch(self, req, timeout=None):
        return FakeCall(self.watch_items)


class FakeCall:
    def __init__(self, items):
        self.items = list(items)
        self.cancelled = False

    def __iter__(self):
        return iter(self.items)

    def __next__(self):
        if not self.items:
            raise StopIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


def chat(generation: int = 3) -> D.Deployment:
    return D.Deployment(spec=D.DeploymentSpec(
        name="chat", model="smollm2-135m", variant="q4_1", replicas=2, tenant="team-a", pool="",
        labels={"team": "search", "old": "x"}, backend=D.BackendSettings(context=2048, concurrency=1)),
        status=D.DeploymentStatus(backend="llama.cpp", replicas=2, ready_replicas=2), generation=generation)


class FakeMesh(DeploymentApi):
    """The real DeploymentApi over FakeDeployStub, plus recording stand-ins for the other calls used here."""

    def __init__(self) -> None:
        self.timeout = 5.0
        self.stub = FakeDeployStub(chat())
        self.__dict__["_deploy_stub"] = self.stub
        self.calls: list[tuple[str, dict]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def allocate(self, **kw):
        self.calls.append(("allocate", kw))
        return S.AllocateResponse(allocation_id="a-1", slices=[types_pb2.Slice(id="s-1", allocation_id="a-1",
                                                                                 tenant=kw["tenant"])])

    def mesh_grants(self):
        self.calls.append(("mesh_grants", {}))
        return [MS.MeshGrant(from_tenant="team-a", to_tenant="team-b")]

    def mesh_list(self, tenant="", slice_id=""):
        self.calls.append(("mesh_list", {"tenant": tenant, "slice_id": slice_id}))
        return [MS.MeshConnection(id="m-1", tenant="team-a", transport="tcp", slice_a="s-1", slice_b="s-2",
                                  size_bytes=4 << 20, state=MS.MESH_CONNECTION_STATE_READY, message="connected"),
                MS.MeshConnection(id="m-2", tenant="team-a", transport="shm", slice_a="s-1", slice_b="s-3",
                                  size_bytes=4 << 20, state=MS.MESH_CONNECTION_STATE_FAILED,
                                  message="buffer b-m-2-s-1 of slice s-1 on node n1 is unusable (shrunk): ...")]

    def list_models(self, family="", labels=None):
        self.calls.append(("list_models", {"family": family, "labels": labels}))
        return []

    def list_events(self, **kw):
        self.calls.append(("list_events", kw))
        return []

    def list_nodes(self, state=None):
        return [types_pb2.Node(name=n, inventory=types_pb2.NodeInventory(hostname=n, labels=lbl))
                for n, lbl in (("gpu-a", {"tier": "serving", "zone": "eu-1"}), ("gpu-b", {"tier": "batch"}))]

    def list_slices(self, tenant="", node="", state=None):
        return [types_pb2.Slice(id=i, tenant="team-a", labels=lbl)
                for i, lbl in (("s-1", {"gpumesh.deployment": "chat"}), ("s-2", {}))]

    def list_workloads(self, tenant="", node="", slice_id=""):
        return [types_pb2.Workload(id=i, labels=lbl) for i, lbl in (("w-1", {"app": "train"}), ("w-2", {}))]

    def watch_slices(self, tenant="", node="", send_initial=False):
        self.calls.append(("watch_slices", {"tenant": tenant, "node": node, "send_initial": send_initial}))
        return FakeSliceWatch()

    def watch_migration(self, id, timeout=None):
        self.calls.append(("watch_migration", {"id": id}))
        m = MG.Migration(id=id, workload_id="w-1", phase=MG.MIGRATION_PHASE_COPYING, source_node="n1")
        m2 = MG.Migration()
        m2.CopyFrom(m)
        m2.phase = MG.MIGRATION_PHASE_DONE
        return iter([m, m, m2])


class FakeSliceWatch:
    def __init__(self):
        self.initial = [S.SliceEvent(type=S.SliceEvent.ADDED, slice=types_pb2.Slice(
            id="s-1", tenant="team-a", state=types_pb2.SLICE_STATE_PENDING))]
        self.closed = False
        self.live = [S.SliceEvent(type=S.SliceEvent.MODIFIED, slice=types_pb2.Slice(
            id="s-1", tenant="team-a", state=types_pb2.SLICE_STATE_READY)),
            S.SliceEvent(type=S.SliceEvent.ADDED, slice=types_pb2.Slice(id="s-2", tenant="team-a"))]

    def __iter__(self):
        return iter(self.live)

    def close(self):
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch, FakeMesh())


# -- 1. update deployment ------------------------------------------------------------------------------

def test_update_deployment_flags_change_only_what_is_given(fake, capsys):
    rc, out, err = run(capsys, "update", "deployment", "chat", "--replicas", "3", "--context", "4096",
                       "--gpu-layers", "20", "--label", "tier=prod", "--label", "old-", "-o", "json")
    assert rc == 0, err
    req = fake.stub.updates[-1]
    assert req.generation == 3                                   # guarded by the generation read
    assert req.spec.replicas == 3 and req.spec.backend.context == 4096 and req.spec.backend.gpu_layers == 20
    assert req.spec.backend.concurrency == 1                     # not given: kept
    assert dict(req.spec.labels) == {"team": "search", "tier": "prod"}
    assert req.spec.model == "smollm2-135m"
    doc = json.loads(out)
    assert doc["replicas"] == 3 and doc["generation"] == 4
    assert "updated (generation 4)" in err


def test_update_deployment_device_auto_clears_the_pin(fake, capsys):
    fake.stub.d.spec.backend.device = "cpu"
    rc, _, err = run(capsys, "update", "deploy", "chat", "--device", "auto")
    assert rc == 0, err
    assert fake.stub.updates[-1].spec.backend.device == ""


def test_update_deployment_from_file_uses_its_generation(fake, capsys, tmp_path):
    from mesh.deployapi import deployment_to_dict
    doc = deployment_to_dict(chat(generation=3))
    doc["replicas"] = 5
    doc["backend"]["concurrency"] = 4
    doc["labels"] = {"team": "ads"}
    f = tmp_path / "chat.yaml"
    f.write_text(yaml.safe_dump(doc))
    rc, out, err = run(capsys, "update", "deployment", "-f", str(f))
    assert rc == 0, err
    req = fake.stub.updates[-1]
    assert (req.generation, req.spec.replicas, req.spec.backend.concurrency) == (3, 5, 4)
    assert dict(req.spec.labels) == {"team": "ads"}              # the file's labels replace the stored ones
    assert "chat" in out
    # the same file again: its generation (3) is stale now -> the server's refusal, no second write applied
    rc, _, err = run(capsys, "update", "deployment", "-f", str(f))
    assert rc == 1 and "stale" in err and fake.stub.d.generation == 4


def test_update_deployment_file_cannot_change_the_model(fake, capsys, tmp_path):
    from mesh.deployapi import deployment_to_dict
    doc = deployment_to_dict(chat())
    doc["model"] = "other"
    f = tmp_path / "chat.yaml"
    f.write_text(yaml.safe_dump(doc))
    rc, _, err = run(capsys, "update", "deployment", "-f", str(f))
    assert rc == 1 and "model" in err and "cannot change" in err
    assert fake.stub.updates == []


def test_update_deployment_file_names_a_bad_field(fake, capsys, tmp_path):
    f = tmp_path / "chat.yaml"
    f.write_text(yaml.safe_dump({"name": "chat", "backend": {"context": -1}}))
    rc, _, err = run(capsys, "update", "deployment", "-f", str(f))
    assert rc == 1 and "backend.context" in err
    f.write_text(yaml.safe_dump({"name": "chat", "backend": {"ctx": 5}}))
    rc, _, err = run(capsys, "update", "deployment", "-f", str(f))
    assert rc == 1 and "backend.ctx" in err and fake.stub.updates == []


@pytest.mark.parametrize("argv, needle", [
    (["update", "deployment", "chat"], "nothing to change"),
    (["update", "deployment", "chat", "--max-slices", "3"], "--max-slices: pool flags"),
    (["update", "pool", "p", "--replicas", "3"], "--replicas: deployment flags"),
    (["update", "deployment", "--replicas", "2"], "NAME (or -f FILE)"),
])
def test_update_refuses_flags_of_the_other_kind(fake, capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and needle in err and fake.stub.updates == []


def test_update_label_syntax_error_names_the_flag(fake, capsys):
    with pytest.raises(SystemExit) as e:
        meshctl.main(["update", "deployment", "chat", "--label", "oops"])
    assert e.value.code == 2
    assert "--label" in capsys.readouterr().err


def test_update_pool_still_parses():
    args = meshctl.build_parser().parse_args(["update", "pool", "inference-a", "--max-slices", "8"])
    assert args.kind == "pool" and args.max_slices == 8 and args.replicas is None


# -- 2. alloc flags ------------------------------------------------------------------------------------

def test_alloc_passes_scheduler_fields(fake, capsys):
    rc, out, err = run(capsys, "alloc", "--tenant", "team-a", "--profile", "1g.10gb", "--preempt",
                       "--anti-affinity", "app=db", "--cpu", "500m", "--host-memory", "2GiB", "-o", "json")
    assert rc == 0, err
    kw = dict(fake.calls)["allocate"]
    assert kw["preempt"] is True and kw["anti_affinity"] == {"app": "db"}
    assert kw["cpu_milli"] == 500 and kw["host_memory_bytes"] == 2 << 30
    assert json.loads(out)["id"] == "a-1"


def test_alloc_without_tenant_is_the_callers(fake, capsys):
    # README's secure setup: `meshctl alloc --profile 3g.40gb` as a tenant's token; the control plane takes
    # a spec without a tenant as the caller's (an admin without one is told spec.tenant is required)
    rc, out, err = run(capsys, "alloc", "--profile", "3g.40gb", "-o", "json")
    assert rc == 0, err
    assert dict(fake.calls)["allocate"]["tenant"] == ""


def test_alloc_cpu_in_cpus_and_bad_values():
    p = meshctl.build_parser()
    assert p.parse_args(["alloc", "--tenant", "t", "--memory", "1GiB", "--cpu", "1.5"]).cpu == 1500
    for bad in (["--cpu", "lots"], ["--cpu", "0"], ["--anti-affinity", "novalue"], ["--host-memory", "big"]):
        with pytest.raises(SystemExit):
            p.parse_args(["alloc", "--tenant", "t", "--memory", "1GiB", *bad])


def test_sdk_allocate_builds_the_spec():
    from mesh.client import MeshClient

    class Slices:
        def Allocate(self, req, timeout=None):
            self.req = req
            return S.AllocateResponse(allocation_id="a-2")
    c = MeshClient.__new__(MeshClient)
    c.timeout = 5.0
    c._slices = Slices()
    c.allocate(tenant="t", memory_bytes=1 << 30, preempt=True, anti_affinity={"k": "v"}, cpu_milli=250,
               host_memory_bytes=1 << 20, no_wait=True)
    spec = c._slices.req.spec
    assert spec.preempt and dict(spec.anti_affinity) == {"k": "v"} and spec.cpu_milli == 250
    assert spec.host_memory_bytes == 1 << 20


# -- 3. grants and connections -------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["get", "grants"], ["mesh", "grants"]])
def test_grants(fake, capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert out.split("\n")[0].split() == ["FROM", "TENANT", "TO", "TENANT", "AGE"] and "team-b" in out
    rc, out, _ = run(capsys, *argv, "-o", "yaml")
    assert yaml.safe_load(out)["items"][0] == {"from_tenant": "team-a", "to_tenant": "team-b", "created_at": None}


def test_get_connections_is_mesh_get(fake, capsys):
    rc, out, err = run(capsys, "get", "connections", "--tenant", "team-a", "--slice", "s-1")
    assert rc == 0, err
    assert ("mesh_list", {"tenant": "team-a", "slice_id": "s-1"}) in fake.calls
    assert out.startswith("ID") and "m-1" in out
    # why a connection is not READY: under the table (a READY one's message is not repeated there)
    assert out.endswith("\n\nm-2 failed: buffer b-m-2-s-1 of slice s-1 on node n1 is unusable (shrunk): ...\n")


# -- 4. watch ------------------------------------------------------------------------------------------

def test_get_slices_watch_prints_a_line_per_change(fake, capsys):
    rc, out, err = run(capsys, "get", "slices", "-w", "--tenant", "team-a")
    assert rc == 0, err
    lines = out.strip().split("\n")
    assert lines[0].split()[:2] == ["EVENT", "ID"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["ADDED", "s-1"], ["MODIFIED", "s-1"], ["ADDED", "s-2"]]
    assert ("watch_slices", {"tenant": "team-a", "node": "", "send_initial": True}) in fake.calls


def test_get_slices_watch_names_and_json(fake, capsys):
    rc, out, _ = run(capsys, "get", "slices", "s-2", "-w", "-o", "json")
    docs = [json.loads(x) for x in out.strip().split("\n")]
    assert [(d["type"], d["object"]["id"]) for d in docs] == [("ADDED", "s-2")]


def test_get_deployment_watch(fake, capsys):
    later = chat(generation=4)
    later.status.ready_replicas = 1
    fake.stub.watch_items = [chat(), chat(), later]
    rc, out, err = run(capsys, "get", "deployment", "chat", "-w")
    assert rc == 0, err
    lines = out.strip().split("\n")
    assert lines[0].split()[:2] == ["EVENT", "NAME"]
    assert [ln.split()[0] for ln in lines[1:]] == ["ADDED", "MODIFIED"]       # the repeat left out
    assert "1/2" in lines[2]


def test_get_migration_watch_yaml(fake, capsys):
    rc, out, err = run(capsys, "get", "migration", "m-1", "-w", "-o", "yaml")
    assert rc == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [(d["type"], d["object"]["phase"]) for d in docs] == [("ADDED", "copying"), ("MODIFIED", "done")]


@pytest.mark.parametrize("argv, needle", [
    (["get", "deployments", "-w"], "give one NAME"),
    (["get", "nodes", "-w"], "--watch applies to"),
    (["get", "nodes", "--reason", "X"], "--reason applies to events"),
    (["get", "slices", "--model", "m"], "--model applies to deployments"),
    (["get", "events", "-w", "--limit", "3"], "--limit applies to the list"),
])
def test_get_flag_errors_name_the_flag(fake, capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and needle in err


def test_watch_ctrl_c_ends_cleanly(fake, capsys):
    class Interrupting(FakeSliceWatch):
        def __iter__(self):
            yield self.live[0]
            raise KeyboardInterrupt
    w = Interrupting()
    fake.watch_slices = lambda **kw: w
    rc, out, _ = run(capsys, "get", "slices", "-w")
    assert rc == 0 and w.closed and "MODIFIED" in out


# -- 5. wake -------------------------------------------------------------------------------------------

def test_wake_deployment(fake, capsys):
    rc, out, err = run(capsys, "wake", "deployment", "chat")
    assert rc == 0, err
    assert fake.stub.woken == ["chat"] and "woken" in out and "1 replica(s) wanted" in out
    rc, out, _ = run(capsys, "wake", "deploy", "chat", "-o", "json")
    assert json.loads(out)["woke"] is True


# -- 6. filters ----------------------------------------------------------------------------------------

def test_get_deployments_filters_reach_the_server(fake, capsys):
    rc, _, err = run(capsys, "get", "deployments", "--model", "smollm2-135m", "-l", "team=search")
    assert rc == 0, err
    assert fake.stub.listed.model == "smollm2-135m" and dict(fake.stub.listed.labels) == {"team": "search"}


@pytest.mark.parametrize("kind,selector,names", [
    ("nodes", ["-l", "tier=serving"], ["gpu-a"]),
    ("nodes", ["-l", "tier=serving", "-l", "zone=eu-2"], []),
    ("nodes", [], ["gpu-a", "gpu-b"]),
    ("slices", ["-l", "gpumesh.deployment=chat"], ["s-1"]),
    ("workloads", ["--selector", "app=train"], ["w-1"]),
])
def test_get_nodes_slices_and_workloads_by_label(fake, capsys, kind, selector, names):
    rc, out, err = run(capsys, "get", kind, *selector, "-o", "json")
    assert rc == 0, err
    got = json.loads(out)
    items = got["items"] if isinstance(got, dict) else got
    assert sorted(i.get("name") or i["id"] for i in items) == names


def test_get_models_and_events_filters(fake, capsys):
    run(capsys, "get", "models", "--family", "llama", "-l", "tier=prod")
    assert ("list_models", {"family": "llama", "labels": {"tier": "prod"}}) in fake.calls
    run(capsys, "get", "events", "--reason", "Preempted", "--limit", "5")
    kw = dict(fake.calls)["list_events"]
    assert kw["reason"] == "Preempted" and kw["limit"] == 5


# -- 7. resize says what it did --------------------------------------------------------------------------

def _slice(iso, profile="", mem=10 << 30, share=0.14, node="n1", gpu=0):
    return types_pb2.Slice(id="s-1", isolation=iso, profile=profile, memory_bytes=mem, compute_share=share,
                           node=node, gpu_index=gpu)


@pytest.mark.parametrize("before, after, said", [
    # a MIG slice whose profile already holds --memory: nothing changed (it printed "resized ... (in place)")
    (_slice(types_pb2.ISOLATION_MIG, "2g.20gb", 20 << 30), _slice(types_pb2.ISOLATION_MIG, "2g.20gb", 20 << 30),
     "slice/s-1 unchanged: already 2g.20gb"),
    # MIG resizes by migration, even onto the same GPU (it printed "(in place)")
    (_slice(types_pb2.ISOLATION_MIG, "1g.10gb"), _slice(types_pb2.ISOLATION_MIG, "2g.20gb", 20 << 30),
     "resized: 2g.20gb, 20.0 GiB, compute 0.14 on n1/0 (by migration)"),
    (_slice(types_pb2.ISOLATION_MPS, mem=8 << 30), _slice(types_pb2.ISOLATION_MPS, mem=12 << 30), "(in place)"),
    (_slice(types_pb2.ISOLATION_MPS, mem=8 << 30), _slice(types_pb2.ISOLATION_MPS, mem=60 << 30, gpu=3),
     "on n1/3 (by migration)"),
])
def test_resize_says_whether_it_changed_and_how(fake, capsys, before, after, said):
    fake.get_slice = lambda id: before
    fake.resize = lambda id, **kw: after
    rc, out, err = run(capsys, "resize", "s-1", "--memory", "12GiB")
    assert rc == 0, err
    assert said in out

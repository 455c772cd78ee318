"""mesh.client against a real in-process gRPC server: typed errors from rich statuses,
request shapes, and what `meshctl` prints for them."""

import json
import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpumesh.v1 import (admin_service_pb2, admin_service_pb2_grpc, slice_service_pb2, slice_service_pb2_grpc,
                        types_pb2)
from mesh import errors
from mesh.client import MeshClient
from mesh.richstatus import to_status
from tools.meshctl.main import main

GiB = 1 << 30
REASONS = {"H100-80GB": "no free 3g.40gb placement on 16 GPUs", "cordoned": "2 nodes cordoned"}


def a_slice(i=1, tenant="team-a"):
    return types_pb2.Slice(id=f"s-{i:04d}", allocation_id="a-0001", tenant=tenant, node="sim-node-01",
                           gpu_index=i, isolation=types_pb2.ISOLATION_MIG, profile="1g.10gb",
                           placement=types_pb2.Placement(start=i, size=1), memory_bytes=10 * GiB,
                           state=types_pb2.SLICE_STATE_READY, device_uuid=f"MIG-{i}")


A_NODE = types_pb2.Node(name="sim-node-01", state=types_pb2.NODE_STATE_READY, slices=1,
                        inventory=types_pb2.NodeInventory(gpus=[types_pb2.Gpu(index=0, model="H100-80GB")]))

FAILURES = {
    "bad": errors.InvalidArgument.of("spec.memory_bytes", "must be > 0", "a positive number of bytes"),
    "full": errors.ResourceExhausted("cannot place 1 slice of 3g.40gb", reasons=REASONS),
    "race": errors.Aborted("lost a race; retry"),
    "denied": errors.PermissionDenied("tenant denied may not allocate"),
}


class Slices(slice_service_pb2_grpc.SliceServiceServicer):
    def __init__(self):
        self.requests = []

    def Allocate(self, request, context):
        self.requests.append(request)
        tenant = request.spec.tenant
        if tenant in FAILURES:
            context.abort_with_status(to_status(FAILURES[tenant]))
        if tenant == "plain":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        return slice_service_pb2.AllocateResponse(
            allocation_id="a-0001", slices=[a_slice(i, tenant) for i in range(max(1, request.spec.count))])

    def Release(self, request, context):
        return slice_service_pb2.ReleaseResponse(slices=[a_slice(1)])

    def Get(self, request, context):
        context.abort_with_status(to_status(errors.NotFound(f"slice {request.id} not found",
                                                            kind="slice", name=request.id)))

    def List(self, request, context):
        return slice_service_pb2.ListSlicesResponse(slices=[a_slice(1), a_slice(2)])

    def Watch(self, request, context):
        for i in (1, 2):
            yield slice_service_pb2.SliceEvent(type=slice_service_pb2.SliceEvent.ADDED, slice=a_slice(i), revision=i)
        yield slice_service_pb2.SliceEvent(type=slice_service_pb2.SliceEvent.SYNCED, revision=2)
        yield slice_service_pb2.SliceEvent(type=slice_service_pb2.SliceEvent.MODIFIED, slice=a_slice(3), revision=3)
        context.abort(grpc.StatusCode.UNAVAILABLE, "control plane stopping")


class Admin(admin_service_pb2_grpc.AdminServiceServicer):
    def ListNodes(self, request, context):
        return admin_service_pb2.ListNodesResponse(nodes=[A_NODE])

    def GetNode(self, request, context):
        if request.name != A_NODE.name:
            context.abort_with_status(to_status(errors.NotFound(f"node {request.name!r} not found")))
        return A_NODE

    def CordonNode(self, request, context):
        node = types_pb2.Node()
        node.CopyFrom(A_NODE)
        node.cordoned = True
        return node

    def DrainNode(self, request, context):
        return admin_service_pb2.DrainNodeResponse(node=A_NODE, evicted=[a_slice(1)])

    def ListGpus(self, request, context):
        return admin_service_pb2.ListGpusResponse(gpus=[types_pb2.GpuStatus(node="sim-node-01", gpu=A_NODE.inventory.gpus[0])])


@pytest.fixture(scope="module")
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    slices = Slices()
    slice_service_pb2_grpc.add_SliceServiceServicer_to_server(slices, srv)
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), srv)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", slices
    srv.stop(0)


@pytest.fixture
def mesh(server):
    with MeshClient(server[0], timeout=30) as c:
        yield c


@pytest.fixture(autouse=True)
def no_context(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MESH_ENDPOINT", raising=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_invalid_argument_names_the_field(mesh):
    with pytest.raises(errors.InvalidArgument) as info:
        mesh.allocate(tenant="bad", memory_bytes=-1)
    assert info.value.field == "spec.memory_bytes"
    assert "must be > 0" in info.value.message and "allowed: a positive number of bytes" in info.value.message
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_resource_exhausted_carries_reasons_per_node_class(mesh):
    with pytest.raises(errors.ResourceExhausted) as info:
        mesh.allocate(tenant="full", mig_profile="3g.40gb")
    assert info.value.reasons == REASONS
    assert "cannot place" in str(info.value)


@pytest.mark.parametrize("tenant, kind", [("race", errors.Aborted), ("denied", errors.PermissionDenied)])
def test_other_codes_map_to_their_types(mesh, tenant, kind):
    with pytest.raises(kind):
        mesh.allocate(tenant=tenant, mig_profile="1g.10gb")


def test_not_found_and_plain_statuses(mesh):
    with pytest.raises(errors.NotFound, match="s-nope"):
        mesh.get_slice("s-nope")
    with pytest.raises(errors.NotFound):
        mesh.get_node("no-such-node")
    with pytest.raises(errors.MeshError) as info:
        mesh.allocate(tenant="plain", mig_profile="1g.10gb")
    assert type(info.value) is errors.MeshError and info.value.code == grpc.StatusCode.INTERNAL
    assert info.value.message == "boom"


def test_unreachable_control_plane_is_unavailable():
    with MeshClient(f"127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(errors.Unavailable):
            c.list_nodes()


def test_allocate_builds_the_request(server, mesh):
    resp = mesh.allocate(tenant="team-a", memory_bytes=8 * GiB, compute_share=0.25, isolation="mps",
                         gpu_model="H100-80GB", count=2, topology="same-nvlink", priority=7,
                         labels={"job": "x"}, request_id="r-1", no_wait=True, timeout_seconds=5)
    assert resp.allocation_id == "a-0001" and len(resp.slices) == 2
    req = server[1].requests[-1]
    assert req.spec.isolation == types_pb2.ISOLATION_MPS
    assert req.spec.topology == types_pb2.TOPOLOGY_SAME_NVLINK_DOMAIN
    assert (req.spec.memory_bytes, req.spec.count, req.spec.priority) == (8 * GiB, 2, 7)
    assert dict(req.spec.labels) == {"job": "x"} and req.request_id == "r-1" and req.no_wait
    spec = types_pb2.SliceSpec(tenant="team-b", mig_profile="1g.10gb")
    mesh.allocate(spec)
    assert server[1].requests[-1].spec == spec


def test_unknown_enum_names_are_refused_before_sending(server, mesh):
    sent = len(server[1].requests)
    with pytest.raises(errors.InvalidArgument) as info:
        mesh.allocate(tenant="team-a", memory_bytes=GiB, isolation="vgpu")
    assert info.value.field == "spec.isolation" and "mig" in info.value.message
    with pytest.raises(errors.InvalidArgument):
        mesh.list_slices(state="running")
    assert len(server[1].requests) == sent


def test_watch_yields_events_then_a_typed_error(mesh):
    seen = []
    watch = mesh.watch_slices(send_initial=True)
    assert [e.slice.id for e in watch.initial] == ["s-0001", "s-0002"]
    with pytest.raises(errors.Unavailable, match="stopping"):
        for event in watch:
            seen.append(event.slice.id)
    assert seen == ["s-0003"]


def test_admin_calls_and_health(mesh):
    assert [n.name for n in mesh.list_nodes(state="ready")] == ["sim-node-01"]
    assert mesh.cordon("sim-node-01").cordoned
    assert [s.id for s in mesh.drain("sim-node-01", dry_run=True).evicted] == ["s-0001"]
    assert mesh.list_gpus()[0].node == "sim-node-01"
    assert mesh.health() == "serving"


# -- meshctl against the same server ---------------------------------------------

def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_meshctl_prints_invalid_argument(server, capsys):
    rc, out, err = run(capsys, "--endpoint", server[0], "alloc", "--tenant", "bad", "--memory", "1GiB")
    assert rc == 1 and out == ""
    assert err.startswith("error: spec.memory_bytes: must be > 0") and "Traceback" not in err


def test_meshctl_prints_unschedulable_reasons(server, capsys):
    rc, _, err = run(capsys, "alloc", "--endpoint", server[0], "--tenant", "full", "--profile", "3g.40gb")
    assert rc == 1
    assert err.splitlines() == ["error: cannot place 1 slice of 3g.40gb",
                                "  H100-80GB: no free 3g.40gb placement on 16 GPUs", "  cordoned: 2 nodes cordoned"]


def test_meshctl_unreachable_and_no_endpoint(capsys):
    rc, _, err = run(capsys, "--endpoint", f"127.0.0.1:{free_port()}", "--timeout", "2", "get", "nodes")
    assert rc == 1 and err.startswith("error: cannot reach the control plane at 127.0.0.1:")
    rc, _, err = run(capsys, "get", "nodes")
    assert rc == 1 and "meshctl up" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["alloc", "--tenant", "t", "--memory", "lots"],
                                  ["alloc", "--tenant", "t"],
                                  ["alloc", "--tenant", "t", "--profile", "1g.10gb", "--memory", "1GiB"],
                                  ["alloc", "--tenant", "t", "--memory", "1GiB", "--compute", "2"],
                                  ["get"], ["frobnicate"]])
def test_meshctl_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_meshctl_happy_paths(server, capsys):
    ep = server[0]
    rc, out, _ = run(capsys, "--endpoint", ep, "-o", "json", "alloc", "--tenant", "team-a", "--profile", "1g.10gb",
                     "--count", "2", "--label", "job=x")
    assert rc == 0 and json.loads(out)["id"] == "a-0001" and len(json.loads(out)["slices"]) == 2
    assert dict(server[1].requests[-1].spec.labels) == {"job": "x"}
    rc, out, _ = run(capsys, "get", "sl", "--endpoint", ep, "-o", "json")
    assert rc == 0 and [s["id"] for s in json.loads(out)["items"]] == ["s-0001", "s-0002"]
    rc, out, _ = run(capsys, "get", "no", "--endpoint", ep)
    assert rc == 0 and out.split("\n")[1].split()[:2] == ["sim-node-01", "Ready"]
    rc, out, _ = run(capsys, "--endpoint", ep, "describe", "node", "sim-node-01")
    assert rc == 0 and "Name:" in out and "s-0001" in out
    rc, out, _ = run(capsys, "--endpoint", ep, "cordon", "sim-node-01")
    assert (rc, out) == (0, "node/sim-node-01 cordoned\n")
    rc, out, _ = run(capsys, "--endpoint", ep, "drain", "sim-node-01", "--dry-run")
    assert rc == 0 and "would evict slice/s-0001" in out
    rc, out, _ = run(capsys, "--endpoint", ep, "release", "a-0001")
    assert rc == 0 and "s-0001" in out
    rc, _, err = run(capsys, "--endpoint", ep, "describe", "slice", "s-nope")
    assert rc == 1 and err == "error: slice s-nope not found\n"

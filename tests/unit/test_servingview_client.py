"""The SDK's ServingViewService calls (mesh.servingviewapi) and `meshctl get servingview` against a real
in-process gRPC server: the request that reaches it, one snapshot and the stream, typed errors, the table,
-o json with the replica keys redacted, -w leaving heartbeats out, and the flag errors."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
import yaml

from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import servingview_service_pb2_grpc
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from mesh.client import MeshClient
from mesh.richstatus import to_status
from tools.meshctl.main import main


def a_view(sequence: int, replicas: int = 1) -> V.ServingView:
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", model="smol", variant="q4", replicas=replicas,
                                           tenant="team-a"))
    for i in range(replicas):
        d.replicas.append(D.Replica(id=f"r-{i}", deployment="chat", node="n1", gpu_index=0, endpoint=f"10.0.0.1:{i}",
                                    state=D.REPLICA_STATE_READY))
    other = D.Deployment(spec=D.DeploymentSpec(name="embed", model="smol", replicas=1),
                         replicas=[D.Replica(id="e-0", deployment="embed", node="n1", gpu_index=0,
                                             state=D.REPLICA_STATE_STARTING)])
    view = V.ServingView(deployments=[d, other], models=[M.Model(name="smol")], sequence=sequence,
                         gpus=[T.GpuStatus(node="n1", gpu=T.Gpu(index=0), telemetry=T.GpuTelemetry(
                             health=T.GPU_HEALTH_HEALTHY, thermal_state=T.THERMAL_STATE_NORMAL))],
                         model_costs=[C.ModelCost(model="smol", dollars_per_hour=1.5)],
                         replica_api_keys={"r-0": "secret-key-r0"})
    view.at.FromSeconds(1_700_000_000 + sequence)
    return view


class View(servingview_service_pb2_grpc.ServingViewServiceServicer):
    """Sends snapshot 1, a heartbeat (2: the same content), a change (3: a second replica), then ends;
    refuses interval_ms 1 as the control plane does (naming the field)."""

    def __init__(self) -> None:
        self.requests: list[V.WatchServingViewRequest] = []

    def Watch(self, request, context):
        self.requests.append(request)
        if request.interval_ms == 1:
            context.abort_with_status(to_status(errors.InvalidArgument(
                "interval_ms: 1 is outside 100..60000 (0 means 500)", field="interval_ms")))
        yield a_view(1)
        yield a_view(2)
        yield a_view(3, replicas=2)


@pytest.fixture(scope="module")
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    view = View()
    servingview_service_pb2_grpc.add_ServingViewServiceServicer_to_server(view, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", view
    srv.stop(0)


@pytest.fixture
def mesh(server):
    with MeshClient(server[0], timeout=30) as c:
        yield c


@pytest.fixture(autouse=True)
def no_context(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MESH_ENDPOINT", raising=False)


def run(capsys, *argv):
    rc = main(list(argv))
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_sdk_snapshot_stream_and_keys(server, mesh):
    view = mesh.serving_view()
    assert view.sequence == 1 and [d.spec.name for d in view.deployments] == ["chat", "embed"]
    assert mesh.replica_api_keys() == {"r-0": "secret-key-r0"}          # the same snapshot's keys
    seen = [v.sequence for v in mesh.watch_serving_view(interval_ms=250, heartbeat_ms=1000)]
    assert seen == [1, 2, 3]
    assert (server[1].requests[-1].interval_ms, server[1].requests[-1].heartbeat_ms) == (250, 1000)


def test_sdk_errors_are_typed_and_name_the_field(mesh):
    with pytest.raises(errors.InvalidArgument) as info:
        next(mesh.watch_serving_view(interval_ms=1))
    assert info.value.field == "interval_ms"


def test_meshctl_table_and_wide(server, capsys):
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "servingview")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# serving view 1 at 2023-11-14T22:13:21Z: 2 deployment(s), 1 model(s), 1 GPU(s)")
    assert lines[1].split() == ["DEPLOYMENT", "REPLICA", "MODEL", "STATE", "ENDPOINT", "AGE"]
    assert lines[2].split()[:5] == ["chat", "r-0", "smol/q4", "READY", "http://10.0.0.1:0"]
    assert lines[3].split()[:5] == ["embed", "e-0", "smol", "STARTING", "-"]
    rc, out, _ = run(capsys, "--endpoint", server[0], "get", "sv", "chat", "-o", "wide")
    rows = out.splitlines()
    assert rc == 0 and "GPU HEALTH" in rows[1] and len(rows) == 3     # narrowed to chat
    assert rows[2].split()[-6:] == ["n1", "0", "healthy", "-", "normal", "yes"]


def test_meshctl_names_a_deployment_not_in_the_view(server, capsys):
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "servingview", "chat", "gone")
    assert rc == 1 and "error: no deployment 'gone' in the serving view" in err
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == ["chat"]


def test_meshctl_json_and_yaml_redact_the_keys(server, capsys):
    rc, out, _ = run(capsys, "--endpoint", server[0], "get", "view", "-o", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["sequence"] == 1 and doc["replica_api_keys"] == {"r-0": "<redacted>"}
    assert [d["name"] for d in doc["deployments"]] == ["chat", "embed"] and doc["models"][0]["name"] == "smol"
    assert doc["model_costs"][0]["dollars_per_hour"] == 1.5 and "secret-key" not in out
    rc, out, _ = run(capsys, "--endpoint", server[0], "get", "servingview", "-o", "yaml")
    assert rc == 0 and yaml.safe_load(out)["gpus"][0]["health"] == "healthy" and "secret-key" not in out


def test_meshctl_watch_prints_changes_not_heartbeats(server, capsys):
    rc, out, _ = run(capsys, "--endpoint", server[0], "get", "servingview", "-w", "-o", "json")
    assert rc == 0
    assert [json.loads(line)["sequence"] for line in out.splitlines()] == [1, 3]   # 2 changed nothing


@pytest.mark.parametrize("flags, message", [
    (["--tenant", "team-a"], "--tenant does not filter servingview"),
    (["--node", "n1"], "--node does not filter servingview"),
    (["--model", "smol"], "--model applies to deployments, replicas, not servingview"),
])
def test_meshctl_refuses_filters_it_does_not_take(server, capsys, flags, message):
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "servingview", *flags)
    assert rc != 0 and message in err and out == ""


def test_meshctl_watch_takes_the_compare_interval(server, capsys):
    """WatchServingViewRequest.interval_ms (how often the control plane compares the view) was reachable from
    the SDK only: `get servingview -w --interval SECONDS` sends it."""
    before = len(server[1].requests)
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "servingview", "-w", "--interval", "0.25", "-o", "json")
    assert rc == 0, err
    assert [r.interval_ms for r in server[1].requests[before:]] == [250]


@pytest.mark.parametrize("flags, message", [
    (["--interval", "2"], "--interval applies to servingview with -w"),
    (["-w", "--interval", "0.01"], "--interval: 0.01 is outside 0.1..60 seconds"),
])
def test_meshctl_interval_errors(server, capsys, flags, message):
    before = len(server[1].requests)
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "servingview", *flags)
    assert rc != 0 and message in err and len(server[1].requests) == before, err


def test_interval_is_refused_for_other_kinds(server, capsys):
    rc, out, err = run(capsys, "--endpoint", server[0], "get", "slices", "-w", "--interval", "2")
    assert rc != 0 and "--interval applies to servingview" in err

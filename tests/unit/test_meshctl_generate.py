"""`meshctl generate` and mesh/inferenceapi.py against a real gRPC server on a local socket that implements
InferenceService (a stand-in for mesh-gateway's: chunks, then a last message with the finish reason), and
`meshctl run --backend` over a fake client: what reaches the server, what is printed, and the flag errors."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

from gpumesh.v1 import inference_service_pb2 as I
from gpumesh.v1 import inference_service_pb2_grpc, types_pb2
from mesh import errors
from mesh.inferenceapi import InferenceClient, generate_request
from tools.meshctl import main as meshctl


class Inference(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self):
        self.requests = []
        self.metadata = []

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model 'missing' for tenant team-a")
        for piece in (" Paris", ",", " France"):
            yield I.GenerateResponse(text=piece)
        yield I.GenerateResponse(finish_reason="length", served_by="chat/r-1", prompt_tokens=6, completion_tokens=3)


@pytest.fixture
def gateway():
    svc = Inference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", svc
    server.stop(None)


def test_sdk_streams_chunks_and_sends_the_token(gateway):
    addr, svc = gateway
    with InferenceClient(addr, token="tok-1") as inf:
        chunks = list(inf.generate("chat", prompt="The capital of France is", max_tokens=3, seed=7))
        assert [c.text for c in chunks[:3]] == [" Paris", ",", " France"] and chunks[-1].finish_reason == "length"
        text, last = inf.complete("chat", messages=[("user", "Hi")])
    assert text == " Paris, France" and last.served_by == "chat/r-1"
    assert svc.metadata[0]["authorization"] == "Bearer tok-1"
    r = svc.requests[0]
    assert (r.model, r.prompt, r.max_tokens, r.seed, r.has_seed) == ("chat", "The capital of France is", 3, 7, True)
    assert [(m.role, m.content) for m in svc.requests[1].messages] == [("user", "Hi")]


def test_sdk_errors_are_typed(gateway):
    addr, _ = gateway
    with InferenceClient(addr) as inf:
        with pytest.raises(errors.NotFound):
            list(inf.generate("missing", prompt="x"))


@pytest.mark.parametrize("kw, field", [
    (dict(prompt=""), "prompt"), (dict(prompt="a", messages=[("user", "b")]), "prompt"),
    (dict(prompt="a", temperature=3.0), "temperature"), (dict(prompt="a", priority="urgent"), "priority"),
    (dict(messages=[("robot", "b")]), "messages[0].role"), (dict(prompt="a", max_tokens=-1), "max_tokens"),
])
def test_bad_requests_name_the_field(kw, field):
    with pytest.raises(errors.InvalidArgument) as e:
        generate_request("chat", **kw)
    assert e.value.field == field


def test_meshctl_generate_streams_text(gateway, capsys, monkeypatch):
    addr, svc = gateway
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    rc = meshctl.main(["generate", "chat", "--prompt", "The capital of France is", "--max-tokens", "3",
                       "--gateway", addr, "--token", "tok-2"])
    o = capsys.readouterr()
    assert rc == 0, o.err
    assert o.out == " Paris, France\n"
    assert "served_by=chat/r-1" in o.err and "completion_tokens=3" in o.err
    assert svc.metadata[-1]["authorization"] == "Bearer tok-2"


def test_meshctl_generate_json_messages_and_env_gateway(gateway, capsys, monkeypatch):
    addr, svc = gateway
    monkeypatch.setenv("MESH_GATEWAY", addr)
    rc = meshctl.main(["generate", "chat", "--message", "system=Be brief.", "--message", "user=Hi", "-o", "json",
                       "--priority", "sheddable"])
    o = capsys.readouterr()
    assert rc == 0, o.err
    doc = json.loads(o.out)
    assert doc["text"] == " Paris, France" and doc["finish_reason"] == "length" and doc["prompt_tokens"] == 6
    r = svc.requests[-1]
    assert [m.role for m in r.messages] == ["system", "user"] and r.priority == "sheddable"


def test_meshctl_generate_errors(gateway, capsys, monkeypatch):
    addr, _ = gateway
    monkeypatch.delenv("MESH_GATEWAY", raising=False)
    assert meshctl.main(["generate", "chat", "--prompt", "x"]) == 1
    assert "--gateway" in capsys.readouterr().err
    assert meshctl.main(["generate", "chat", "--prompt", "x", "--gateway", "nohost"]) == 1
    assert "--gateway" in capsys.readouterr().err
    assert meshctl.main(["generate", "missing", "--prompt", "x", "--gateway", addr]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        meshctl.main(["generate", "chat", "--message", "robot=hi", "--gateway", addr])
    assert "--message" in capsys.readouterr().err


def test_meshctl_generate_finds_the_local_clusters_gateway(gateway, capsys, monkeypatch, tmp_path):
    """`meshctl up` saves its cluster as a context with its state dir; cluster.json there names the gateway's gRPC
    address, so `generate` against that cluster needs no --gateway (it answered "no gateway address" before)."""
    from mesh.context import save_context
    from tools.localcluster import LocalCluster, sim_hosts
    addr, svc = gateway
    monkeypatch.delenv("MESH_GATEWAY", raising=False)
    monkeypatch.delenv("MESH_CONTEXT", raising=False)
    monkeypatch.delenv("MESHCONFIG", raising=False)
    monkeypatch.setenv("GPUMESH_CONFIG_DIR", str(tmp_path / "cfg"))
    cluster = LocalCluster(tmp_path / "mesh", sim_hosts(1, 1, "H100-80GB"))
    cluster.gateway_url, cluster.gateway_grpc = "http://127.0.0.1:1", addr
    cluster.save_state()
    assert json.loads((tmp_path / "mesh" / "cluster.json").read_text())["gateway_grpc"] == addr
    save_context("127.0.0.1:2", cluster.state_dir, name="local")
    rc = meshctl.main(["generate", "chat", "--prompt", "The capital of France is"])
    o = capsys.readouterr()
    assert rc == 0, o.err
    assert o.out == " Paris, France\n" and svc.requests[-1].prompt == "The capital of France is"
    # a context that is no local cluster's names no gateway: the error says where one comes from
    save_context("127.0.0.1:2", None, name="remote")
    assert meshctl.main(["--context", "remote", "generate", "chat", "--prompt", "x"]) == 1
    assert "a local cluster's context" in capsys.readouterr().err


def test_meshctl_up_starts_the_gateways_grpc_and_names_it(monkeypatch):
    from tools.meshctl import cluster as up
    seen = {}

    class Stop(Exception):
        pass

    def fake_cluster(*a, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr("tools.localcluster.LocalCluster", fake_cluster)
    assert meshctl.main(["up", "--detach", "--state-dir", "/nonexistent/x"]) != 0     # stopped before starting
    assert seen["gateway"] and seen["gateway_args"] == ["--grpc-listen", "127.0.0.1:0"]
    assert seen["agent_args"] == ["--checkpoint-dir", "/nonexistent/x/checkpoints"]     # `meshctl checkpoint` works
    c = type("C", (), dict(gateway_url="http://127.0.0.1:8080", gateway_grpc="127.0.0.1:8081", endpoint="e",
                           web=None, state_dir="/s", nodes=[], pids=lambda self: {}))()
    assert up.summary(c)["gateway_grpc"] == "127.0.0.1:8081"
    assert up._gateway_text(c) == "http://127.0.0.1:8080 (gRPC 127.0.0.1:8081)"


# -- run --backend -----------------------------------------------------------------------------------

class RunMesh:
    def __init__(self):
        self.runs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def run_workload(self, slice_id, command=None, env=None, labels=None, **kw):
        self.runs.append((slice_id, command, kw))
        w = types_pb2.Workload(id="w-1", slice_id=slice_id, node="gpu-a", state=types_pb2.WORKLOAD_STATE_RUNNING,
                               endpoint="10.0.0.5:41000")
        if kw.get("backend"):
            w.backend.kind = kw["backend"]
            w.backend.artifact = kw["artifact"]
        return w


@pytest.fixture
def runmesh(monkeypatch):
    m = RunMesh()
    monkeypatch.setattr("mesh.client.MeshClient", lambda *a, **k: m)
    return m


def test_run_backend_reaches_the_sdk_and_prints_the_endpoint(runmesh, capsys):
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--backend", "llama.cpp", "--artifact",
                       "/models/m.gguf", "--context", "512", "--served-name", "smollm2"])
    o = capsys.readouterr()
    assert rc == 0, o.err
    sid, cmd, kw = runmesh.runs[-1]
    assert sid == "s-1" and not cmd and kw["backend"] == "llama.cpp" and kw["artifact"] == "/models/m.gguf"
    assert kw["context"] == 512 and kw["served_name"] == "smollm2"
    assert "llama.cpp at 10.0.0.5:41000" in o.out
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--backend", "vllm", "--artifact",
                       "/models/d", "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["endpoint"] == "10.0.0.5:41000" and doc["backend"]["kind"] == "vllm"


def test_run_request_id_reaches_the_sdk(runmesh, capsys):
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--request-id", "job-42", "--",
                       "python", "train.py"])
    assert rc == 0, capsys.readouterr().err
    sid, cmd, kw = runmesh.runs[-1]
    assert cmd == ["python", "train.py"] and kw["request_id"] == "job-42"


@pytest.mark.parametrize("argv, needle", [
    (["--backend", "llama.cpp"], "--artifact is required"),
    (["--backend", "llama.cpp", "--artifact", "/m", "--", "python"], "give no COMMAND"),
    (["--context", "5", "--", "python"], "--context: model-server flags need --backend"),
])
def test_run_backend_flag_errors(runmesh, capsys, argv, needle):
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", *argv])
    assert rc == 1 and needle in capsys.readouterr().err and runmesh.runs == []


def test_sdk_run_workload_backend_builds_the_request():
    from mesh.client import MeshClient

    class Workloads:
        def Run(self, req, timeout=None):
            self.req = req
            return types_pb2.Workload(id="w-2")
    c = MeshClient.__new__(MeshClient)
    c.timeout = 5.0
    c._workloads = Workloads()
    c.run_workload("s-1", backend="vllm", artifact="/m", device="cpu", concurrency=4)
    req = c._workloads.req
    assert req.HasField("backend") and not req.command
    assert (req.backend.kind, req.backend.artifact, req.backend.device, req.backend.concurrency) == ("vllm", "/m",
                                                                                                     "cpu", 4)
    with pytest.raises(errors.InvalidArgument) as e:
        c.run_workload("s-1", ["python"], backend="vllm", artifact="/m")
    assert e.value.field == "command"
    with pytest.raises(errors.InvalidArgument) as e:
        c.run_workload("s-1", backend="tgi", artifact="/m")
    assert e.value.field == "backend"


# -- run --backend: every ServingBackend input the API takes ------------------------------------------

def test_run_backend_passes_memory_share_pinned_digest_and_key_file(runmesh, capsys, tmp_path):
    """RunWorkloadRequest.backend takes gpu_memory_utilization (vLLM on an MPS or time-share slice sees the
    whole GPU: without it vLLM reserves 90% of it), artifact_sha256 (the agent checks the weights) and api_key
    (the server refuses requests without it); the SDK and `meshctl run` offered none of them. The key comes
    from a file (a flag's value is on the command line, which every user of the host can read)."""
    key = tmp_path / "key"
    key.write_text("s3cret-key-0123456789\n")
    digest = "ab" * 32
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--backend", "vllm", "--artifact", "/m",
                       "--gpu-memory-utilization", "0.25", "--artifact-sha256", digest, "--api-key-file", str(key)])
    o = capsys.readouterr()
    assert rc == 0, o.err
    _, _, kw = runmesh.runs[-1]
    assert kw["gpu_memory_utilization"] == 0.25 and kw["artifact_sha256"] == digest
    assert kw["api_key"] == "s3cret-key-0123456789"
    assert "s3cret" not in o.out + o.err


@pytest.mark.parametrize("argv, needle", [
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: 1.5 is not a share"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization: nan is not a share"),
    (["--artifact-sha256", "xyz"], "--artifact-sha256: 'xyz' is not a SHA-256"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file: cannot read /nonexistent/key"),
])
def test_run_backend_input_errors_name_the_flag(runmesh, capsys, argv, needle):
    try:
        rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--backend", "vllm", "--artifact",
                           "/m", *argv])
    except SystemExit as e:         # a flag's value refused by argparse: a usage error (2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0 and needle in err and runmesh.runs == [], err


def test_sdk_run_workload_sends_every_backend_input():
    from mesh.client import MeshClient

    class Workloads:
        def Run(self, req, timeout=None):
            self.req = req
            return types_pb2.Workload(id="w-2")
    c = MeshClient.__new__(MeshClient)
    c.timeout = 5.0
    c._workloads = Workloads()
    c.run_workload("s-1", backend="vllm", artifact="/m", gpu_memory_utilization=0.3, artifact_sha256="cd" * 32,
                   api_key="k" * 20)
    b = c._workloads.req.backend
    assert (b.gpu_memory_utilization, b.artifact_sha256, b.api_key) == (pytest.approx(0.3), "cd" * 32, "k" * 20)


@pytest.mark.parametrize("field, backend", [
    ("backend.gpu_memory_utilization", dict(gpu_memory_utilization=1.5)),
    ("backend.gpu_memory_utilization", dict(gpu_memory_utilization=float("nan"))),
    ("backend.gpu_memory_utilization", dict(gpu_memory_utilization=-0.1)),
    ("backend.artifact_sha256", dict(artifact_sha256="not-hex")),
    ("backend.api_key", dict(api_key="has space")),
    ("backend.api_key", dict(api_key="k" * 300)),
])
def test_run_refuses_bad_backend_inputs_naming_the_field(field, backend):
    """The control plane checks what the agent would otherwise meet only when it starts the server (a FAILED
    workload, or vLLM refusing a share over 1) or never (a key a client cannot send in a header)."""
    from controlplane.controllers.workloadspec import validate_run
    from gpumesh.v1 import workload_service_pb2
    req = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", backend=types_pb2.ServingBackend(
        kind="vllm", artifact="/m", **backend))
    with pytest.raises(errors.InvalidArgument) as e:
        validate_run(req)
    assert e.value.field == field
    validate_run(workload_service_pb2.RunWorkloadRequest(slice_id="s-1", backend=types_pb2.ServingBackend(
        kind="vllm", artifact="/m", gpu_memory_utilization=0.5, artifact_sha256="ef" * 32, api_key="k" * 32)))

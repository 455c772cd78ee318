"""The llama.cpp backend's command line (nodeagent/backends), the Run validation of backend workloads, the
deployment spec checks and sizing (controlplane/serving/deployspec.py), and meshctl's deployment tables."""

from __future__ import annotations

import pytest

from controlplane.serving import deployspec
from controlplane.controllers.workloads import validate_run
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import types_pb2, workload_service_pb2
from mesh import errors, gpumodels
from nodeagent import backends


def test_llamacpp_command_and_endpoint():
    w = types_pb2.Workload(id="w-1", backend=types_pb2.ServingBackend(
        kind="llama.cpp", artifact="/m/x.gguf", served_name="smollm2", context=512))
    backends.prepare(w, "127.0.0.1", "/venv/bin/python")
    argv = list(w.command)
    port = int(w.endpoint.rsplit(":", 1)[1])
    assert argv == ["/venv/bin/python", "-m", "nodeagent.backends.llamacpp_server", "--model", "/m/x.gguf",
                    "--host", "127.0.0.1",
                    "--port", str(port), "--n_ctx", "512", "--n_gpu_layers", "-1",
                    "--interrupt_requests", "false", "--model_alias", "smollm2"]
    assert w.endpoint == f"127.0.0.1:{port}" and 0 < port < 65536
    w.backend.gpu_layers = 12
    backends.prepare(w, "127.0.0.1", "py")
    argv = list(w.command)
    assert argv[argv.index("--n_gpu_layers") + 1] == "12"


def test_unknown_backend_kind():
    w = types_pb2.Workload(backend=types_pb2.ServingBackend(kind="tgi", artifact="/m"))
    with pytest.raises(ValueError, match="not supported"):
        backends.prepare(w, "127.0.0.1", "py")


def test_run_validation_of_backends():
    ok = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", backend=types_pb2.ServingBackend(
        kind="llama.cpp", artifact="/m/x.gguf"))
    validate_run(ok)
    both = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", command=["x"], backend=ok.backend)
    with pytest.raises(errors.InvalidArgument, match="command"):
        validate_run(both)
    bad = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", backend=types_pb2.ServingBackend(kind="tgi"))
    with pytest.raises(errors.InvalidArgument, match="backend"):
        validate_run(bad)


def _variant(**kw) -> M.Variant:
    v = M.Variant(name="q4_1", backend=M.BACKEND_LLAMA_CPP, artifact="/m/x.gguf", weight_bytes=90 << 20,
                  kv_bytes_per_token=23040, max_context=8192)
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def test_spec_checks_name_the_field():
    spec = D.DeploymentSpec(name="chat", model="m", replicas=1)
    with pytest.raises(errors.InvalidArgument, match="spec.name"):
        deployspec.check_name("-bad")
    with pytest.raises(errors.InvalidArgument, match="spec.replicas"):
        deployspec.check_replicas(65)
    spec.backend.context = 9000
    with pytest.raises(errors.InvalidArgument, match="spec.backend.context"):
        deployspec.check_settings(spec, _variant())
    spec.backend.context = 0
    spec.isolation = types_pb2.ISOLATION_EXCLUSIVE if hasattr(types_pb2, "ISOLATION_EXCLUSIVE") else 99
    with pytest.raises(errors.InvalidArgument, match="spec.isolation"):
        deployspec.check_settings(spec, _variant())
    m = M.Model(name="m", variants=[_variant(), _variant(name="b", fallback_rank=1)])
    assert deployspec.pick_variant(m, "").name == "q4_1"
    with pytest.raises(errors.InvalidArgument, match="spec.variant"):
        deployspec.pick_variant(m, "nope")


def test_sizing_and_fit():
    spec = D.DeploymentSpec(name="chat", model="m", tenant="t", backend=D.BackendSettings(context=512))
    need = deployspec.need_bytes(spec, _variant())
    assert need == -(-((90 << 20) + 23040 * 512 + (1 << 30)) // (1 << 20)) * (1 << 20)
    h100 = gpumodels.get_model("H100-80GB")
    deployspec.check_fits(need, [h100])
    spec.backend.concurrency, spec.backend.context = 1024, 8192
    with pytest.raises(errors.FailedPrecondition, match="largest slice"):
        deployspec.check_fits(deployspec.need_bytes(spec, _variant()), [h100])
    req = deployspec.slice_request(spec, need, "r-1", spread=True)
    assert req.memory_bytes == need and req.isolation is None
    assert req.labels == {"gpumesh.deployment": "chat", "gpumesh.replica": "r-1", "gpumesh.spread": "chat"}
    assert req.anti_affinity == {"gpumesh.spread": "chat"}
    anywhere = deployspec.slice_request(spec, need, "r-1", spread=False)
    assert anywhere.anti_affinity == {} and "gpumesh.spread" not in anywhere.labels


def test_meshctl_tables():
    from tools.meshctl.deploy import format_deployment, format_deployments, format_replicas
    from mesh.deployapi import deployment_to_dict
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", model="smollm2", variant="q4_1", replicas=2, tenant="t"),
                     status=D.DeploymentStatus(replicas=2, ready_replicas=1, backend="llama.cpp", vram_bytes=1 << 30,
                                               conditions=[D.DeploymentCondition(type="Available", status=False)]),
                     replicas=[D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY,
                                         endpoint="127.0.0.1:5000", node="gpu-a", slice_id="s-1", profile="1g.10gb",
                                         memory_bytes=10 << 30),
                               D.Replica(id="r-2", deployment="chat", state=D.REPLICA_STATE_STARTING)])
    table = format_deployments([d], "wide")
    assert "chat" in table and "1/2" in table and "127.0.0.1:5000" in table and "Progressing" in table
    rows = format_replicas([d], "table")
    assert "r-1" in rows and "READY" in rows and "STARTING" in rows and "1g.10gb" in rows
    assert "Conditions:" in format_deployment(deployment_to_dict(d))
    import json
    doc = json.loads(format_deployments([d], "json", single=True))
    assert doc["replica_list"][0]["endpoint"] == "127.0.0.1:5000" and doc["status"]["ready_replicas"] == 1


def test_replica_load_in_tables():
    from tools.meshctl.deploy import format_replicas
    import json
    load = types_pb2.BackendLoad(workload_id="w-1", scraped=True, requests_running=1, requests_waiting=3,
                                 kv_cache_usage=0.25, generation_tokens_per_second=42.5, ttft_seconds=0.125,
                                 gpu_memory_pressure=types_pb2.MEMORY_PRESSURE_HIGH,
                                 gpu_thermal_state=types_pb2.THERMAL_STATE_NORMAL)
    d = D.Deployment(spec=D.DeploymentSpec(name="chat"), replicas=[
        D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, workload_id="w-1", load=load),
        D.Replica(id="r-2", deployment="chat", state=D.REPLICA_STATE_READY, workload_id="w-2",
                  load=types_pb2.BackendLoad(workload_id="w-2", scraped=False, error="GET /metrics answered 404")),
        D.Replica(id="r-3", deployment="chat", state=D.REPLICA_STATE_STARTING)])
    wide = format_replicas([d], "wide").splitlines()
    assert "RUNNING" in wide[0] and "KV" in wide[0] and "GEN TOK/S" in wide[0] and "TTFT" in wide[0]
    r1 = next(line for line in wide if line.startswith("r-1")).split()
    assert "3" in r1 and "25%" in r1 and "42.5" in r1 and "0.125s" in r1 and "high/normal" in r1
    assert "?" in next(line for line in wide if line.startswith("r-2")).split()
    assert "RUNNING" not in format_replicas([d], "table")
    doc = json.loads(format_replicas([d], "json"))["items"]
    assert doc[0]["load"]["requests_waiting"] == 3 and doc[0]["load"]["gpu_memory_pressure"] == "high"
    assert doc[1]["load"]["error"] == "GET /metrics answered 404" and doc[2]["load"] is None
    from mesh.deployapi import deployment_to_dict
    from tools.meshctl.deploy import format_deployment
    text = format_deployment(deployment_to_dict(d))
    assert "1 running, 3 waiting, KV 25%, 42.5 tok/s" in text and "unreadable" in text

"""`meshctl generate` through a real mesh-gateway's gRPC InferenceService to a real llama.cpp replica serving
the real SmolLM2-135M GGUF, and `meshctl run --backend llama.cpp` starting a model server on a slice (the
agent builds the command and reports the endpoint). One simulated H100 host (no MIG: an MPS share)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from tests.integration.conftest import wait_for
from tests.integration.serving import h100_hosts, llama_env, started_cluster
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SLOW = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with started_cluster(tmp_path_factory, "generate", h100_hosts(1, mig=False), env=llama_env(), gateway=True,
                         gateway_args=["--grpc-listen", "127.0.0.1:0"]) as c:
        yield c


def meshctl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


def gateway_sees_ready(cluster, name: str) -> bool:
    """Whether the gateway's view (`/v1/gpu/status`) has a READY replica of deployment `name`."""
    import httpx
    models = httpx.get(f"{cluster.gateway_url}/v1/gpu/status", timeout=30).json()["models"]
    return any(r["ready"] for m in models if m["name"] == name for r in m["replicas"])


def test_generate_streams_from_a_replica(cluster, mesh, smollm2):
    assert cluster.gateway_grpc
    mesh.deploy("smollm2", name="chat", replicas=1, context=512)
    try:
        wait_for(lambda: mesh.get_deployment("chat").status.ready_replicas == 1, SLOW, "the replica to be READY")
        # the gateway learns the replica by watching the control plane: wait until it routes to it too
        wait_for(lambda: gateway_sees_ready(cluster, "chat"), 60, "the gateway to see the replica READY")
        p = meshctl(cluster, "generate", "chat", "--prompt", "1, 2, 3,", "--max-tokens", "4",
                    "--gateway", cluster.gateway_grpc)
        assert p.stdout.strip(), p.stderr                    # the generated text, streamed to stdout
        assert "served_by=chat/" in p.stderr and "finish_reason=" in p.stderr
        doc = json.loads(meshctl(cluster, "generate", "chat", "--prompt", "1, 2, 3,", "--max-tokens", "4",
                                 "--gateway", cluster.gateway_grpc, "-o", "json").stdout)
        assert doc["text"] == p.stdout[:-1]                  # greedy: the same text both times
        assert doc["finish_reason"] in ("stop", "length") and doc["completion_tokens"] >= 1
        bad = meshctl(cluster, "generate", "nope", "--prompt", "x", "--gateway", cluster.gateway_grpc, check=False)
        assert bad.returncode == 1 and "nope" in bad.stderr
    finally:
        mesh.undeploy("chat")
        wait_for(lambda: not any(d.spec.name == "chat" for d in mesh.list_deployments()), SLOW, "chat to go")


def test_run_backend_starts_a_model_server(cluster, mesh):
    wait_for(lambda: not mesh.list_slices(), SLOW, "the earlier replica's slice to be released")
    alloc = mesh.allocate(tenant="team-a", memory_bytes=2 << 30)
    sid = alloc.slices[0].id
    try:
        doc = json.loads(meshctl(cluster, "run", "--slice", sid, "--backend", "llama.cpp", "--artifact",
                                 str(smollm2_gguf()), "--context", "256", "--served-name", "tiny", "-o", "json").stdout)
        assert doc["backend"]["kind"] == "llama.cpp" and doc["backend"]["served_name"] == "tiny"
        wid = doc["id"]
        w = wait_for(lambda: (lambda x: x if x.endpoint else None)(mesh.get_workload(wid)), SLOW,
                     "the workload to report its endpoint")
        assert ":" in w.endpoint
        meshctl(cluster, "stop", wid)
    finally:
        mesh.release(alloc.allocation_id)


def test_run_backend_with_a_key_and_a_pinned_digest(cluster, mesh, tmp_path):
    """`meshctl run --backend --api-key-file --artifact-sha256`: the key reaches the real server (a request
    without it is refused, one with it answered), no answer of meshctl or the API carries it, and the agent
    checks the weights against the digest (a wrong one fails the workload). Before, neither could be given:
    a server run by hand answered anything that reached its port."""
    import hashlib

    import httpx

    from mesh import replicatls
    wait_for(lambda: not mesh.list_slices(), SLOW, "the earlier slices to be released")
    alloc = mesh.allocate(tenant="team-a", memory_bytes=2 << 30)
    sid = alloc.slices[0].id
    gguf = smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    key = "run-key-" + "0123456789abcdef" * 2
    (tmp_path / "key").write_text(key + "\n")
    try:
        p = meshctl(cluster, "run", "--slice", sid, "--backend", "llama.cpp", "--artifact", str(gguf), "--context",
                    "256", "--api-key-file", str(tmp_path / "key"), "--artifact-sha256", digest, "-o", "json")
        assert key not in p.stdout + p.stderr
        wid = json.loads(p.stdout)["id"]
        w = wait_for(lambda: (lambda x: x if x.endpoint and x.state == 2 else None)(mesh.get_workload(wid)), SLOW,
                     "the workload to run and report its endpoint")
        assert not w.backend.api_key and w.backend.artifact_sha256 == digest
        url = replicatls.base_url(w.endpoint, w.endpoint_certificate) + "/v1/models"
        verify = replicatls.verify(w.endpoint_certificate)

        def answered(headers):
            try:
                return httpx.get(url, headers=headers, verify=verify, timeout=10).status_code
            except httpx.HTTPError:
                return None             # still loading
        assert wait_for(lambda: answered({"Authorization": f"Bearer {key}"}) == 200, SLOW, "the server to answer")
        assert answered({}) == 401 and answered({"Authorization": "Bearer wrong-key"}) == 401
        assert key not in meshctl(cluster, "get", "workloads", "-o", "json").stdout
        meshctl(cluster, "stop", wid)
        bad = meshctl(cluster, "run", "--slice", sid, "--backend", "llama.cpp", "--artifact", str(gguf),
                      "--artifact-sha256", "0" * 64, "-o", "json", check=False)
        assert bad.returncode == 0, bad.stderr
        bid = json.loads(bad.stdout)["id"]
        failed = wait_for(lambda: (lambda x: x if x.state in (4, 5) else None)(mesh.get_workload(bid)), SLOW,
                          "the workload with a wrong digest to fail")
        assert failed.state == 4, failed                      # FAILED: the launcher refused the weights
    finally:
        mesh.release(alloc.allocation_id)

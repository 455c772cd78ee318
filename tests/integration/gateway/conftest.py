"""mesh-gateway on a real local cluster, shared by every test file of this folder: TLS control plane with a
tenants file, three simulated H100 hosts, real llama.cpp servers (llama-cpp-python) with the real SmolLM2-135M
GGUF, and the gateway process in front.

Team A deploys `chat` (2 replicas of the primary variant, on two hosts) and `chat-lite` (1 replica of the
model's fallback variant, on the third host: its node is cordoned while `chat` is placed); team B deploys
`other`. The cluster and the deployments are this package's fixtures (`cluster`, `fleet`); what the tests share
besides is in `_helpers`. The tests: `test_api` (the OpenAI HTTP API and gRPC), `test_input` (tenants,
authentication, bad input), `test_gpu` (the GPU endpoints, routing around hot or full GPUs, the queue and the
fallback variant), `test_requests` (client disconnects, the cache), `test_restarts` (a killed backend, a
stopped gateway).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from gpumesh.v1 import model_service_pb2 as M
from tests.integration.conftest import wait_for
from tests.integration.gateway._helpers import HOSTS, SLOW, all_ready, client
from tests.integration.gatewayhttp import ready_in_gateway
from tests.integration.secure import TOKENS, write_tenants
from tests.models_util import smollm2_gguf
from tools.localcluster import LocalCluster


def _need():
    for mod in ("llama_cpp", "uvicorn", "httpx", "openai", "starlette"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'gpumesh[serving,dev]')")


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    _need()
    smollm2_gguf()
    d = tmp_path_factory.mktemp("gateway")
    # INTERRUPT_REQUESTS=false: by default llama-cpp-python's server ends a stream early (with [DONE], as if it
    # had finished) whenever another request waits for the model, e.g. the control plane's readiness probe
    # arriving mid-stream on a loaded machine (a stream of ' 4' where the whole answer was ' 4, 5, 6'); the
    # gateway bounds each replica's concurrency itself, as the bench does (tools/meshctl/bench_serve_cluster.py)
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1", INTERRUPT_REQUESTS="false")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, env=env, tls_dir=tls_dir,
                     tenants_file=str(write_tenants(d / "tenants.yaml")),
                     client_auth={"token": TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     agent_args=["--telemetry-interval-seconds", "0.5"],
                     controlplane_args=["--deployment-backoff-seconds", "0.5", "--deployment-backoff-max-seconds", "2"],
                     gateway=True, gateway_args=["--queue-size", "2", "--breaker-open-seconds", "2", "--grpc-listen", "127.0.0.1:0",
                                                 # the queued requests' own deadlines bound their wait, not the
                                                 # 30 s default (a loaded machine takes longer to cool the GPUs)
                                                 "--queue-timeout-seconds", "300",
                                                 "--log-format", "json"])
    c.start(timeout=120)
    yield c
    c.stop()


@pytest.fixture(scope="package")
def fleet(cluster):
    """Deployments: team-a `chat` (2) and `chat-lite` (fallback variant, 1, on its own node), team-b `other`."""
    from mesh.models import importer
    v, _ = importer.variant_from_artifact(str(smollm2_gguf()), context=512)
    lite = M.Variant()
    lite.CopyFrom(v)
    lite.name, lite.fallback_rank = "lite", 1
    with client(cluster, "admin") as admin, client(cluster, "team-a") as a, client(cluster, "team-b") as b:
        admin.register_model(M.Model(name="smollm2", family="smollm2", variants=[v, lite]))
        a.deploy("smollm2", name="chat-lite", variant="lite", replicas=1, context=512)
        lite_node = a.wait_deployment("chat-lite", all_ready(1), timeout=SLOW).replicas[0].node
        admin.cordon(lite_node)
        try:
            a.deploy("smollm2", name="chat", variant=v.name, replicas=2, context=512)
            chat = a.wait_deployment("chat", all_ready(2), timeout=SLOW)
        finally:
            admin.uncordon(lite_node)
        b.deploy("smollm2", name="other", variant=v.name, replicas=1, context=512)
        b.wait_deployment("other", all_ready(1), timeout=SLOW)
        assert lite_node not in {r.node for r in chat.replicas}
        nodes = {r.id: r.node for r in chat.replicas}
    # the gateway learns the replicas by watching: wait for every deployment the tests use (team-b's too)
    wait_for(lambda: ready_in_gateway(cluster, "chat", 2) and ready_in_gateway(cluster, "chat-lite", 1)
             and ready_in_gateway(cluster, "other", 1), 60, "the gateway sees every replica ready")
    return {"chat": nodes, "lite_node": lite_node}

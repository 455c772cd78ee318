"""`backend_tls: false` on a real local cluster: the agent starts the llama.cpp server in plain HTTP (for operators
who terminate TLS elsewhere), reports no certificate, and the control plane's probes, the gateway and the load
scraper reach it over plain HTTP as before. (TLS on, the default, is what every other serving test runs with;
tests/integration/test_replica_keys.py checks that a server then refuses plain HTTP and another certificate.)"""

from __future__ import annotations

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from tests.integration.conftest import wait_for
from tests.integration.serving import completion, h100_hosts, llama_env, need_llama, started_cluster
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SLOW = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama()
    with started_cluster(tmp_path_factory, "tlsoff", h100_hosts(1), env=llama_env(), gateway=True,
                         agent_args=["--no-backend-tls", "--telemetry-interval-seconds", "0.5"]) as c:
        yield c


def test_with_backend_tls_off_replicas_serve_plain_http(cluster, mesh, smollm2):
    import httpx
    mesh.deploy("smollm2", name="plain", replicas=1, context=512)
    d = mesh.wait_deployment("plain", lambda x: x.status.ready_replicas == 1, timeout=SLOW)   # probed over http
    r = d.replicas[0]
    assert r.state == D.REPLICA_STATE_READY and r.endpoint and r.endpoint_certificate == ""
    assert completion(mesh, r)                                    # straight to it, http://
    body = {"model": "plain", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    wait_for(lambda: httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=120).status_code == 200,
             SLOW, "the gateway answers for `plain`", interval=0.5)
    status = httpx.get(f"{cluster.gateway_url}/v1/gpu/status", timeout=30).json()
    assert [x["scheme"] for m in status["models"] for x in m["replicas"]] == ["http"]
    d = wait_for(lambda: (lambda d: d if d.replicas[0].load.scraped else None)(mesh.get_deployment("plain")), 60,
                 "the replica's load read by its agent over http")
    assert d.replicas[0].load.error == ""
    mesh.undeploy("plain")

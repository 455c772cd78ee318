"""A replica's model server requires its replica's own API key (controlplane/serving/replicakeys.py), on a real
local cluster: TLS control plane with a tenants file, one simulated H100 host, a real llama.cpp server
(llama-cpp-python) with the real SmolLM2-135M GGUF, and mesh-gateway in front (watching as the admin).

Team A deploys `keyed` (one replica). A request straight to the replica's endpoint without the key, or with a
wrong one, is refused 401; with the key (which only an admin's serving view holds) it is answered, and so is the
same request through the gateway with team A's token. The server speaks TLS only, with the certificate its
agent made for it (the replica's `endpoint_certificate`): plain HTTP and another certificate are refused, and
a restarted server comes with a new one. The key is on neither the server's command line nor in any
answer team A or its viewer gets (workloads, deployments, serving view, events, logs), nor in the admin's
workload reads. A crashed backend comes back with the same key; after an agent restart and then a control-plane
restart the replica still answers through the gateway, and still refuses requests without its key.
"""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import servingview_service_pb2_grpc
from tests.integration.conftest import wait_for
from tests.integration.secure import TOKENS, write_tenants
from tests.models_util import smollm2_gguf
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
HOSTS = [{"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
READY = D.REPLICA_STATE_READY
SLOW = 300          # llama.cpp loads in about a second here, much longer when the machine is busy
BODY = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for mod in ("llama_cpp", "uvicorn", "httpx"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'gpumesh[serving]')")
    smollm2_gguf()
    d = tmp_path_factory.mktemp("replicakeys")
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, env=env, tls_dir=tls_dir,
                     tenants_file=str(write_tenants(d / "tenants.yaml")),
                     client_auth={"token": TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     agent_args=["--telemetry-interval-seconds", "0.5"],
                     controlplane_args=["--deployment-backoff-seconds", "0.5", "--deployment-backoff-max-seconds",
                                        "2"],
                     gateway=True)
    c.start(timeout=120)
    yield c
    c.stop()


def client(cluster, who):
    from mesh.client import MeshClient
    return MeshClient(cluster.endpoint, token=TOKENS[who], ca=str(cluster.tls_dir / "ca.crt"), timeout=60)


def all_ready(d) -> bool:
    return len(d.replicas) == 1 and d.status.ready_replicas == 1 and d.replicas[0].state == READY


@pytest.fixture(scope="module")
def replica(cluster):
    """Team A's `keyed` deployment, READY: (its replica, the replica's key as the admin's serving view has it)."""
    from mesh.models import importer
    v, _ = importer.variant_from_artifact(str(smollm2_gguf()), context=512)
    with client(cluster, "admin") as admin, client(cluster, "team-a") as a:
        admin.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))
        a.deploy("smollm2", name="keyed", replicas=1, context=512)
        r = a.wait_deployment("keyed", all_ready, timeout=SLOW).replicas[0]
        key = admin.replica_api_keys().get(r.id, "")
    assert len(key) >= 43, "the admin's serving view has no key for the replica"
    wait_for(lambda: gateway_answers(cluster), SLOW, "the gateway answers for `keyed`", interval=0.5)
    return r, key


def direct(r: D.Replica, key: str | None, path: str = "/v1/completions"):
    """A request straight to the replica's server: over TLS verified against exactly its certificate."""
    import httpx

    from mesh import replicatls
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    url = replicatls.base_url(r.endpoint, r.endpoint_certificate) + path
    verify = replicatls.verify(r.endpoint_certificate)
    if path == "/v1/completions":
        return httpx.post(url, json=BODY, headers=headers, timeout=300, verify=verify)
    return httpx.get(url, headers=headers, timeout=300, verify=verify)


def gateway_answers(cluster, who: str = "team-a") -> bool:
    import httpx
    try:
        r = httpx.post(f"{cluster.gateway_url}/v1/completions", json=dict(BODY, model="keyed"), timeout=300,
                       headers={"authorization": f"Bearer {TOKENS[who]}"})
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and bool(r.json()["choices"][0]["text"])


def refuses_without_the_key(r: D.Replica, key: str) -> None:
    for path in ("/v1/completions", "/v1/models"):
        assert direct(r, None, path).status_code == 401, path
        assert direct(r, "not-the-key-0123456789", path).status_code == 401, path
        assert direct(r, key, path).status_code == 200, path


def refuses_plain_http_and_other_certificates(r: D.Replica, key: str) -> None:
    """The server speaks TLS only (backend_tls is on by default), with the certificate its replica records."""
    import httpx

    from mesh import tls
    assert r.endpoint_certificate.startswith("-----BEGIN CERTIFICATE-----")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{r.endpoint}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
    other = tls.self_signed((r.endpoint.rpartition(":")[0].strip("[]"),), "impostor")[0].decode()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        direct(D.Replica(endpoint=r.endpoint, endpoint_certificate=other), key, "/v1/models")


def test_direct_requests_need_the_replicas_key_and_the_gateway_has_it(cluster, replica):
    r, key = replica
    refuses_without_the_key(r, key)
    refuses_plain_http_and_other_certificates(r, key)
    assert direct(r, key).json()["choices"][0]["text"]
    assert gateway_answers(cluster)       # ... so the gateway reached the replica over TLS, pinned to its cert
    import httpx
    status = httpx.get(f"{cluster.gateway_url}/v1/gpu/status", timeout=30,
                       headers={"authorization": f"Bearer {TOKENS['admin']}"}).json()
    assert [x["scheme"] for m in status["models"] for x in m["replicas"]] == ["https"]
    # /metrics stays open, so the agent's load scraper still reads it without the key (over TLS as well)
    assert direct(r, None, "/metrics").status_code == 200
    with client(cluster, "team-a") as a:
        d = wait_for(lambda: (lambda d: d if d.replicas[0].load.scraped else None)(a.get_deployment("keyed")), 60,
                     "the replica's load read by its agent")
        assert d.replicas[0].load.error == ""


def _processes_serving(endpoint: str) -> list[int]:
    port = endpoint.rsplit(":", 1)[1]
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and argv[argv.index(b"--port") + 1:argv.index(b"--port") + 2] == [port.encode()]:
            out.append(int(pid))
    return out


def test_the_key_is_in_the_servers_environment_only(cluster, replica):
    r, key = replica
    pids = _processes_serving(r.endpoint)
    assert pids, f"no process serves {r.endpoint}"
    for pid in pids:
        assert key.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()    # world-readable: never there
    # the server's TLS key: a file of the workload's own directory, readable by the server's uid only
    key_files = {e.split(b"=", 1)[1].decode() for pid in pids
                 for e in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if e.startswith(b"SSL_KEYFILE=")}
    assert key_files, "the server was started without its TLS key"
    # on the host: in the workload's own directory (the server's /tmp when it has a mount namespace)
    (on_host,) = cluster.state_dir.glob(f"agents/**/{r.workload_id}.d/server-tls.key")
    st = os.stat(on_host)
    # owned by the server's uid: the tenant's when confined (its supervisor, the shim, runs as root)
    server_uid = max(os.stat(f"/proc/{pid}").st_uid for pid in pids)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == server_uid, (oct(st.st_mode), st.st_uid, server_uid)
    assert os.stat(on_host.parent).st_mode & 0o077 == 0
    assert on_host.with_suffix(".crt").read_text() == r.endpoint_certificate
    environs = [open(f"/proc/{pid}/environ", "rb").read().split(b"\0") for pid in pids]
    assert any(f"API_KEY={key}".encode() in env for env in environs)            # where llama.cpp's server reads it


def test_no_answer_to_a_tenant_or_viewer_holds_the_key(cluster, replica):
    r, key = replica
    secret = key.encode()
    for who in ("team-a", "viewer-a"):
        with client(cluster, who) as c:
            answers = [c.get_workload(r.workload_id), c.get_deployment("keyed"), *c.list_deployments(),
                       *c.list_workloads()]
            assert c.replica_api_keys() == {}                     # the serving view carries no key for them
            stub = servingview_service_pb2_grpc.ServingViewServiceStub(c._channel)
            call = stub.Watch(V.WatchServingViewRequest(), timeout=30)
            answers.append(next(iter(call)))
            call.cancel()
            answers.extend(c.list_events())
            log = b"".join(c.workload_logs(r.workload_id))
        for a in answers:
            assert secret not in a.SerializeToString(), f"{who}: {type(a).__name__}"
        assert secret not in log
        w = answers[0]
        assert w.backend.kind == "llama.cpp" and not w.backend.api_key and "API_KEY" not in w.env
    with client(cluster, "admin") as admin:                       # the admin's workload reads are redacted too
        assert secret not in admin.get_workload(r.workload_id).SerializeToString()
        assert all(secret not in w.SerializeToString() for w in admin.list_workloads())


def test_the_key_survives_backend_agent_and_control_plane_restarts(cluster, replica):
    r, key = replica
    # the backend crashes: the replica restarts it with the same key
    for pid in _processes_serving(r.endpoint):
        os.kill(pid, signal.SIGKILL)
    with client(cluster, "team-a") as a:
        d = wait_for(lambda: (lambda d: d if all_ready(d) and d.replicas[0].restarts >= 1 else None)(
            a.get_deployment("keyed")), SLOW, "the crashed backend restarted and READY")
    old_certificate, r = r.endpoint_certificate, d.replicas[0]
    assert r.endpoint_certificate and r.endpoint_certificate != old_certificate    # renewed with the server
    with client(cluster, "admin") as admin:
        assert admin.replica_api_keys().get(r.id) == key
    refuses_without_the_key(r, key)
    refuses_plain_http_and_other_certificates(r, key)
    wait_for(lambda: gateway_answers(cluster), SLOW, "the gateway answers after the backend restart", interval=0.5)

    # the agent dies and comes back: the backend keeps running with its key
    cluster.kill_agent(r.node)
    cluster.start_agent(r.node)
    cluster.wait_ready(90)
    refuses_without_the_key(r, key)
    wait_for(lambda: gateway_answers(cluster), SLOW, "the gateway answers after the agent restart", interval=0.5)

    # the control plane restarts: the new leader loads the key from etcd, probes the replica with it (it stays
    # READY) and gives it to the gateway again
    cluster.restart_controlplane(timeout=90)
    with client(cluster, "admin") as admin:
        assert admin.replica_api_keys().get(r.id) == key
    with client(cluster, "team-a") as a:
        d = a.wait_deployment("keyed", all_ready, timeout=SLOW)
        assert (d.replicas[0].id, d.replicas[0].workload_id) == (r.id, r.workload_id)
    wait_for(lambda: gateway_answers(cluster), SLOW, "the gateway answers after the control-plane restart",
             interval=0.5)
    refuses_without_the_key(r, key)
    with client(cluster, "team-a") as a:
        a.undeploy("keyed")
        wait_for(lambda: not a.list_deployments(), 120, "the deployment removed")
    with client(cluster, "admin") as admin:
        assert r.id not in admin.replica_api_keys()

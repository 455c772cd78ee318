"""mesh-gateway and the GPUs on the cluster of conftest.py: the GPU endpoints (status, memory forecast, optimal
models, benchmark, policies, predict); requests avoid a replica whose GPU is made throttling or critical, or full
(simulated NVML, `simctl`), and come back when it recovers; with every primary GPU hot the queue answers 429
with Retry-After (full, or past the deadline), queued requests are served once the GPUs cool, and the fallback
variant serves only when allowed, tagged."""

from __future__ import annotations

import threading

import pytest

from tests.integration.conftest import wait_for
from tests.integration.gateway._helpers import chat_body, gpu_state, in_flight, served_by, simctl
from tests.integration.gatewayhttp import auth, post
from tests.integration.gatewayhttp import status as gateway_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_gpu_endpoints(cluster, fleet):
    import httpx
    h = auth("team-a")
    st = gateway_status(cluster, "team-a")
    assert {g["node"] for g in st["gpus"]} == {fleet["lite_node"], *fleet["chat"].values()}
    g = st["gpus"][0]
    assert g["memory_total_bytes"] > 0 and g["pressure"] in ("low", "normal") and g["thermal_state"] == "normal"
    assert {m["name"] for m in st["models"]} == {"chat", "chat-lite"}
    assert {g["node"] for g in gateway_status(cluster, "team-b")["gpus"]} < {"gpu-a", "gpu-b", "gpu-c"}
    fc = httpx.get(f"{cluster.gateway_url}/v1/gpu/memory-forecast?hours=2", headers=h, timeout=30).json()
    assert fc["source"] == "current-use" and "forecasting service" in fc["note"] and fc["gpus"]   # too little history for 2 h
    opt = httpx.get(f"{cluster.gateway_url}/v1/gpu/models-optimal?agent_type=Chat", headers=h, timeout=30).json()
    assert {m["model"] for m in opt["models"]} == {"chat", "chat-lite"} and opt["models"][0]["usable_replicas"] >= 1
    b = httpx.post(f"{cluster.gateway_url}/v1/gpu/benchmark-model?model_name=chat&max_tokens=4", headers=h,
                   timeout=600).json()
    assert len(b["replicas"]) == 2 and all(r["ttft_ms"] > 0 and r["tokens"] >= 1 for r in b["replicas"]), b
    assert in_flight(cluster) == 0
    assert "scaling_policies" in httpx.get(f"{cluster.gateway_url}/policies", headers=h, timeout=30).json()
    r = httpx.post(f"{cluster.gateway_url}/predict", headers=h, timeout=300,
                   json={"model": "chat", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_requests_avoid_a_hot_or_full_gpu_and_come_back(cluster, fleet):
    (id_a, node_a), (id_b, node_b) = sorted(fleet["chat"].items())
    rep_a, rep_b = f"chat/{id_a}", f"chat/{id_b}"
    simctl(cluster, node_a, "heat", "--gpu", "0", "--celsius", "88")
    try:
        wait_for(lambda: gpu_state(cluster, node_a)["thermal_state"] == "critical", 60, "the hot GPU seen")
        assert set(served_by(cluster, 6)) == {rep_b}
    finally:
        simctl(cluster, node_a, "clear", "--gpu", "0")
    wait_for(lambda: gpu_state(cluster, node_a)["thermal_state"] == "normal", 60, "the GPU cooled")
    wait_for(lambda: rep_a in served_by(cluster, 4), 120, "requests reach the cooled replica again", interval=0.5)

    simctl(cluster, node_b, "load", "--gpu", "0", "--memory-used", "78GiB")
    try:
        wait_for(lambda: gpu_state(cluster, node_b)["pressure"] == "critical", 60, "the full GPU seen")
        assert set(served_by(cluster, 6)) == {rep_a}
        st = gateway_status(cluster)
        rb = next(r for m in st["models"] if m["name"] == "chat" for r in m["replicas"] if r["replica"] == rep_b)
        assert rb["ready"]
        import httpx
        acts = httpx.post(f"{cluster.gateway_url}/v1/gpu/rebalance", headers=auth("team-a"), timeout=30).json()
        assert any(a["replica"] == rep_b and a["action"] == "route-around" and a["applied"] for a in acts["actions"])
    finally:
        simctl(cluster, node_b, "clear", "--gpu", "0")
    wait_for(lambda: gpu_state(cluster, node_b)["pressure"] in ("low", "normal"), 60, "the GPU's memory freed")
    wait_for(lambda: rep_b in served_by(cluster, 4), 120, "requests reach the freed replica again", interval=0.5)


def test_queue_429_queued_and_fallback_only_when_allowed(cluster, fleet):
    nodes = sorted(set(fleet["chat"].values()))
    for n in nodes:
        simctl(cluster, n, "heat", "--gpu", "0", "--celsius", "88")
    results = {}
    try:
        wait_for(lambda: all(gpu_state(cluster, n)["thermal_state"] == "critical" for n in nodes), 60,
                 "both GPUs of `chat` seen hot")
        # past its deadline: 429 with Retry-After
        r = post(cluster, chat_body(), headers={"x-gpumesh-deadline-ms": "300"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "deadline" and "unavailable" in r.json()["error"]["message"]
        # two wait (the queue holds 2); the third finds it full
        def waiting(key):
            results[key] = post(cluster, chat_body(f"Queued {key}."), headers={"x-gpumesh-deadline-ms": "120000"})
        ts = [threading.Thread(target=waiting, args=(k,)) for k in (1, 2)]
        for t in ts:
            t.start()
        wait_for(lambda: next(m["queue"] for m in gateway_status(cluster)["models"] if m["name"] == "chat") == 2, 60,
                 "two requests queued")
        r = post(cluster, chat_body())
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        # allowed to fall back: served by the smaller variant, tagged
        r = post(cluster, chat_body(), headers={"x-gpumesh-allow-fallback": "true"})
        assert r.status_code == 200, r.text
        assert r.headers["x-gpumesh-served-by"].startswith("chat-lite/") and r.headers["x-gpumesh-degraded"] == "fallback"
    finally:
        for n in nodes:
            simctl(cluster, n, "clear", "--gpu", "0")
    for t in ts:
        t.join()
    wait_for(lambda: all(gpu_state(cluster, n)["thermal_state"] == "normal" for n in nodes), 60,
             "both GPUs of `chat` seen cool again")
    for k in (1, 2):       # the queued ones were served once the GPUs cooled, and say they waited
        assert results[k].status_code == 200, results[k].text
        assert results[k].headers["x-gpumesh-degraded"] == "queued"
        assert results[k].headers["x-gpumesh-served-by"].startswith("chat/")

"""mesh-gateway's requests on the cluster of conftest.py: a client that disconnects (a dropped stream, a
timeout) releases its replica slot, and a deterministic request is answered from the cache without a backend,
per tenant."""

from __future__ import annotations

import pytest

from tests.integration.conftest import wait_for
from tests.integration.gateway._helpers import NO_EOS, chat_body, in_flight
from tests.integration.gatewayhttp import auth, post
from tests.integration.gatewayhttp import status as gateway_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_client_disconnects_release_their_slots(cluster, fleet):
    import httpx
    # a stream dropped after its first chunk
    with httpx.stream("POST", f"{cluster.gateway_url}/v1/completions", headers=auth("team-a"), timeout=300,
                      json={"model": "chat", "prompt": "1, 2, 3, 4,", "max_tokens": 200, "temperature": 0,
                            "logit_bias": NO_EOS, "stream": True}) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw())
    # whole answers given up on (client timeout) while the backends work
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{cluster.gateway_url}/v1/completions", headers=auth("team-a"), timeout=0.3,
                       json={"model": "chat", "prompt": "1, 2, 3, 4,", "max_tokens": 200, "temperature": 0,
                             "logit_bias": NO_EOS})
    wait_for(lambda: in_flight(cluster) == 0, 120, "every slot released")
    assert next(m["queue"] for m in gateway_status(cluster)["models"] if m["name"] == "chat") == 0
    r = post(cluster, chat_body("Still there?"))
    assert r.status_code == 200


def test_cache_hit_is_served_without_a_backend(cluster, fleet):
    import httpx
    body = chat_body("Tell me a fact about cats.", max_tokens=6, temperature=0)
    first = post(cluster, body)
    assert first.status_code == 200 and first.headers["x-gpumesh-served-by"].startswith("chat/")
    before = {r["replica"]: r["requests"] for m in gateway_status(cluster)["models"] for r in m["replicas"]}
    second = post(cluster, body)
    assert second.status_code == 200 and second.headers["x-gpumesh-served-by"] == "cache"
    assert second.json() == first.json()
    after = {r["replica"]: r["requests"] for m in gateway_status(cluster)["models"] for r in m["replicas"]}
    assert after == before                          # no replica got a request
    assert post(cluster, body, who="team-b").status_code == 404      # scoped per tenant
    metrics = httpx.get(f"{cluster.gateway_url}/metrics", timeout=30).text
    assert 'gpumesh_gateway_cache_hits_total{kind="exact",model="chat"}' in metrics
    # not deterministic: never cached
    body = chat_body("Tell me a fact about dogs.", max_tokens=4, temperature=0.9)
    assert post(cluster, body).headers["x-gpumesh-served-by"] != "cache"
    assert post(cluster, body).headers["x-gpumesh-served-by"] != "cache"

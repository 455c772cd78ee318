"""mesh-gateway's refusals on the cluster of conftest.py: tenants cannot reach each other's models, requests
without a valid token or role are refused, bad input gets an OpenAI-shaped 4xx naming the field, an oversized
body 413 and an unknown path 404."""

from __future__ import annotations

import json

import pytest

from tests.integration.gateway._helpers import chat_body
from tests.integration.gatewayhttp import post
from tests.integration.secure import TOKENS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_tenants_cannot_reach_each_others_models(cluster, fleet):
    import openai
    b = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key=TOKENS["team-b"], max_retries=0, timeout=300)
    with pytest.raises(openai.NotFoundError) as e:
        b.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["param"] == "model"
    assert b.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert {m.id for m in b.models.list()} == {"other", "smollm2"}
    # team-b's "smollm2" is its own deployment of the model, never team-a's replicas
    r = post(cluster, {**chat_body(), "model": "smollm2"}, who="team-b")
    assert r.status_code == 200 and r.headers["x-gpumesh-served-by"].startswith("other/")
    for who, headers, status in ((None, {}, 401), (None, {"authorization": "Bearer not-a-token-0123456789"}, 401),
                                 ("viewer-a", {}, 403)):
        r = post(cluster, chat_body(), who=who, headers=headers)
        assert r.status_code == status and r.json()["error"]["param"] == "authorization", r.text


@pytest.mark.parametrize("body,raw,param,status", [
    (None, b"{not json", None, 400),
    (None, b"[1, 2]", None, 400),
    ({"messages": [{"role": "user", "content": "x"}]}, None, "model", 400),
    ({"model": 7, "messages": []}, None, "model", 400),
    ({"model": "chat", "messages": "hello"}, None, "messages", 400),
    ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, None, "messages[0].role", 400),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, "max_tokens", 400),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, None, "max_tokens", 400),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, None, "max_tokens",
     400),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, None, "temperature",
     400),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, None, "stream", 400),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, None, "model", 404),
])
def test_bad_input_is_a_clean_openai_error(cluster, fleet, body, raw, param, status):
    r = post(cluster, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    if param:
        assert param.split("[")[0] in err["message"]


def test_oversized_body_and_unknown_paths(cluster, fleet):
    r = post(cluster, None, raw=json.dumps(chat_body("x" * (2 << 20))).encode())
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    import httpx
    r = httpx.get(f"{cluster.gateway_url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = post(cluster, chat_body(), headers={"x-gpumesh-priority": "urgent"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-gpumesh-priority"
    assert httpx.get(f"{cluster.gateway_url}/healthz", timeout=30).json()["status"] == "ok"

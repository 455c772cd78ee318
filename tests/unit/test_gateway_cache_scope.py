"""What the response caches may replay: only deterministic answers, and only the primary variant's (their keys
name the model asked for, not the variant that served). The gateway runs in-process with proxy.complete
faked; test_gateway_http.py's serving view (chat, its fallback chat-lite, team-b's other)."""

from __future__ import annotations

import json

import pytest

from controlplane.gateway import cache as cachemod
from controlplane.gateway import proxy
from tests.unit.test_gateway_http import _view
from tests.unit.test_gateway_routing import cfg


def test_a_random_seed_is_not_deterministic():
    assert cachemod.deterministic({"seed": 0, "temperature": 0.8})
    assert cachemod.deterministic({"seed": 7})
    assert not cachemod.deterministic({"seed": -1, "temperature": 0.8})       # llama.cpp: a random seed
    assert cachemod.deterministic({"seed": -1, "temperature": 0})


@pytest.fixture
async def gw(monkeypatch):
    from controlplane.gateway.service import Gateway
    g = Gateway(cfg(breaker_open_seconds=300))
    g.view.apply(_view())
    g.served = []

    async def complete(client, endpoint, path, data, api_key="", certificate=""):
        g.served.append(json.loads(data)["model"])
        return json.dumps({"choices": [{"text": f"answer {len(g.served)}"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    monkeypatch.setattr(proxy, "complete", complete)
    yield g
    await g.http.aclose()


async def ask(g, **extra):
    body = {"model": "chat", "prompt": "hi", "max_tokens": 4, "temperature": 0, **extra}
    return await g.handle("/v1/completions", json.dumps(body).encode(), {"x-gpumesh-allow-fallback": "true"})


async def test_a_fallback_answer_is_not_replayed_once_the_primary_serves_again(gw):
    primary = gw.stats.of("chat/chat-1").breaker
    primary.trip()                                         # the primary's one replica is down: fallback
    first = await ask(gw)
    assert first.headers.get("x-gpumesh-degraded") == "fallback"
    assert first.headers["x-gpumesh-served-by"] == "chat-lite/chat-lite-1"
    primary.success()                                      # the primary is back
    again = await ask(gw)
    assert again.headers.get("x-gpumesh-cache") is None, "the fallback's answer was replayed as the primary's"
    assert again.headers["x-gpumesh-served-by"] == "chat/chat-1" and not again.headers.get("x-gpumesh-degraded")
    third = await ask(gw)                                  # the primary's own answer is cached as before
    assert third.headers.get("x-gpumesh-cache") == "hit" and third.body == again.body


async def test_a_random_seed_is_served_fresh_each_time(gw):
    a = await ask(gw, temperature=0.9, seed=-1)
    b = await ask(gw, temperature=0.9, seed=-1)
    assert b.headers.get("x-gpumesh-cache") is None and a.body != b.body
    c, d = await ask(gw, temperature=0.9, seed=5), await ask(gw, temperature=0.9, seed=5)
    assert d.headers.get("x-gpumesh-cache") == "hit" and c.body == d.body

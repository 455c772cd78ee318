"""Requests waiting for a replica: when the serving view changes under them they are routed on the latest view,
but only among the deployments they were resolved to; when their client goes away they leave the queue and
its gauge; a retry waits within the request's deadline. The gateway runs in-process with proxy.complete
faked."""

from __future__ import annotations

import asyncio
import json

import pytest

from controlplane.gateway import proxy
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as MS
from gpumesh.v1 import servingview_service_pb2 as V
from tests.unit.test_gateway_accounting import until
from tests.unit.test_gateway_routing import cfg


def one(name: str, tenant: str, model: str, endpoint: str) -> V.ServingView:
    m = MS.Model(name=model, variants=[MS.Variant(name="q4", fallback_rank=0, max_context=2048)])
    d = D.Deployment(spec=D.DeploymentSpec(name=name, model=model, variant="q4", tenant=tenant,
                                           backend=D.BackendSettings(context=512)))
    d.status.backend = "llama.cpp"
    d.replicas.append(D.Replica(id=f"{tenant}-r", deployment=name, state=D.REPLICA_STATE_READY,
                                endpoint=endpoint, node="n", gpu_index=0))
    return V.ServingView(deployments=[d], models=[m])


@pytest.fixture
async def gw(monkeypatch, tmp_path):
    from controlplane.gateway.service import Gateway
    from tests.integration.secure import TOKENS, write_tenants
    g = Gateway(cfg(tenants_file=write_tenants(tmp_path / "t.yaml"), breaker_open_seconds=300))
    g.view.apply(one("chat", "team-a", "smol", "127.0.0.1:9"))
    g.served, g.hold, g.tokens = [], asyncio.Event(), TOKENS

    async def complete(client, endpoint, path, data, api_key="", certificate=""):
        g.served.append(endpoint)
        await g.hold.wait()
        return b'{"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
    monkeypatch.setattr(proxy, "complete", complete)
    yield g
    await g.http.aclose()


@pytest.mark.parametrize("now, status, code", [("another tenant's", 404, "model_not_found"),
                                               ("another model's", 503, "model_changed"),
                                               ("gone", 404, "model_not_found")])
async def test_a_queued_request_is_not_served_by_a_deployment_that_took_its_name(gw, now, status, code):
    """Its deployment deleted while it waits, a queued request is answered at once as a request arriving now
    is: 404 model_not_found when the name serves the caller nothing any more, 503 model_changed (retry) when
    it names another of the caller's deployments now; never served by the deployment that took the name. It
    waited for its deadline (here queue_timeout_seconds, 30 s) and was answered 429."""
    from controlplane.gateway.apierror import APIError
    headers = {"authorization": f"Bearer {gw.tokens['team-a']}"}
    req = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4}).encode()
    first = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.served == ["127.0.0.1:9"], "the first request on team-a's replica")
    queued = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.admission.depth("chat") == 1, "the second request to queue")
    # team-a's deployment is deleted; the name is free and comes back as another deployment (or not at all)
    gw.view.apply({"another tenant's": one("chat", "team-b", "smol", "127.0.0.1:10"),
                   "another model's": one("chat", "team-a", "llama", "127.0.0.1:10"),
                   "gone": V.ServingView()}[now])
    await until(queued.done, "the queued request to be answered")
    with pytest.raises(APIError) as e:
        await queued
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    assert gw.admission.queues == {}, "the queue of the deleted deployment stayed"
    gw.hold.set()
    await first
    assert gw.served == ["127.0.0.1:9"]


async def test_the_queue_of_a_deleted_deployment_and_its_gauge_are_forgotten(gw):
    """Each model's queue (and its queue_depth series) stayed for good once created, for deployments long
    deleted: a gateway that saw many deployments come and go kept them all."""
    from prometheus_client import generate_latest

    from controlplane.gateway import metrics as M
    headers = {"authorization": f"Bearer {gw.tokens['team-a']}"}
    req = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4}).encode()
    gw.hold.set()
    await gw.handle("/v1/completions", req, headers)       # admitted at once: nothing waits
    assert gw.admission.queues == {}
    gw.hold.clear()
    first = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.served == ["127.0.0.1:9"] * 2, "the second request on the replica")
    queued = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.admission.depth("chat") == 1, "a request to queue")
    gw.hold.set()
    await first
    await queued                                          # served: nothing waits for chat now
    assert gw.admission.queues == {}
    assert 'gpumesh_gateway_queue_depth{model="chat"}' in generate_latest(M.REGISTRY).decode()
    gw.view.apply(V.ServingView())                         # chat is deleted
    assert 'gpumesh_gateway_queue_depth{model="chat"}' not in generate_latest(M.REGISTRY).decode()


async def test_a_client_gone_from_the_queue_leaves_the_queue_depth_gauge(gw):
    from controlplane.gateway import metrics as M
    headers = {"authorization": f"Bearer {gw.tokens['team-a']}"}
    req = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4}).encode()
    first = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.served == ["127.0.0.1:9"], "the first request on the replica")
    queued = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.admission.depth("chat") == 1, "the second request to queue")
    assert M.QUEUE_DEPTH.labels("chat")._value.get() == 1
    queued.cancel()                                   # its client went away
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert M.QUEUE_DEPTH.labels("chat")._value.get() == 0, "the gauge still counts the request that left"
    gw.hold.set()
    await first


async def test_a_retry_waits_no_longer_than_the_requests_deadline(monkeypatch, tmp_path):
    """x-gpumesh-deadline-ms bounds the wait to the first token: a request whose first replica failed waits
    for another within what is left of it, not for queue_timeout_seconds."""
    from controlplane.gateway.service import Gateway
    from controlplane.gateway.apierror import APIError
    g = Gateway(cfg(queue_timeout_seconds=60, breaker_open_seconds=300))
    v = one("chat", "team-a", "smol", "127.0.0.1:9")
    v.deployments[0].replicas.append(D.Replica(id="team-a-r2", deployment="chat", state=D.REPLICA_STATE_READY,
                                               endpoint="127.0.0.1:10", node="n", gpu_index=1))
    g.view.apply(v)
    hold = asyncio.Event()

    async def complete(client, endpoint, path, data, api_key="", certificate=""):
        if endpoint == "127.0.0.1:9":
            raise proxy.BackendFailed("HTTP 500: boom")
        await hold.wait()                                   # the other replica: busy for the whole test
        return b'{"usage": {}}'
    monkeypatch.setattr(proxy, "complete", complete)
    req = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4}).encode()
    try:
        busy = [asyncio.ensure_future(g.handle("/v1/completions", req, {}))]
        await until(lambda: g.stats.of("chat/team-a-r2").in_flight == 1, "the second replica to be busy")
        with pytest.raises(APIError) as e:
            await asyncio.wait_for(g.handle("/v1/completions", req, {"x-gpumesh-deadline-ms": "300"}), 20)
        assert e.value.status == 503 and "retry-after" in e.value.headers
        hold.set()
        await busy[0]
    finally:
        await g.http.aclose()


async def test_a_fallback_requests_retry_waits_in_the_fallbacks_queue(monkeypatch):
    """A request served by the fallback variant fails there and waits for another fallback replica. It must
    wait in the fallback's queue: at the head of the primary's, it kept every request behind it from the
    primary's replica once that was back."""
    from controlplane.gateway.service import Gateway
    g = Gateway(cfg(queue_timeout_seconds=60, breaker_open_seconds=300))
    m = MS.Model(name="smol", variants=[MS.Variant(name="q4", fallback_rank=0), MS.Variant(name="lite", fallback_rank=1)])
    deps = []
    for name, variant, ports in (("chat", "q4", [9]), ("chat-lite", "lite", [10, 11])):
        d = D.Deployment(spec=D.DeploymentSpec(name=name, model="smol", variant=variant, tenant="team-a",
                                               backend=D.BackendSettings(context=512)))
        d.status.backend = "llama.cpp"
        for i, port in enumerate(ports):
            d.replicas.append(D.Replica(id=f"{name}-{i}", deployment=name, state=D.REPLICA_STATE_READY,
                                        endpoint=f"127.0.0.1:{port}", node="n", gpu_index=port))
        deps.append(d)
    g.view.apply(V.ServingView(deployments=deps, models=[m]))
    hold = asyncio.Event()

    async def complete(client, endpoint, path, data, api_key="", certificate=""):
        if endpoint == "127.0.0.1:10":
            raise proxy.BackendFailed("HTTP 500: boom")
        if endpoint == "127.0.0.1:11":
            await hold.wait()                                # the other fallback replica: busy
        return b'{"usage": {}}'
    monkeypatch.setattr(proxy, "complete", complete)

    def req(model):
        return json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode()
    try:
        busy = asyncio.ensure_future(g.handle("/v1/completions", req("chat-lite"), {}))
        await until(lambda: g.stats.of("chat-lite/chat-lite-1").in_flight == 1, "the fallback's 2nd replica busy")
        primary = g.stats.of("chat/chat-0").breaker
        primary.trip()                                       # the primary is down: the next request falls back
        failed = g.stats.of("chat-lite/chat-lite-0").failures       # 1 when the busy request was tried there first
        fell = asyncio.ensure_future(g.handle("/v1/completions", req("chat"), {"x-gpumesh-allow-fallback": "true"}))
        await until(lambda: g.stats.of("chat-lite/chat-lite-0").failures == failed + 1, "the fallback attempt to fail")
        await until(lambda: g.admission.depth("chat") + g.admission.depth("chat-lite") == 1, "its retry to wait")
        primary.success()                                    # the primary is back
        out = await asyncio.wait_for(g.handle("/v1/completions", req("chat"), {}), 10)
        assert out.headers["x-gpumesh-served-by"] == "chat/chat-0"
        hold.set()
        await busy
        assert (await fell).headers["x-gpumesh-degraded"] == "fallback"
    finally:
        await g.http.aclose()


async def test_a_client_gone_before_a_whole_answer_is_logged_as_499(gw, caplog):
    """docs/gateway.md: a client that disconnects releases its slot at once and its log line says 499 (so
    far only a stream's did: a whole answer's client gone while queued or waiting left no line at all)."""
    import logging
    from controlplane.gateway import metrics as M
    headers = {"authorization": f"Bearer {gw.tokens['team-a']}"}
    req = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4}).encode()
    before = M.REQUESTS.labels("chat", "499")._value.get()
    caplog.set_level(logging.INFO, logger="gateway.requests")
    waiting = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.served, "the first request to wait for its backend")
    queued = asyncio.ensure_future(gw.handle("/v1/completions", req, headers))
    await until(lambda: gw.admission.depth("chat") == 1, "the second request to queue")
    for task in (queued, waiting):                      # both clients go away
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert M.REQUESTS.labels("chat", "499")._value.get() == before + 2
    assert sum(r.getMessage() == "request" and r.fields["status"] == 499 for r in caplog.records
               if r.name == "gateway.requests") == 2
    assert gw.stats.of("chat/team-a-r").in_flight == 0 and gw.admission.depth("chat") == 0

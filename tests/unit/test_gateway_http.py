"""The gateway's request checks, response cache and SSE framing, and its HTTP error answers (the Starlette
app in-process over httpx's ASGI transport, with a serving view applied by hand; no backend is called)."""

from __future__ import annotations

import json

import httpx
import pytest

from controlplane.gateway import cache as cachemod
from controlplane.gateway import validate
from controlplane.gateway.apierror import APIError
from controlplane.gateway.sse import EventReader
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import servingview_service_pb2 as V
from tests.unit.test_gateway_routing import cfg


def err(fn, *a) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a)
    return e.value


def test_validation_names_the_field():
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert validate.request(ok, chat=True) == {"model": "m", "max_tokens": None, "stream": False}
    assert err(validate.parse, b"{oops").status == 400
    assert err(validate.parse, b"").code == "invalid_json"
    assert "object" in err(validate.parse, b"3").message
    cases = [({"messages": ok["messages"]}, True, "model"),
             ({**ok, "messages": []}, True, "messages"),
             ({**ok, "messages": [{"role": "x", "content": "y"}]}, True, "messages[0].role"),
             ({**ok, "messages": [{"role": "user", "content": 5}]}, True, "messages[0].content"),
             ({**ok, "max_tokens": 0}, True, "max_tokens"),
             ({**ok, "max_tokens": True}, True, "max_tokens"),
             ({**ok, "max_completion_tokens": -1}, True, "max_completion_tokens"),
             ({**ok, "temperature": 3}, True, "temperature"),
             ({**ok, "temperature": float("nan")}, True, "temperature"),
             ({**ok, "top_p": "x"}, True, "top_p"),
             ({**ok, "n": 2}, True, "n"),
             ({**ok, "stream": 1}, True, "stream"),
             ({**ok, "stop": [1]}, True, "stop"),
             ({"model": "m"}, False, "prompt"),
             ({"model": "m", "prompt": {"a": 1}}, False, "prompt")]
    for body, chat, param in cases:
        e = err(validate.request, body, chat)
        assert e.status == 400 and e.param == param and param.split("[")[0] in e.message, (body, e.message)
    e = err(validate.check_context, 512, 512)
    assert e.param == "max_tokens" and "1 to 511" in e.message
    validate.check_context(511, 512)
    assert validate.priority(None, "sheddable") == "sheddable"
    assert err(validate.priority, "urgent", "standard").param == "x-gpumesh-priority"
    assert err(validate.deadline_ms, "-5").param == "x-gpumesh-deadline-ms"
    assert validate.flag("true", "x") is True and err(validate.flag, "maybe", "x-y").param == "x-y"


def test_response_cache_bounds_and_scope():
    now = [0.0]
    c = cachemod.ResponseCache(entries=2, max_bytes=100, ttl=10, clock=lambda: now[0])
    body = {"model": "m", "prompt": "p", "temperature": 0}
    assert cachemod.deterministic(body) and cachemod.deterministic({"seed": 3, "temperature": 1})
    assert not cachemod.deterministic({"temperature": 0.7}) and not cachemod.deterministic({})
    ka, kb = cachemod.key("a", "/v1/completions", body), cachemod.key("b", "/v1/completions", body)
    assert ka != kb                                             # per tenant
    assert ka == cachemod.key("a", "/v1/completions", {**body, "stream": False, "user": "u"})
    assert ka != cachemod.key("a", "/v1/chat/completions", body)
    c.put(ka, b"x" * 40, 5)
    assert c.get(ka) == (b"x" * 40, 5) and c.get(kb) is None
    c.put(kb, b"y" * 40, 5)
    c.get(ka)                                                   # ka is now the most recent
    c.put("k3", b"z" * 40, 5)                                   # over 100 bytes and 2 entries: LRU goes
    assert c.get(kb) is None and c.get(ka) is not None and c.bytes <= 100
    now[0] = 11
    assert c.get(ka) is None                                    # expired
    c.put("big", b"b" * 101, 1)
    assert c.get("big") is None                                 # larger than the cache
    assert not cachemod.ResponseCache(0, 100, 10).enabled


def test_sse_reader_reframes_events_split_anywhere():
    stream = b'data: {"a":1}\r\n\r\n: ping - 2024\r\n\r\ndata: {"b":2}\r\n\r\ndata: [DONE]\r\n\r\n'
    for cut in range(1, len(stream)):
        r = EventReader()
        got = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert got == [b'{"a":1}', b'{"b":2}', b"[DONE]"], cut
    assert EventReader().feed(b"data: x\n\ndata: y\n\n") == [b"x", b"y"]


def _view():
    m = M.Model(name="smol", variants=[M.Variant(name="q4", fallback_rank=0, max_context=2048),
                                       M.Variant(name="lite", fallback_rank=1, max_context=2048)])
    deps = []
    for name, variant, tenant in (("chat", "q4", "team-a"), ("chat-lite", "lite", "team-a"), ("other", "q4", "team-b")):
        d = D.Deployment(spec=D.DeploymentSpec(name=name, model="smol", variant=variant, tenant=tenant,
                                               backend=D.BackendSettings(context=512)))
        d.status.backend = "llama.cpp"
        d.replicas.append(D.Replica(id=f"{name}-1", deployment=name, state=D.REPLICA_STATE_READY,
                                    endpoint="127.0.0.1:9", node="n", gpu_index=0))
        deps.append(d)
    return V.ServingView(deployments=deps, models=[m])


@pytest.fixture
async def app(tmp_path):
    from controlplane.gateway.app import create_app
    from controlplane.gateway.service import Gateway
    from tests.integration.secure import TOKENS, write_tenants
    # circuits stay open for the whole test: with the default 2 s, a stalled worker let an opened circuit turn
    # half-open between two requests, and the next one took the probe to the dead port (a second failure)
    gw = Gateway(cfg(tenants_file=write_tenants(tmp_path / "t.yaml"), max_body_bytes=4096, breaker_open_seconds=300))
    gw.view.apply(_view())
    transport = httpx.ASGITransport(app=create_app(gw))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        c.tokens = TOKENS
        c.gw = gw
        yield c
    await gw.http.aclose()


SPLIT = (b'{"id": "c", "object": "text_completion", "created": 1, "model": "m",',
         b' "choices": [{"index": 0, "text": "two\\nlines", "finish_reason": null}]}')


def client_events(text: str) -> list[str]:
    """The data of each event as an SSE client reads it (the spec: one space after `data:` dropped, the values
    of an event's `data:` lines joined by a newline)."""
    out = []
    for block in text.split("\n\n"):
        values = [ln[6:] if ln.startswith("data: ") else ln[5:] for ln in block.split("\n") if ln.startswith("data:")]
        if values:
            out.append("\n".join(values))
    return out


async def test_an_event_whose_data_spans_lines_reaches_the_client_with_the_same_data():
    """A backend event whose data is on several `data:` lines (a pretty-printed object; or text with a line
    break) was re-framed as one `data:` line with a raw newline in it: the client read the first line as the
    event's data (a cut JSON object) and dropped the rest as a field of no known name."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from controlplane.gateway.app import create_app
    from controlplane.gateway.grpcsvc import InferenceService
    from controlplane.gateway.service import Gateway
    from tests.unit.test_gateway_resume import serve, view

    async def completions(request):
        async def events():
            yield b"data: " + SPLIT[0] + b"\r\ndata: " + SPLIT[1] + b"\r\n\r\n"
            yield b"data: plain one\ndata:\ndata:  plain three\n\n"
            yield b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
        return StreamingResponse(events(), media_type="text/event-stream")
    server, task, port = await serve(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]))
    gw = Gateway(cfg())
    gw.view.apply(view("llama.cpp", [port]))
    body = {"model": "chat", "prompt": "hi", "max_tokens": 4, "stream": True}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw") as c:
            r = await c.post("/v1/completions", json=body)
        got = client_events(r.text)
        assert got[:2] == [b"\n".join(SPLIT).decode(), "plain one\n\n plain three"], r.text
        assert json.loads(got[0])["choices"][0]["text"] == "two\nlines" and got[-1] == "[DONE]"
        # the gRPC relay reads the same events
        out = await gw.handle("/v1/completions", json.dumps(body).encode(), {})
        first = await InferenceService(gw)._chunks(out, "", "").__anext__()
        assert first.text == "two\nlines"
        await out.stream.aclose()
    finally:
        await gw.http.aclose()
        server.should_exit = True
        await task


def test_resolve_primary_and_fallback():
    from controlplane.gateway.view import FleetView
    v = FleetView()
    v.apply(_view())
    prim, fb = v.resolve("chat", "team-a")
    assert [d.name for d in prim] == ["chat"] and [d.name for d in fb] == ["chat-lite"]
    prim, fb = v.resolve("smol", "team-a")              # by model: lowest rank first
    assert [d.name for d in prim] == ["chat"] and [d.name for d in fb] == ["chat-lite"]
    assert v.resolve("chat", "team-b") == ([], [])
    assert [d.name for d in v.resolve("smol", "team-b")[0]] == ["other"]
    assert v.deployments["chat"].context == 512


def test_variants_of_one_rank_on_two_backends_route_as_one_pool():
    """The same weights on llama.cpp and on vLLM at rank 0: a request for the model may go to either."""
    from controlplane.gateway.view import DeploymentInfo, FleetView
    v = FleetView()
    for name, variant, backend, rank in (("smol-cpp", "q4", "llamacpp", 0), ("smol-vllm", "bf16", "vllm", 0),
                                          ("smol-tiny", "q2", "llamacpp", 1)):
        v.deployments[name] = DeploymentInfo(name, "smol", variant, "team-a", backend, 512, rank)
    prim, fb = v.resolve("smol", "team-a")
    assert sorted(d.name for d in prim) == ["smol-cpp", "smol-vllm"] and [d.name for d in fb] == ["smol-tiny"]


async def test_http_errors_are_openai_shaped(app):
    a = {"authorization": f"Bearer {app.tokens['team-a']}"}
    r = await app.post("/v1/chat/completions", content=b"{}")
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
    r = await app.post("/v1/chat/completions", headers={"authorization": f"Bearer {app.tokens['team-b']}"},
                       json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await app.post("/v1/chat/completions", headers=a, content=b"x" * 5000)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    r = await app.post("/v1/completions", headers=a, json={"model": "chat", "prompt": "x", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "512" in r.json()["error"]["message"]
    r = await app.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = await app.get("/v1/models", headers=a)
    assert {m["id"] for m in r.json()["data"]} == {"chat", "chat-lite", "smol"}
    r = await app.get("/v1/gpu/memory-forecast?hours=-1", headers=a)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hours"
    r = await app.get("/v1/gpu/memory-forecast?hours=2", headers=a)
    assert r.status_code == 200 and r.json()["source"] == "current-use" and "forecast" in r.json()["note"]
    r = await app.get("/v1/gpu/models-optimal?agent_type=Chat", headers=a)
    assert [m["model"] for m in r.json()["models"]] and all(m["registry_model"] == "smol" for m in r.json()["models"])
    r = await app.post("/v1/gpu/benchmark-model?model_name=other", headers=a)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model_name"
    r = await app.post("/v1/gpu/benchmark-model?model_name=chat&max_tokens=0", headers=a)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = await app.post("/models", headers=a, json={})
    assert r.status_code == 403 and r.json()["error"]["param"] == "authorization"      # a tenant may not register
    admin = {"authorization": f"Bearer {app.tokens['admin']}"}
    r = await app.post("/models", headers=admin, json={"family": "x"})                 # checked before forwarding
    assert r.status_code == 400 and r.json()["error"]["param"] == "model.name"
    r = await app.post("/models", headers=admin, json={"name": "m", "variants": [{"name": "v", "backend": "tf"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model.variants[0].backend"
    assert (await app.delete("/models/smol", headers=a)).status_code == 403
    r = await app.get("/metrics")
    assert r.status_code == 200 and "gpumesh_gateway_requests_total" in r.text
    app.gw.cfg.metrics_auth = "admin"                   # closed: its series name every tenant's models
    try:
        assert (await app.get("/metrics")).status_code == 401
        r = await app.get("/metrics", headers=a)
        assert r.status_code == 403 and "admin token" in r.json()["error"]["message"]
        assert (await app.get("/metrics", headers=admin)).status_code == 200
    finally:
        app.gw.cfg.metrics_auth = "open"
    assert (await app.get("/policies", headers=a)).json()["routing_policy"] == "gpu-aware"


def test_hostile_bodies_are_clean_errors():
    deep = b"[" * 100000 + b"]" * 100000
    assert err(validate.parse, deep).status == 400
    body = json.loads('{"model": "m", "prompt": "\\ud800 lone surrogate", "temperature": 0}')
    assert cachemod.key("t", "/v1/completions", body)                   # hashable despite the lone surrogate
    from controlplane.gateway.policy import affinity_key
    assert affinity_key("t", body, 64)
    assert err(validate.parse, b'{"stop": "\\ud800"}').code == "invalid_json"           # lone surrogate
    assert validate.parse(b'{"stop": "\\ud83d\\ude00"}') == {"stop": "\U0001f600"}    # a pair is fine
    assert err(validate.request, {"model": "m", "prompt": "x", "seed": 2 ** 40}, False).param == "seed"


def test_only_checked_parameters_reach_a_backend():
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body = {**ok, "top_p": None, "logit_bias": {"15": -100}, "top_k": 40, "response_format": {"type": "json_object"}}
    validate.request(body, chat=True)
    assert "top_p" not in body and body["top_k"] == 40                    # nulls dropped, extras kept
    for extra, param in (({"tools": []}, "tools"), ({"logit_bias": []}, "logit_bias"),
                         ({"logit_bias": {"x": 1}}, "logit_bias['x']"), ({"logprobs": 3}, "logprobs"),
                         # digits int() cannot read, and token ids beyond any vocabulary
                         ({"logit_bias": {"\u00b2": 1}}, "logit_bias['\u00b2']"),
                         ({"logit_bias": {"9" * 23: 1}}, f"logit_bias[{'9' * 20!r}]"),
                         ({"top_k": -1}, "top_k"), ({"stream_options": {"x": 1}}, "stream_options"),
                         ({"echo": True}, "echo")):
        assert err(validate.request, {**ok, **extra}, True).param == param, extra
    assert err(validate.request, {"model": "m", "prompt": "x", "logprobs": True}, False).param == "logprobs"
    assert err(validate.request, {"model": "m", "prompt": "x", "messages": []}, False).param == "messages"


def test_backend_load_signals_are_read_when_scraped():
    from controlplane.gateway.view import FleetView
    v = _view()
    r = v.deployments[0].replicas[0]
    r.load.requests_running, r.load.requests_waiting, r.load.kv_cache_usage = 1, 3, 0.5
    fv = FleetView()
    fv.apply(v)
    assert fv.deployments["chat"].replicas[0].waiting is None            # not scraped: unknown
    r.load.scraped = True
    fv.apply(v)
    rep = fv.deployments["chat"].replicas[0]
    assert (rep.running, rep.waiting, rep.kv_usage) == (1, 3, 0.5)


async def test_a_dead_replica_fails_cleanly_and_opens_its_circuit(app):
    # the only replica's port refuses connections (nothing listens on 127.0.0.1:9)
    a = {"authorization": f"Bearer {app.tokens['team-a']}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = await app.post("/v1/chat/completions", headers=a, json=body)
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_failed"
    assert "no other replica" in r.json()["error"]["message"]
    s = app.gw.stats.of("chat/chat-1")
    # a refused connection opens the circuit at once (not after breaker_failures of them)
    assert s.in_flight == 0 and s.failures == 1 and s.breaker.state == "open" and s.breaker.unreachable
    # open circuit: the request waits for a usable replica; past its deadline, 429 with Retry-After
    r = await app.post("/v1/chat/completions", headers={**a, "x-gpumesh-deadline-ms": "50"}, json=body)
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "deadline"
    # ... or the fallback variant's replica when allowed (dead too here: tagged attempt, clean 502)
    r = await app.post("/v1/chat/completions", headers={**a, "x-gpumesh-allow-fallback": "true"}, json=body)
    assert r.status_code == 502 and app.gw.stats.of("chat-lite/chat-lite-1").failures == 1
    assert app.gw.stats.of("chat-lite/chat-lite-1").in_flight == 0
    metrics = (await app.get("/metrics")).text
    assert 'gpumesh_gateway_circuit_state{replica="chat/chat-1"} 2.0' in metrics
    assert 'gpumesh_gateway_fallbacks_total{model="chat"}' in metrics


async def test_a_circuit_half_open_on_a_port_still_refusing_is_not_counted_usable(app):
    """A circuit opened by a refused connection turns half-open after its open time, but takes no request until its
    TCP probe finds the port listening; models-optimal counted such a replica as usable and rebalance recommended
    nothing for it. Both now treat it as the open circuit it is for requests."""
    a = {"authorization": f"Bearer {app.tokens['team-a']}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert (await app.post("/v1/chat/completions", headers=a, json=body)).status_code == 502
    b = app.gw.stats.of("chat/chat-1").breaker
    b.opened_at -= b.open_seconds + 1                      # the open time is over: half-open, port still dead
    assert b.state == "half-open" and b.unreachable and not b.allows()

    def chat_of(r):
        return next(m for m in r.json()["models"] if m["model"] == "chat")
    assert chat_of(await app.get("/v1/gpu/models-optimal", headers=a))["usable_replicas"] == 0

    async def status_of_chat_1():
        status = (await app.get("/v1/gpu/status", headers=a)).json()
        return next(r for m in status["models"] if m["name"] == "chat" for r in m["replicas"]
                    if r["replica"] == "chat/chat-1")
    rep = await status_of_chat_1()
    assert rep["circuit"] == "half-open" and rep["circuit_shut"] is True
    r = await app.post("/v1/gpu/rebalance", headers=a)
    why = [x["reason"] for x in r.json()["actions"] if x["replica"] == "chat/chat-1" and x["action"] == "route-around"]
    assert why and "refused or cut connections" in why[0]
    b.listening(b.begin())                                 # its TCP probe found the port listening
    assert chat_of(await app.get("/v1/gpu/models-optimal", headers=a))["usable_replicas"] == 1
    assert (await status_of_chat_1())["circuit_shut"] is False
    assert not [x for x in (await app.post("/v1/gpu/rebalance", headers=a)).json()["actions"]
                if x["replica"] == "chat/chat-1"]


async def _stand_in_backend():
    """A model server stand-in on a real socket (uvicorn): an OpenAI-shaped answer or a 3-event stream."""
    import asyncio
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request):
        body = await request.json()
        if body.get("stream"):
            async def events():
                for word in ("a", "b"):
                    yield f'data: {{"choices":[{{"delta":{{"content":"{word}"}}}}]}}\n\n'.encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": "ab"}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, sock.getsockname()[1]


async def test_a_killed_replica_costs_no_request_and_is_skipped_at_once(app):
    # `chat` gets a second replica that answers; its first replica's port refuses connections
    server, task, port = await _stand_in_backend()
    try:
        v = _view()
        v.deployments[0].replicas.append(D.Replica(id="chat-2", deployment="chat", state=D.REPLICA_STATE_READY,
                                                   endpoint=f"127.0.0.1:{port}", node="n", gpu_index=1))
        app.gw.view.apply(v)
        app.gw.stats.of("chat/chat-2").ttft_ema = 5.0           # looks slow: the first pick is the dead one
        from controlplane.gateway import metrics as GM
        retries = lambda: GM.RETRIES.labels("chat")._value.get()    # noqa: E731 (process-wide counter)
        before = retries()
        a = {"authorization": f"Bearer {app.tokens['team-a']}"}
        served = []
        for i in range(8):
            body = {"model": "chat", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2,
                    "stream": i % 2 == 1}
            r = await app.post("/v1/chat/completions", headers=a, json=body)
            assert r.status_code == 200, r.text
            assert "error" not in r.text
            served.append(r.headers["x-gpumesh-served-by"])
        assert served == ["chat/chat-2"] * 8                    # every request answered by the live replica
        dead = app.gw.stats.of("chat/chat-1")
        # one request tried the dead port and was retried before its first token; the circuit opened on
        # that one failure, so no later request went there
        assert dead.failures == 1 and dead.in_flight == 0 and dead.breaker.unreachable
        assert dead.breaker.state == "open"
        assert retries() == before + 1
        assert app.gw.stats.of("chat/chat-2").in_flight == 0
    finally:
        server.should_exit = True
        await task


def test_grpc_generate_names_its_own_field_and_maps_every_status():
    import grpc

    from controlplane.gateway.apierror import APIError
    from controlplane.gateway.grpcsvc import grpc_code, to_body
    from gpumesh.v1 import inference_service_pb2 as I
    with pytest.raises(APIError) as e:
        to_body(I.GenerateRequest(model="m", prompt="x", priority="urgent"))
    assert e.value.status == 400 and e.value.param == "priority" and e.value.message.startswith("priority: ")
    assert to_body(I.GenerateRequest(model="m", prompt="x", priority="Critical"))[0] == "/v1/completions"
    assert grpc_code(504) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_code(422) == grpc.StatusCode.INVALID_ARGUMENT and grpc_code(418) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(409) == grpc.StatusCode.FAILED_PRECONDITION and grpc_code(500) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("fields, param", [({"max_tokens": 600, "max_completion_tokens": 8}, "max_tokens"),
                                           ({"max_tokens": 8, "max_completion_tokens": 600}, "max_completion_tokens")])
async def test_each_token_limit_is_checked_against_the_context_and_named(app, fields, param):
    """A chat request may give both limits; the one beyond the context (512) is refused by its own name."""
    r = await app.post("/v1/chat/completions", headers={"authorization": f"Bearer {app.tokens['team-a']}"},
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], **fields})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and "600" in err["message"], r.text


async def test_liveness_tells_an_anonymous_caller_nothing_about_the_tenants_deployments(app):
    """`/healthz` takes no credentials (a load balancer's probe): it said how many deployments the gateway
    serves across every tenant. It says whether the gateway is up and follows the control plane, no count."""
    r = await app.get("/healthz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok" and body["view_connected"] is False
    assert set(body) == {"status", "view_connected", "policy"}

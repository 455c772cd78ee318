"""Resuming a stream that broke after tokens were sent (controlplane/gateway/relay.py, resume.py).

Two fake OpenAI backends run as real HTTP servers (uvicorn on sockets); the first request any of them gets
is cut after N tokens the way a killed process cuts it (the connection closes without the end of the chunked
body). The gateway app is called in-process (httpx's ASGI transport) and talks to the backends over HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from controlplane.gateway import metrics as M
from controlplane.gateway import resume
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as MS
from gpumesh.v1 import servingview_service_pb2 as V
from tests.unit.test_gateway_routing import cfg


class Cut(Exception):
    """Raised inside the response body: uvicorn closes the connection mid-stream."""


class Fleet:
    """Fake backends; `cuts` requests (the first ones, whichever backend gets them) break after `after`
    tokens."""

    def __init__(self, cuts: int, after: int) -> None:
        self.cuts, self.after = cuts, after
        self.seen: list[tuple[str, dict]] = []          # (backend name, request body)

    def app(self, name: str) -> Starlette:
        async def handle(request: Request):
            body = await request.json()
            chat = request.url.path.endswith("/chat/completions")
            self.seen.append((name, body))
            cut = self.after if self.cuts > 0 else None
            self.cuts -= 1
            n = body.get("max_tokens") or 16

            async def events():
                base = {"id": f"cmpl-{name}", "created": 1000 + len(name), "model": f"weights-{name}",
                        "object": "chat.completion.chunk" if chat else "text_completion"}
                if chat:
                    yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}}]})}\n\n"
                for i in range(n):
                    if cut is not None and i == cut:
                        raise Cut(f"{name} killed after {cut} tokens")
                    piece = f"{name}{i} "
                    ch = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                    yield f"data: {json.dumps({**base, 'choices': [dict(ch, finish_reason=None)]})}\n\n"
                    await asyncio.sleep(0)
                last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
                yield f"data: {json.dumps({**base, 'choices': [dict(last, finish_reason='length')]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 7 + 2 * len(json.dumps(body.get("prompt") or body.get("messages"))) // 10,
                             "completion_tokens": n, "total_tokens": 0}
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return Starlette(routes=[Route("/v1/completions", handle, methods=["POST"]),
                                 Route("/v1/chat/completions", handle, methods=["POST"])])


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="off"))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


def view(backend: str, ports: list[int]) -> V.ServingView:
    m = MS.Model(name="smol", variants=[MS.Variant(name="q4", fallback_rank=0, max_context=2048)])
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", model="smol", variant="q4", tenant="team-a",
                                           backend=D.BackendSettings(context=512)))
    d.status.backend = backend
    for i, port in enumerate(ports):
        d.replicas.append(D.Replica(id=f"chat-{i}", deployment="chat", state=D.REPLICA_STATE_READY,
                                    endpoint=f"127.0.0.1:{port}", node="n", gpu_index=i))
    return V.ServingView(deployments=[d], models=[m])


@pytest.fixture
async def setup():
    """setup(cuts, after, backend='llama.cpp', **gateway options) -> (fleet, httpx client to the gateway)."""
    from controlplane.gateway.app import create_app
    from controlplane.gateway.service import Gateway
    started, clients = [], []

    async def make(cuts: int, after: int, backend: str = "llama.cpp", **opts):
        fleet = Fleet(cuts, after)
        ports = []
        for name in ("a", "b"):
            server, task, port = await serve(fleet.app(name))
            started.append((server, task))
            ports.append(port)
        gw = Gateway(cfg(**opts))
        gw.view.apply(view(backend, ports))
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw", timeout=30)
        clients.append((c, gw))
        return fleet, c

    yield make
    for c, gw in clients:
        await c.aclose()
        await gw.http.aclose()
    for server, task in started:
        server.should_exit = True
        await task


def events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    return out


def text_of(evs: list[dict]) -> str:
    return "".join(resume.text_of(ch) for e in evs for ch in e.get("choices") or ())


def resumed(outcome: str) -> float:
    return M.RESUMED.labels("chat", outcome)._value.get()


async def test_a_cut_completion_is_resumed_on_the_other_replica_in_one_stream(setup):
    fleet, gw = await setup(cuts=1, after=3)
    before = resumed("resumed")
    r = await gw.post("/v1/completions", json={"model": "chat", "prompt": "Once upon", "max_tokens": 8,
                                               "temperature": 0.7, "stream": True,
                                               "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    evs = events(r.text)
    assert not any("error" in e for e in evs), r.text
    (first, sent1), (second, sent2) = fleet.seen
    assert first != second                                   # continued on the other replica
    head = "".join(f"{first}{i} " for i in range(3))
    assert text_of(evs) == head + "".join(f"{second}{i} " for i in range(5))
    # the continuation: the prompt with the text so far, the tokens left, the same sampling parameters
    assert sent2["prompt"] == "Once upon" + head and sent2["max_tokens"] == 5
    assert sent2["temperature"] == 0.7 and sent2["stream"] is True
    # one stream: the id, created and model the client saw first, on every event
    assert {(e["id"], e["created"], e["model"]) for e in evs} == {(f"cmpl-{first}", 1001, f"weights-{first}")}
    usage = evs[-1]["usage"]
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert [e["choices"][0]["finish_reason"] for e in evs if e["choices"]][-1] == "length"
    assert resumed("resumed") == before + 1


async def test_a_second_cut_ends_with_the_error_event(setup):
    fleet, gw = await setup(cuts=2, after=2)
    r = await gw.post("/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 8, "stream": True})
    evs = events(r.text)
    assert len(fleet.seen) == 2                               # resumed once, never twice
    assert "error" in evs[-1] and evs[-1]["error"]["code"] == "stream_broken"
    assert "resumed once already" in evs[-1]["error"]["message"]
    (first, _), (second, _) = fleet.seen
    assert text_of(evs) == f"{first}0 {first}1 {second}0 {second}1 "


async def test_cut_exactly_at_the_limit_closes_the_answer(setup):
    fleet, gw = await setup(cuts=1, after=4)
    r = await gw.post("/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 4, "stream": True})
    evs = events(r.text)
    assert len(fleet.seen) == 1 and not any("error" in e for e in evs)       # nothing left to generate
    assert evs[-1]["choices"][0]["finish_reason"] == "length" and len(text_of(evs).split()) == 4


@pytest.mark.parametrize("opts", [{"policy": "round-robin"}, {"policy": "least-loaded"},
                                  {"resume_broken_streams": "false"}])
async def test_baselines_and_the_switch_do_not_resume(setup, opts):
    fleet, gw = await setup(cuts=1, after=3, **opts)
    r = await gw.post("/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 8, "stream": True})
    evs = events(r.text)
    assert len(fleet.seen) == 1 and evs[-1]["error"]["code"] == "stream_broken"
    assert "not resumed" not in evs[-1]["error"]["message"]


async def test_chat_on_llamacpp_keeps_the_error_event(setup):
    fleet, gw = await setup(cuts=1, after=3, backend="llama.cpp")
    before = resumed("refused")
    r = await gw.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 8, "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    evs = events(r.text)
    assert len(fleet.seen) == 1                               # llama-cpp-python cannot continue a message
    assert evs[-1]["error"]["code"] == "stream_broken" and "continue_final_message" in evs[-1]["error"]["message"]
    assert resumed("refused") == before + 1


async def test_chat_on_vllm_continues_the_final_assistant_message(setup):
    fleet, gw = await setup(cuts=1, after=3, backend="vllm")
    msgs = [{"role": "user", "content": "hi"}]
    r = await gw.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 8, "stream": True,
                                                    "messages": msgs})
    evs = events(r.text)
    assert not any("error" in e for e in evs), r.text
    (first, _), (second, sent2) = fleet.seen
    head = f"{first}0 {first}1 {first}2 "
    assert sent2["messages"] == msgs + [{"role": "assistant", "content": head}]
    assert sent2["continue_final_message"] is True and sent2["add_generation_prompt"] is False
    assert sent2["max_tokens"] == 5
    assert text_of(evs) == head + "".join(f"{second}{i} " for i in range(5))
    roles = [e["choices"][0]["delta"].get("role") for e in evs if e["choices"]]
    assert roles.count("assistant") == 1                      # no second role delta from the continuation
    assert {e["id"] for e in evs} == {f"cmpl-{first}"}


def test_continuation_requests():
    p = resume.Progress()
    for piece in ("Hel", "lo"):
        p.see({"id": "x", "choices": [{"index": 0, "text": piece}]})
    assert resume.continuation({"prompt": "Say:", "stream": True}, False, p) == {
        "prompt": "Say:Hello", "stream": True, "max_tokens": 14}        # OpenAI's default of 16 less 2
    assert resume.continuation({"prompt": "a", "max_tokens": 2}, False, p) is None
    assert resume.continuation({"messages": [], "max_completion_tokens": 5}, True, p)["max_completion_tokens"] == 3
    assert "max_tokens" not in resume.continuation({"messages": []}, True, p)     # chat: no limit stays none
    assert "token ids" in resume.why_not(False, {"prompt": [1, 2]}, {"llama.cpp"})
    assert "echo" in resume.why_not(False, {"prompt": "a", "echo": True}, {"vllm"})
    assert resume.why_not(True, {"messages": []}, {"llama.cpp", "vllm"}) == ""     # a mixed pool: on vLLM
    assert resume.why_not(True, {"messages": []}, {"llama.cpp"})

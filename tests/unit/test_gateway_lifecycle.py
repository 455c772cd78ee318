"""The gateway's start and stop as clients and balancers see them: before its first view of the fleet it
answers 503 (retry), not 404 (no such model), and gRPC health says NOT_SERVING; while draining /readyz is
503; a held request for a deployment scaled to zero asks for a Wake again when the first one failed; a gRPC
stream broken after output ends the call with UNAVAILABLE, not OK."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from controlplane.gateway.apierror import APIError
from controlplane.gateway.service import Gateway
from tests.unit.test_gateway_routing import cfg
from tests.unit.test_gateway_wake import _view


def _chat(model="m"):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def test_before_the_first_view_a_request_is_503_with_retry_after_not_404():
    gw = Gateway(cfg())
    with pytest.raises(APIError) as e:
        await gw.handle("/v1/chat/completions", _chat(), {})
    assert e.value.status == 503 and e.value.headers.get("retry-after") and e.value.code == "not_ready"
    gw.view.apply(_view())
    with pytest.raises(APIError) as e:
        await gw.handle("/v1/chat/completions", _chat("nope"), {})
    assert e.value.status == 404                                    # with a view: truly unknown
    await gw.http.aclose()


async def test_readyz_is_503_before_the_view_and_while_draining():
    from controlplane.gateway.app import create_app
    gw = Gateway(cfg())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw") as c:
        assert (await c.get("/readyz")).status_code == 503
        gw.view.apply(_view())
        assert (await c.get("/readyz")).status_code == 200
        gw.draining = True
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["draining"] is True
    await gw.http.aclose()


async def test_grpc_health_is_not_serving_until_the_first_view():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from controlplane.gateway.grpcsvc import start_grpc, set_serving
    gw = Gateway(cfg())
    server = await start_grpc(gw, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def status():
                return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            gw.view.apply(_view())
            deadline = asyncio.get_running_loop().time() + 30
            while await status() != health_pb2.HealthCheckResponse.SERVING \
                    and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            await set_serving(gw, False)                                    # what a SIGTERM does first
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)
        await gw.http.aclose()


async def test_a_held_request_asks_again_when_the_first_wake_failed(monkeypatch):
    from controlplane.gateway import wake
    monkeypatch.setattr(wake, "REWAKE_S", 0.01)
    gw = Gateway(cfg(wake_timeout_seconds=120))
    gw.view.apply(_view())
    calls = []

    async def call(name):
        calls.append(name)          # the control plane is restarting: nothing changes in the view
    gw.waker._call = call
    await gw.waker.wake(["sleepy"])
    task = asyncio.ensure_future(gw.waker.keep_waking(["sleepy"]))
    for _ in range(200):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert calls[:3] == ["sleepy"] * 3
    # once the view shows it scaled up, it is not asked again
    gw.view.raw.deployments[0].spec.replicas = 1
    gw.view.apply(gw.view.raw)
    n = len(calls)
    task = asyncio.ensure_future(gw.waker.keep_waking(["sleepy"]))
    await asyncio.sleep(0.1)
    task.cancel()
    assert len(calls) <= n + 1      # at most the call already due (REWAKE_S guards a just-woken one)
    await gw.http.aclose()


async def test_a_grpc_stream_broken_after_output_ends_with_unavailable():
    from controlplane.gateway.grpcsvc import InferenceService
    from gpumesh.v1 import inference_service_pb2 as I

    async def frames():
        yield b'data: {"choices": [{"text": "Par"}]}\n\n'
        yield b'data: {"error": {"message": "the replica died mid-stream"}}\n\n'

    class Out:
        headers = {"x-gpumesh-served-by": "chat/r-1"}
        stream = frames()

    class GW:
        async def handle(self, path, body, headers):
            return Out()

    class Context:
        def invocation_metadata(self):
            return ()

        async def abort(self, code, details):
            raise grpc.aio.AbortError(code, details)    # what grpc.aio's abort raises in the handler
    got = []
    with pytest.raises(grpc.aio.AbortError) as e:
        async for item in InferenceService(GW()).Generate(I.GenerateRequest(model="m", prompt="x"), Context()):
            got.append(item)
    assert [g.text for g in got] == ["Par", "the replica died mid-stream"] and got[-1].finish_reason == "error"
    assert e.value.args[0] == grpc.StatusCode.UNAVAILABLE and "broke after 1" in e.value.args[1]


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}])
async def test_grpc_generate_reports_the_servers_prompt_count_or_leaves_it_unset(usage):
    """Generate reported prompt_tokens=0 for every answer: it never read a count. It asks the backend for usage
    (stream_options.include_usage: vLLM sends it, llama-cpp-python's server ignores it) and reports the
    server's counts; with no usage the prompt's count is unknown and left unset, not reported as 0."""
    from types import SimpleNamespace

    from controlplane.gateway.grpcsvc import InferenceService, to_body
    from controlplane.gateway.sse import frame
    from gpumesh.v1 import inference_service_pb2 as I
    path, body = to_body(I.GenerateRequest(model="m", prompt="1, 2, 3,"))
    assert body["stream_options"] == {"include_usage": True}

    async def frames():
        for text in ("4", ","):
            yield frame(json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}).encode())
        yield frame(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}).encode())
        if usage:
            yield frame(json.dumps({"choices": [], "usage": usage}).encode())
        yield frame(b"[DONE]")
    got = [m async for m in InferenceService(None)._chunks(SimpleNamespace(stream=frames()), "chat/r-1", "")]
    last = got[-1]
    assert [g.text for g in got] == ["4", ",", ""] and last.finish_reason == "length" and last.completion_tokens == 2
    if usage:
        assert last.HasField("prompt_tokens") and last.prompt_tokens == 6
    else:
        assert not last.HasField("prompt_tokens")
    from mesh.inferenceapi import response_to_dict
    assert response_to_dict("4,", last)["prompt_tokens"] == (6 if usage else None)

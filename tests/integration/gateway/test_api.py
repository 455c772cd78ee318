"""mesh-gateway's client APIs on the cluster of conftest.py: the official `openai` client gets completions and
streams (OpenAI's framing, ending with [DONE]) and lists only its tenant's models; gRPC `Generate` streams the
same tokens as the HTTP API and refuses what it must."""

from __future__ import annotations

import pytest

from tests.integration.gatewayhttp import auth, post
from tests.integration.secure import TOKENS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_openai_client_completions_and_streams(cluster, fleet):
    import openai
    c = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key=TOKENS["team-a"], max_retries=0, timeout=300)
    raw = c.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=0.7)
    r = raw.parse()
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    assert raw.headers["x-gpumesh-served-by"].startswith("chat/")
    text = c.completions.create(model="chat", prompt="The capital of France is", max_tokens=6, temperature=0.5)
    assert text.choices[0].text
    # a stream carries the same text as the whole answer (greedy decoding: temperature 0)
    whole = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Count to five."}],
                                      max_tokens=12, temperature=0).choices[0].message.content
    pieces = []
    for chunk in c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Count to five."}],
                                           max_tokens=12, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces and "".join(pieces) == whole
    whole = c.completions.create(model="chat", prompt="1, 2, 3,", max_tokens=8, temperature=0).choices[0].text
    pieces = [ch.choices[0].text for ch in c.completions.create(model="chat", prompt="1, 2, 3,", max_tokens=8,
                                                               temperature=0, stream=True) if ch.choices]
    assert len(pieces) >= 2 and "".join(pieces) == whole
    # the raw stream is OpenAI's framing, ending with [DONE]
    import httpx
    with httpx.stream("POST", f"{cluster.gateway_url}/v1/completions", headers=auth("team-a"), timeout=300,
                      json={"model": "chat", "prompt": "Hi", "max_tokens": 3, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    models = {m.id for m in c.models.list()}
    assert {"chat", "chat-lite", "smollm2"} <= models and "other" not in models


def test_grpc_generate_streams_tokens(cluster, fleet):
    import grpc
    from gpumesh.v1 import inference_service_pb2 as I
    from gpumesh.v1 import inference_service_pb2_grpc
    assert cluster.gateway_grpc
    with grpc.insecure_channel(cluster.gateway_grpc) as ch:
        stub = inference_service_pb2_grpc.InferenceServiceStub(ch)
        req = I.GenerateRequest(model="chat", prompt="1, 2, 3,", max_tokens=8)
        got = list(stub.Generate(req, metadata=(("authorization", f"Bearer {TOKENS['team-a']}"),), timeout=300))
        # the same text as the HTTP API's answer to the same greedy request, one message per chunk, then the last
        whole = post(cluster, {"model": "chat", "prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0},
                     path="/v1/completions").json()["choices"][0]["text"]
        assert len(got) >= 2 and "".join(g.text for g in got) == whole and whole
        assert got[-1].finish_reason in ("stop", "length") and got[-1].served_by.startswith("chat/")
        assert got[-1].completion_tokens == len(got) - 1 and not got[-1].text
        # llama-cpp-python's server sends no usage in a stream (it ignores stream_options.include_usage): the
        # prompt's count is unknown, left unset, not reported as 0
        assert not got[-1].HasField("prompt_tokens")
        chat = I.GenerateRequest(model="chat", messages=[I.ChatMessage(role="user", content="Count to three.")],
                                 max_tokens=8)
        got = list(stub.Generate(chat, metadata=(("authorization", f"Bearer {TOKENS['team-a']}"),), timeout=300))
        assert got[-1].finish_reason in ("stop", "length") and got[-1].served_by.startswith("chat/")
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req, metadata=(("authorization", f"Bearer {TOKENS['team-b']}"),), timeout=60))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bad = I.GenerateRequest(model="chat", prompt="x", max_tokens=100000)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, metadata=(("authorization", f"Bearer {TOKENS['team-a']}"),), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()

"""mesh-gateway through restarts on the cluster of conftest.py: a killed backend costs no request (a stream it
was serving is resumed on the other replica, and the restarted replica serves again), and a gateway told to stop
lets its streams in flight finish."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import wait_for
from tests.integration.gateway._helpers import NO_EOS, SLOW, all_ready, chat_body, client, served_by
from tests.integration.gatewayhttp import metric, post, ready_in_gateway
from tests.integration.gatewayhttp import status as gateway_status
from tests.integration.secure import TOKENS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_killed_backend_costs_no_request(cluster, fleet):
    import openai
    c = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key=TOKENS["team-a"], max_retries=0, timeout=300)
    req = dict(model="chat", prompt="1, 2, 3, 4,", max_tokens=120, temperature=0, logit_bias=NO_EOS)
    resumed = metric(cluster, 'gpumesh_gateway_resumed_total{model="chat",outcome="resumed"}')
    # the openai client streams; the backend serving it is killed after the first tokens: the gateway continues
    # the answer on the other replica in the same stream, and the client reads one complete answer
    with client(cluster, "admin") as admin:
        raw = c.completions.with_raw_response.create(**req, stream=True)
        victim_id = raw.headers["x-gpumesh-served-by"].split("/")[1]
        victim = next(r for r in admin.get_deployment("chat").replicas if r.id == victim_id)
        stream = raw.parse()
        pieces, ids, finish, killed, before = [], set(), None, False, ""
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if pieces and not killed:
                os.kill(admin.get_workload(victim.workload_id).pid, signal.SIGKILL)
                killed, before = True, "".join(pieces)
    # no error event (the openai client raises on one); the answer ran to its token limit, as an unbroken one
    # does (EOS is banned), in one stream (one id) that goes on from what was sent before the kill. (Not
    # compared with an unbroken answer's text: two llama.cpp processes, one decoding token by token and the
    # other prefilling the text so far, round differently and greedy decoding may part at a near tie.)
    text = "".join(pieces)
    assert finish == "length" and len(ids) == 1
    assert text.startswith(before) and len(text) > len(before) and 60 <= len(pieces) <= 120, (len(pieces), text)
    assert metric(cluster, 'gpumesh_gateway_resumed_total{model="chat",outcome="resumed"}') == resumed + 1
    served = served_by(cluster, 8)                    # every one answered 200 (asserted inside)
    assert served and all(s.startswith("chat/") for s in served)
    st = gateway_status(cluster)
    rv = next(r for m in st["models"] if m["name"] == "chat" for r in m["replicas"] if r["replica"] == f"chat/{victim.id}")
    assert rv["failures"] >= 1                         # the broken stream counted against the replica
    # and the control plane brings it back; the gateway routes to it again
    with client(cluster, "admin") as admin:
        admin.wait_deployment("chat", lambda x: all_ready(2)(x) and any(
            r.id == victim.id and r.restarts >= 1 for r in x.replicas), timeout=SLOW)
    wait_for(lambda: f"chat/{victim.id}" in served_by(cluster, 4), 120, "the restarted replica serves again",
             interval=0.5)


def test_sigterm_lets_streams_in_flight_finish(cluster, fleet):
    """A gateway told to stop (a rolling update) lets the streams it is serving, gRPC and HTTP, run to their
    end before it closes its backends' client, and exits cleanly; a new gateway serves the same deployments.
    (It used to close that client as soon as no HTTP connection was left: a gRPC stream broke at the signal.)"""
    import grpc
    import openai
    from gpumesh.v1 import inference_service_pb2 as I
    from gpumesh.v1 import inference_service_pb2_grpc
    try:
        proc = cluster.gateway_proc.popen
        with grpc.insecure_channel(cluster.gateway_grpc) as ch:
            stream = inference_service_pb2_grpc.InferenceServiceStub(ch).Generate(
                I.GenerateRequest(model="chat", prompt="1, 2, 3, 4,", max_tokens=40),
                metadata=(("authorization", f"Bearer {TOKENS['team-a']}"),), timeout=300)
            assert next(stream).text
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)                     # raises if the call ended with an error status
        assert rest and rest[-1].finish_reason in ("stop", "length"), rest[-1:]
        assert proc.wait(timeout=60) == 0
        cluster.stop_gateway()
        cluster.start_gateway()
        proc = cluster.gateway_proc.popen
        c = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key=TOKENS["team-a"], max_retries=0, timeout=300)
        wait_for(lambda: ready_in_gateway(cluster, "chat", 2), 60, "the new gateway sees the replicas")
        pieces, finish = [], None
        for chunk in c.completions.create(model="chat", prompt="1, 2, 3, 4,", max_tokens=60, temperature=0,
                                          logit_bias=NO_EOS, stream=True):
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
                if len(pieces) == 1:
                    proc.send_signal(signal.SIGTERM)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "length" and len(pieces) >= 30, (finish, len(pieces))     # not cut at the signal
        assert proc.wait(timeout=60) == 0
    finally:
        cluster.stop_gateway()
        cluster.start_gateway()
    wait_for(lambda: ready_in_gateway(cluster, "chat", 2), 60, "the new gateway sees the replicas")
    assert post(cluster, chat_body()).status_code == 200

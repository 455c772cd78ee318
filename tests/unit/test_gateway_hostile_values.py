"""Values a client can send that once broke the gateway beyond the one request (found by review):

- an integer too large for a float (temperature, top_p, min_p, repeat_penalty) raised OverflowError: a 500, and
  from the queue (the cost model priced it on every release) a 500 for other clients' requests and a dead
  ticker; max_tokens had no upper bound when the model's context is unknown;
- a request that held a half-open circuit's one probe and ended without a verdict (the benchmark endpoint, a
  grant given back at its deadline) left the circuit half-open and probing for good: the replica never took
  another request;
- every model name a client sent became a metric label (a 404 too), and a replica's series stayed after it left.
"""

from __future__ import annotations


import pytest

from controlplane.gateway import metrics as M
from controlplane.gateway import validate
from controlplane.gateway.admission import Admission
from controlplane.gateway.breaker import CLOSED, HALF_OPEN, CircuitBreaker
from controlplane.gateway.policy import RouteContext, make
from tests.unit.test_gateway_http import _view, app, err  # noqa: F401 - app is a fixture
from tests.unit.test_gateway_routing import cand, cfg

OK = {"model": "m", "prompt": "x"}
HUGE = 10 ** 400


@pytest.mark.parametrize("param", ["temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty"])
def test_an_integer_beyond_a_float_is_out_of_range_not_a_500(param):
    e = err(validate.request, {**OK, param: HUGE}, False)
    assert e.status == 400 and e.param == param and "out of range" in e.message
    assert len(e.message) < 200, e.message                  # the 401 digits are not sent back
    assert err(validate.request, {**OK, param: -HUGE}, False).param == param


@pytest.mark.parametrize("param", ["max_tokens", "top_k", "seed", "n", "logprobs"])
def test_a_huge_integer_is_a_clean_error_for_every_integer_parameter(param):
    e = err(validate.request, {**OK, param: HUGE}, False)
    assert e.status == 400 and e.param == param and len(e.message) < 200, e.message


def test_max_tokens_has_a_bound_when_the_context_is_unknown():
    assert validate.request({**OK, "max_tokens": validate.MAX_TOKENS}, False)["max_tokens"] == validate.MAX_TOKENS
    e = err(validate.request, {**OK, "max_tokens": validate.MAX_TOKENS + 1}, False)
    assert e.param == "max_tokens" and f"1 to {validate.MAX_TOKENS}" in e.message


def test_a_long_value_is_quoted_short():
    e = err(validate.request, {**OK, "stream": "y" * 100_000}, False)
    assert e.param == "stream" and "100002 characters" in e.message and len(e.message) < 200


def test_a_late_release_frees_only_its_own_probe():
    now = [0.0]
    br = CircuitBreaker(failures=1, open_seconds=1, clock=lambda: now[0])
    br.failure()
    now[0] = 1.0
    first = br.begin()
    assert first and br.state == HALF_OPEN and not br.allows()
    br.failure()                                  # its verdict: open again
    now[0] = 2.0
    second = br.begin()                           # the next half-open probe, someone else's
    br.release(first)                             # the first request's slot released late
    assert br.probing and not br.allows()
    br.release(second)
    assert br.allows()
    assert br.begin() and CircuitBreaker().begin() == 0     # closed: no probe taken


async def test_a_slot_that_ends_without_a_verdict_gives_the_probe_back():
    """The benchmark endpoint's way: acquire, stream, release, and neither ok() nor failed()."""
    now = [0.0]
    c = cfg(breaker_failures=1, breaker_open_seconds=1)
    p = make("gpu-aware", c)
    a = cand("a", c=c, clock=lambda: now[0])
    adm = Admission(p, queue_size=4)
    a.stats.failed()
    now[0] = 1.0
    assert a.stats.breaker.state == HALF_OPEN
    slot = await adm.acquire(lambda: [a], RouteContext("chat"), "sheddable", 5)
    assert slot.probe and a.stats.breaker.probing
    slot.release()
    assert not a.stats.breaker.probing and a.stats.breaker.allows()
    again = await adm.acquire(lambda: [a], RouteContext("chat"), "standard", 5)    # the replica is routable again
    a.stats.ok()
    again.release()
    assert a.stats.breaker.state == CLOSED and a.stats.in_flight == 0


async def test_a_huge_temperature_in_the_queue_breaks_no_other_request(app):  # noqa: F811
    a = {"authorization": f"Bearer {app.tokens['team-a']}"}
    r = await app.post("/v1/completions", headers=a, json={"model": "chat", "prompt": "x", "temperature": HUGE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


async def test_unknown_model_names_make_no_metric_series(app):  # noqa: F811
    a = {"authorization": f"Bearer {app.tokens['team-a']}"}
    for i in range(20):
        r = await app.post("/v1/completions", headers=a, json={"model": f"nope-{i}-" + "x" * 1000, "prompt": "x"})
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300
    text = (await app.get("/metrics")).text
    assert "nope-" not in text and 'gpumesh_gateway_requests_total{code="404",model="-"}' in text


def test_a_replica_that_left_takes_its_series_with_it():
    M.TTFT.labels("chat", "gone-1").observe(0.5)
    M.BACKEND_ERRORS.labels("chat", "gone-1").inc()
    M.CIRCUIT.labels("gone-1").set(2)
    M.FAILURE_PROBABILITY.labels("gone-1", "thermal-critical").set(0.5)
    M.IN_FLIGHT.labels("stays-1").set(1)
    assert M.forget_replicas({"stays-1"}) >= 4
    from prometheus_client import generate_latest
    text = generate_latest(M.REGISTRY).decode()
    assert "gone-1" not in text and 'replica="stays-1"' in text


@pytest.mark.parametrize("frame, says", [
    (b"data: not json", "not a JSON object"),
    (b"data: [1, 2]", "not a JSON object"),
    (b'data: {"error": "out of memory"}', "out of memory"),
    (b'data: {"error": {"message": "killed"}}', "killed"),
])
async def test_grpc_generate_turns_an_odd_backend_event_into_a_broken_stream(frame, says):
    """The gRPC relay once raised on an event that was not a JSON object or an error that was a string: the call
    ended UNKNOWN instead of UNAVAILABLE with the backend's message."""
    from types import SimpleNamespace

    from controlplane.gateway.grpcsvc import InferenceService, StreamBroken

    async def frames():
        yield b'data: {"choices": [{"text": "Hi", "finish_reason": 7}, "junk", {"delta": {"content": ["x"]}}]}'
        yield frame
    chunks = InferenceService(None)._chunks(SimpleNamespace(stream=frames()), "r-1", "")
    first = await chunks.__anext__()
    assert first.text == "Hi"
    with pytest.raises(StreamBroken) as e:
        await chunks.__anext__()
    assert says in e.value.message and e.value.completion == 1

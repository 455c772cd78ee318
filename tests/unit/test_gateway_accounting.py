"""What a request holds and gives back on every way it can end (a client gone mid-call or mid-stream, a stream
cut by its backend): replica slots, the circuit breaker's half-open probe, the order in which a freed slot
reaches a waiting request. The gateway runs in-process with its backend calls (proxy.complete, open_stream)
replaced by fakes, so each end happens exactly where the test puts it."""

from __future__ import annotations

import asyncio
import json

import anyio
import httpx
import pytest

from controlplane.gateway import proxy
from controlplane.gateway.apierror import APIError
from controlplane.gateway.breaker import HALF_OPEN
from controlplane.gateway.sse import EventReader
from tests.unit.test_gateway_resume import view
from tests.unit.test_gateway_routing import cfg

KEY = "chat/chat-0"
EVENT = json.dumps({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": "tok", "finish_reason": None}]}).encode()


class FakeStream:
    """A backend stream that has sent its first event and then waits: `cut()` breaks it as a killed process
    does, `close_awaits` makes its close suspend (as httpx's does)."""

    def __init__(self, close_awaits: bool = False) -> None:
        self.first = [EVENT]
        self.reader = EventReader()
        self.more: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.close_awaits = close_awaits
        self.chunks = self._chunks()

    async def _chunks(self):
        while True:
            item = await self.more.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def cut(self) -> None:
        self.more.put_nowait(httpx.ReadError("the connection was reset"))

    async def close(self) -> None:
        if self.close_awaits:
            await asyncio.sleep(0.01)
        self.closed = True


@pytest.fixture
async def gw(monkeypatch):
    """A gateway with one llama.cpp replica (concurrency from the test's config), backend calls faked:
    gw.streams (opened, in order), gw.calls (endpoints called for whole answers, each waiting on gw.hold)."""
    from controlplane.gateway.service import Gateway
    made = []

    async def make(**opts):
        g = Gateway(cfg(breaker_open_seconds=300, **opts))
        g.view.apply(view("llama.cpp", [9]))
        g.streams, g.calls, g.hold = [], [], asyncio.Event()

        async def open_stream(client, endpoint, path, data, api_key="", certificate=""):
            s = FakeStream()
            g.streams.append(s)
            return s

        async def complete(client, endpoint, path, data, api_key="", certificate=""):
            g.calls.append(endpoint)
            await g.hold.wait()
            return b'{"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
        monkeypatch.setattr(proxy, "open_stream", open_stream)
        monkeypatch.setattr(proxy, "complete", complete)
        made.append(g)
        return g
    yield make
    for g in made:
        await g.http.aclose()


def body(stream: bool) -> bytes:
    return json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 4, "stream": stream}).encode()


async def until(cond, what: str, timeout: float = 10.0) -> None:
    """Wait for `cond()` with a deadline (the loop turns; no fixed sleep decides the test)."""
    async def poll():
        while not cond():
            await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def half_open(g) -> object:
    """Open the replica's circuit (K failures of other requests) and let its open time pass."""
    s = g.stats.of(KEY)
    now = [0.0]
    s.breaker.clock = lambda: now[0]
    for _ in range(s.breaker.threshold):
        s.breaker.failure()
    now[0] = 1e6
    assert s.breaker.state == HALF_OPEN and s.breaker.allows()
    return s


async def test_a_request_gone_mid_call_keeps_another_requests_half_open_probe(gw):
    """Request X was sent while the circuit was closed; the circuit opened (other requests failed) and half-
    opened, and request P took the one probe. X's client going away must not free P's probe: a second
    request would be sent to the replica on trial while the probe is still out."""
    g = await gw(llamacpp_concurrency=4)
    x = asyncio.ensure_future(g.handle("/v1/completions", body(False), {}))
    await until(lambda: len(g.calls) == 1, "X's backend call")
    s = half_open(g)
    p = asyncio.ensure_future(g.handle("/v1/completions", body(False), {}))
    await until(lambda: len(g.calls) == 2, "the probe's backend call")
    assert s.breaker.probing and not s.breaker.allows()
    x.cancel()
    with pytest.raises(asyncio.CancelledError):
        await x
    assert s.in_flight == 1
    assert s.breaker.probing and not s.breaker.allows(), "X's end freed P's half-open probe"
    g.hold.set()
    await p
    assert s.in_flight == 0 and not s.breaker.probing


async def test_a_stream_closed_by_its_client_keeps_another_requests_half_open_probe(gw):
    g = await gw(llamacpp_concurrency=4)
    out = await g.handle("/v1/completions", body(True), {})          # X: sent while the circuit was closed
    assert await out.stream.__anext__() == b"data: " + EVENT + b"\n\n"
    s = half_open(g)
    p = asyncio.ensure_future(g.handle("/v1/completions", body(False), {}))
    await until(lambda: len(g.calls) == 1, "the probe's backend call")
    assert s.breaker.probing
    await out.stream.aclose()                                          # X's client went away
    assert g.streams[0].closed and s.in_flight == 1
    assert s.breaker.probing and not s.breaker.allows(), "X's end freed P's half-open probe"
    g.hold.set()
    await p


async def test_a_cut_stream_opens_the_circuit_before_its_slot_reaches_a_waiting_request(gw):
    """The backend under a stream dies (the connection is reset). The request waiting for that replica's slot
    must not be handed the slot before the break has opened the circuit: it would be sent to a dead process
    (and, with no other replica to retry on, answered 502) instead of waiting for the replica to come back."""
    g = await gw()                                                     # one replica, one slot
    out = await g.handle("/v1/completions", body(True), {})
    await out.stream.__anext__()
    w = asyncio.ensure_future(g.handle("/v1/completions", body(False), {}))
    await until(lambda: g.admission.depth("chat") == 1, "the second request to queue")
    g.streams[0].cut()
    rest = [frame async for frame in out.stream]
    assert b"stream_broken" in rest[-2] and rest[-1] == b"data: [DONE]\n\n"
    s = g.stats.of(KEY)
    assert s.breaker.state == "open"
    assert g.admission.depth("chat") == 1 and s.in_flight == 0, "the waiting request was given the dead replica"
    assert not g.calls
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w


async def test_a_stream_cancelled_by_its_client_gives_its_slot_back_at_once(gw):
    """Starlette cancels a streaming response's body through an anyio cancel scope when its client
    disconnects, and a cancelled scope cancels again at every await: the stream's accounting must not sit
    behind the awaited close of the backend's response. (httpx 0.29's close of a plain-HTTP response does not
    reach a cancellation point, so the fake's close suspends to make one: a guard on the order.)"""
    g = await gw()
    out = await g.handle("/v1/completions", body(True), {})
    await out.stream.__anext__()
    stream = g.streams[0]
    stream.close_awaits = True
    s = g.stats.of(KEY)
    assert s.in_flight == 1

    async def client():
        async for _ in out.stream:
            pass
    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await until(lambda: stream.more._getters, "the relay to wait for the backend")
        tg.cancel_scope.cancel()
    assert s.in_flight == 0 and not s.breaker.probing, "the cancelled stream kept its replica slot"


async def test_a_benchmark_whose_stream_is_cut_reports_it_in_its_row(gw):
    """POST /v1/gpu/benchmark-model on a replica whose backend dies mid-stream: an error in that replica's
    row (not a 500), and the slot given back."""
    from controlplane.gateway import gpuapi
    from controlplane.gateway.clients import ANONYMOUS
    g = await gw()
    run = asyncio.ensure_future(gpuapi.benchmark_model(g, ANONYMOUS, "chat", "4"))
    await until(lambda: g.streams, "the benchmark's stream")
    g.streams[0].cut()
    doc = await run
    assert "the stream broke" in doc["replicas"][0]["error"] and g.streams[0].closed
    assert g.stats.of(KEY).in_flight == 0


async def test_a_stream_never_started_closes_its_backend_response_when_dropped(gw):
    """The client left between the gateway's answer and the first read of its stream (Starlette then never
    starts the body): the relay's finally never runs. Dropping it must free the slot and close the backend's
    response, whose connection would otherwise stay taken while the backend generates into it."""
    import gc
    g = await gw()
    out = await g.handle("/v1/completions", body(True), {})
    stream = g.streams[0]
    assert g.stats.of(KEY).in_flight == 1
    del out
    gc.collect()
    assert g.stats.of(KEY).in_flight == 0
    await until(lambda: stream.closed, "the backend's response to be closed")


@pytest.mark.parametrize("sent, want", [({"retry-after": "7"}, "7"), ({}, "1"),
                                        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, "1")])
async def test_a_backends_429_is_passed_on_with_retry_after(sent, want):
    def backend(request):
        return httpx.Response(429, headers=sent, json={"error": {"message": "busy", "code": "overloaded"}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(backend)) as client:
        for call in (proxy.complete, proxy.open_stream):
            with pytest.raises(APIError) as e:
                await call(client, "127.0.0.1:9", "/v1/completions", b"{}")
            assert e.value.status == 429 and e.value.headers == {"retry-after": want}, call

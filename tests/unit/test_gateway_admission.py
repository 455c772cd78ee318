"""The gateway's circuit breaker (open, half-open probes, closed; a refused connection; the TCP probe) and
admission (slots, priority queue, queue bound, deadline, client gone, retries first in their class), without
a cluster. The candidates are test_gateway_routing.py's."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.gateway.admission import Admission, Rejected
from controlplane.gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from controlplane.gateway.policy import RouteContext, make
from controlplane.gateway.stats import ReplicaStats
from mesh import config
from tests.unit.test_gateway_routing import cand, cfg


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    br = CircuitBreaker(failures=3, open_seconds=5, clock=lambda: now[0])
    br.failure(); br.failure()
    assert br.state == CLOSED and br.allows()
    br.failure()
    assert br.state == OPEN and not br.allows()
    now[0] = 4.9
    assert not br.allows()
    now[0] = 5.0
    assert br.state == HALF_OPEN and br.allows()
    br.begin()                                     # the one probe
    assert not br.allows()
    br.failure()                                   # the probe failed: open again
    assert br.state == OPEN
    now[0] = 10.1
    br.begin()
    br.success()
    assert br.state == CLOSED and br.consecutive == 0
    # a success in between resets the count
    br.failure(); br.failure(); br.success(); br.failure(); br.failure()
    assert br.state == CLOSED


def test_a_refused_connection_opens_the_circuit_at_once_and_a_dead_port_keeps_it_open():
    now = [0.0]
    br = CircuitBreaker(failures=3, open_seconds=2, clock=lambda: now[0])
    br.trip()
    assert br.state == OPEN and br.unreachable and not br.allows()
    now[0] = 2.0
    assert br.state == HALF_OPEN and not br.allows()     # no request before the TCP probe says it listens
    br.hold(br.begin())                            # the TCP probe found nothing listening
    assert br.state == OPEN and not br.allows()
    now[0] = 4.0
    assert br.state == HALF_OPEN and not br.allows()
    br.listening(br.begin())                       # the next TCP probe found the port listening
    assert br.allows()
    br.begin()
    br.success()
    assert br.state == CLOSED and not br.unreachable
    s = ReplicaStats(CircuitBreaker(3, 2, clock=lambda: now[0]))
    s.failed(unreachable=False)
    assert s.breaker.state == CLOSED               # a 5xx or timeout counts toward K
    s.failed(unreachable=True)
    assert s.breaker.state == OPEN


def test_connection_failures_are_told_from_slow_or_erroring_backends():
    import httpx
    from controlplane.gateway import proxy
    assert proxy.failed(httpx.ConnectError("refused")).unreachable
    assert proxy.failed(httpx.RemoteProtocolError("Server disconnected without sending a response.")).unreachable
    assert proxy.failed(httpx.ReadError("reset")).unreachable
    assert not proxy.failed(httpx.ReadTimeout("slow")).unreachable


async def test_tcp_probe_holds_a_dead_port_open_and_frees_a_listening_one():
    from controlplane.gateway.service import Gateway
    gw = Gateway(cfg(breaker_open_seconds=0.1))
    try:
        s = gw.stats.of("chat/x")
        now = [0.0]
        s.breaker.clock = lambda: now[0]               # the breaker's time moves only when the test says
        s.failed(unreachable=True)
        dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = dead.sockets[0].getsockname()[1]
        dead.close()
        await dead.wait_closed()                       # nothing listens on `port` now
        now[0] += 0.15
        assert s.breaker.state == HALF_OPEN
        await gw.prober.probe("chat/x", f"127.0.0.1:{port}", s, s.breaker.begin())
        assert s.breaker.state == OPEN and s.breaker.unreachable
        live = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        now[0] += 0.15
        await gw.prober.probe("chat/x", f"127.0.0.1:{live.sockets[0].getsockname()[1]}", s, s.breaker.begin())
        assert s.breaker.state == HALF_OPEN and s.breaker.allows() and not s.breaker.unreachable
        live.close()
        await live.wait_closed()
    finally:
        await gw.http.aclose()


async def test_a_request_does_not_take_the_probe_of_a_refused_port_before_its_tcp_probe(tmp_path):
    """A replica's port refused a connection (the circuit opened at once); its open time passed before the
    gateway's tick ran the TCP probe. A request arriving in between took the half-open probe and was sent to
    the dead port (one more refused connection, here a 502 with no other replica to retry on): it waits for
    the TCP probe instead (here: its deadline, 429), and nothing is sent to the port."""
    from controlplane.gateway.apierror import APIError
    from controlplane.gateway.service import Gateway
    from tests.unit.test_gateway_resume import view
    dead = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = dead.sockets[0].getsockname()[1]
    dead.close()
    await dead.wait_closed()                       # nothing listens on `port` now
    gw = Gateway(cfg(breaker_open_seconds=1))
    gw.view.apply(view("llama.cpp", [port]))
    try:
        s = gw.stats.of("chat/chat-0")
        now = [0.0]
        s.breaker.clock = lambda: now[0]
        s.failed(unreachable=True)                 # the refused connection
        now[0] += 1                                # its open time passed; no tick has run the TCP probe yet
        assert s.breaker.state == HALF_OPEN and not s.breaker.allows()
        body = b'{"model": "chat", "prompt": "hi", "max_tokens": 2}'
        with pytest.raises(APIError) as e:
            await gw.handle("/v1/completions", body, {"x-gpumesh-deadline-ms": "50"})
        assert e.value.status == 429 and e.value.code == "deadline"
        assert s.failures == 1 and s.requests == 0 and not s.breaker.probing
    finally:
        await gw.http.aclose()


@pytest.mark.parametrize("listens", [False, True])
async def test_a_slow_tcp_probe_leaves_a_newer_requests_probe_alone(monkeypatch, listens):
    """A TCP probe's connect is slow (up to its 2 s). Meanwhile a request sent before the circuit opened
    succeeded (closed), others failed (open again), the open time passed and a request took the half-open
    probe. The slow connect's verdict then freed that probe (a second request went to the replica on trial)
    or reopened the circuit under it; it must change nothing: it is no longer the probe in flight."""
    from controlplane.gateway.service import Gateway
    gate = asyncio.Event()

    async def slow_connect(host, port):
        await gate.wait()
        if not listens:
            raise ConnectionRefusedError(111, "Connection refused")
        w = type("W", (), {"close": lambda self: None})()
        return None, w
    monkeypatch.setattr(asyncio, "open_connection", slow_connect)
    gw = Gateway(cfg(breaker_open_seconds=1))
    from tests.unit.test_gateway_resume import view
    gw.view.apply(view("llama.cpp", [9]))
    try:
        s = gw.stats.of("chat/chat-0")
        now = [0.0]
        s.breaker.clock = lambda: now[0]
        s.failed(unreachable=True)                 # a cut connection opens the circuit
        now[0] += 1
        gw.prober.start_due(gw.view)               # the tick: the TCP probe starts, and waits on its connect
        assert "chat/chat-0" in gw.prober.inflight and s.breaker.probing
        s.ok()                                     # a request sent before the circuit opened succeeds
        for _ in range(s.breaker.threshold):
            s.failed()                             # others fail: open again
        now[0] += 1
        assert s.breaker.state == HALF_OPEN and s.breaker.allows()
        mine = s.breaker.begin()                   # a request takes the half-open probe
        gate.set()                                 # the slow connect ends
        while "chat/chat-0" in gw.prober.inflight:
            await asyncio.sleep(0)
        assert s.breaker.state == HALF_OPEN and s.breaker.probing and not s.breaker.allows(), \
            "the TCP probe's late verdict applied to the request's probe"
        s.breaker.release(mine)
        assert s.breaker.allows()
    finally:
        await gw.http.aclose()


def test_wait_bound_follows_the_deadline_where_configured():
    from controlplane.gateway.service import Gateway
    gw = Gateway(cfg())
    assert gw._wait_bound(None, []) == 30.0                     # no deadline: queue_timeout_seconds
    assert gw._wait_bound(5000, []) == pytest.approx(5.0)       # nothing measured: the whole deadline
    assert gw._wait_bound(60000, []) == 30.0                    # never beyond queue_timeout_seconds
    asyncio.run(gw.http.aclose())


def test_policy_skips_an_open_circuit_until_half_open():
    now = [0.0]
    p = make("gpu-aware", cfg(breaker_failures=2, breaker_open_seconds=1))
    bad, good = cand("bad", clock=lambda: now[0]), cand("good", used_gib=60, clock=lambda: now[0])
    bad.stats.failed(); bad.stats.failed()
    assert p.pick([bad, good], RouteContext("chat"))[0] is good
    now[0] = 2
    good.stats.in_flight = 1                      # good is busy: the half-open probe goes to bad
    assert p.pick([bad, good], RouteContext("chat"))[0] is bad


async def test_admission_slots_priority_queue_bound_and_deadline():
    c = cfg()
    p = make("least-loaded", c)
    a = cand("a")
    adm = Admission(p, queue_size=2)
    ctx = RouteContext("chat")
    first = await adm.acquire(lambda: [a], ctx, "standard", 5)
    assert a.stats.in_flight == 1 and first.waited == 0
    order = []

    async def wait(prio):
        s = await adm.acquire(lambda: [a], ctx, prio, 30)
        order.append(prio)
        return s
    t1 = asyncio.create_task(wait("sheddable"))
    await asyncio.sleep(0.01)
    t2 = asyncio.create_task(wait("critical"))
    await asyncio.sleep(0.01)
    assert adm.depth("chat") == 2
    with pytest.raises(Rejected) as e:                         # the queue is full
        await adm.acquire(lambda: [a], ctx, "critical", 30)
    assert e.value.reason == "queue_full"
    first.release()
    first.release()                                            # idempotent
    s2 = await t2
    assert order == ["critical"] and a.stats.in_flight == 1
    s2.release()
    s1 = await t1
    assert order == ["critical", "sheddable"]
    # past the deadline
    with pytest.raises(Rejected) as e:
        await adm.acquire(lambda: [a], ctx, "standard", 0.05)
    assert e.value.reason == "deadline" and adm.depth("chat") == 0
    # a waiting client that goes away leaves no slot taken and no waiter behind
    t = asyncio.create_task(adm.acquire(lambda: [a], ctx, "standard", 30))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert adm.depth("chat") == 0
    s1.release()
    assert a.stats.in_flight == 0


async def test_gpu_aware_admission_sheds_at_once_only_when_the_wait_cannot_fit():
    p = make("gpu-aware", cfg())
    busy = cand("busy", in_flight=1, ttft=5, tpot=0.5)           # a slot frees in about 10 s (max_tokens 10)
    adm = Admission(p, queue_size=4, shed_early=True)
    assert not cfg().shed_early                                  # off by default: 429 after waiting it out
    ctx = RouteContext("chat", max_tokens=10)
    with pytest.raises(Rejected) as e:
        await adm.acquire(lambda: [busy], ctx, "standard", 2)
    assert e.value.reason == "deadline" and "expected wait 10.0s" in str(e.value) and adm.depth("chat") == 0
    t = asyncio.create_task(adm.acquire(lambda: [busy], RouteContext("chat", max_tokens=10), "standard", 30))
    await asyncio.sleep(0.02)
    assert not t.done() and adm.depth("chat") == 1             # 10 s fits in 30 s: it waits
    busy.stats.in_flight = 0
    adm.kick()
    assert (await t).candidate is busy
    # no healthy replica at all: no estimate to shed on, it waits (seed 003's queue) until its deadline
    with pytest.raises(Rejected) as e:
        await adm.acquire(lambda: [cand("burning", temp=90)], RouteContext("chat"), "standard", 0.05)
    assert "became free within" in str(e.value)
    # the baselines never shed early
    ll = Admission(make("least-loaded", cfg()), queue_size=4, shed_early=True)
    b2 = cand("b2", in_flight=1, ttft=5, tpot=0.5)
    with pytest.raises(Rejected) as e:
        await ll.acquire(lambda: [b2], RouteContext("chat", max_tokens=10), "standard", 0.05)
    assert "became free within" in str(e.value)


async def test_a_deadline_the_healthy_replicas_cannot_meet_is_served_by_a_critical_one_not_refused():
    p = make("gpu-aware", cfg())
    adm = Admission(p, queue_size=4)
    busy = cand("busy", in_flight=1, ttft=5, tpot=0.5)           # the healthy replica: busy for ~10 s
    full = cand("full", used_gib=79)                             # critical memory, idle
    slot = await adm.acquire(lambda: [busy, full], RouteContext("chat", max_tokens=10), "standard", 2)
    assert slot.candidate is full and "risky replica" in slot.why and slot.waited == 0
    # with time enough to wait, it waits for the healthy one instead
    t = asyncio.create_task(adm.acquire(lambda: [busy, cand("full2", used_gib=79)],
                                        RouteContext("chat", max_tokens=10), "standard", 60))
    await asyncio.sleep(0.02)
    assert not t.done()
    busy.stats.in_flight = 0
    adm.kick()
    assert (await t).candidate is busy
    # round-robin and least-loaded route as before: the critical GPU is just another replica to them
    ll = Admission(make("least-loaded", cfg()), queue_size=4)
    assert (await ll.acquire(lambda: [cand("b", in_flight=1), cand("f", used_gib=79)], RouteContext("chat"),
                             "standard", 2)).candidate.key == "chat/f"


async def test_a_queue_behind_the_head_puts_an_idle_critical_replica_to_work():
    """The bench's saturated run (docs/gateway.md): the sound replicas busy, a queue building, and a critical
    replica left idle while every waiting request in turn preferred waiting for a sound slot. Counting the
    queue behind, the head of a long queue takes the critical replica."""
    p = make("gpu-aware", cfg())
    adm = Admission(p, queue_size=16)
    busy = cand("busy", in_flight=1, ttft=0.5, tpot=0.05)       # 1 s per request
    full = cand("full", used_gib=79, ttft=0.5, tpot=0.05)       # critical: 4 s expected
    full.stats.in_flight = 1                                      # busy too for now
    waiters = [asyncio.create_task(adm.acquire(lambda: [busy, full], RouteContext("chat", max_tokens=10),
                                               "standard", 600)) for _ in range(5)]
    await asyncio.sleep(0.02)
    assert adm.depth("chat") == 5 and not any(t.done() for t in waiters)
    full.stats.in_flight = 0                                      # the critical replica frees; 4 behind the head
    adm.kick()
    # the head's wake-up takes a few turns of the loop (a stalled process can let a fixed sleep end first)
    await asyncio.wait([waiters[0]], timeout=30)
    assert waiters[0].done() and (await waiters[0]).candidate is full
    assert "queued behind" in (await waiters[0]).why
    # the next head has 3 behind: 2 s + 3 s > 4 s would take it too, but the critical replica is busy now
    assert adm.depth("chat") == 4
    for t in waiters[1:]:
        t.cancel()
    await asyncio.gather(*waiters[1:], return_exceptions=True)


async def test_a_retry_goes_first_in_its_priority_class():
    """A request retried after its replica failed (or a broken stream's continuation) was admitted before
    the requests waiting now: it goes before them in its class, still after a better class."""
    p = make("least-loaded", cfg())
    adm = Admission(p, queue_size=8)
    busy = cand("busy", in_flight=1)
    order = []

    async def one(name, prio, first=False):
        slot = await adm.acquire(lambda: [busy], RouteContext("chat"), prio, 60, first_in_class=first)
        order.append(name)
        slot.release()
    tasks = [asyncio.create_task(one("standard-1", "standard"))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(one("standard-2", "standard")))
    tasks.append(asyncio.create_task(one("critical", "critical")))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(one("retry-1", "standard", True)))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(one("retry-2", "standard", True)))
    await asyncio.sleep(0.01)
    assert adm.depth("chat") == 5
    busy.stats.in_flight = 0
    busy.stats.starts.clear()
    adm.kick()
    await asyncio.gather(*tasks)
    assert order == ["critical", "retry-1", "retry-2", "standard-1", "standard-2"]


async def test_admission_waits_for_the_fleet_to_change():
    p = make("gpu-aware", cfg())
    hot = cand("hot", temp=90)
    adm = Admission(p, queue_size=4)
    t = asyncio.create_task(adm.acquire(lambda: [hot], RouteContext("chat"), "standard", 30))
    await asyncio.sleep(0.02)
    assert not t.done()
    hot.thermal = "normal"            # the next telemetry: the GPU cooled
    adm.kick()
    slot = await t
    assert slot.candidate is hot and slot.waited > 0


@pytest.mark.parametrize("policy", ["least-loaded", "gpu-aware"])
async def test_a_retry_waiting_at_the_head_does_not_keep_the_replica_it_excluded_idle(policy):
    """A request failed on `a` (a 5xx: a's circuit stays closed) and waits first in its class for another
    replica; `b` is busy. A request arriving behind it must get `a`, which the retry will not take, rather
    than wait with it for `b` (work conservation: nothing waits while a sound replica has a free slot)."""
    adm = Admission(make(policy, cfg()), queue_size=8)
    a, b = cand("a"), cand("b", in_flight=1)
    retry = asyncio.create_task(adm.acquire(lambda: [a, b], RouteContext("chat", exclude=frozenset({a.key})),
                                            "standard", 60, first_in_class=True))
    await asyncio.sleep(0)
    assert adm.depth("chat") == 1 and not retry.done()
    slot = await adm.acquire(lambda: [a, b], RouteContext("chat"), "standard", 0.5)   # Rejected if it waits
    assert slot.candidate is a and a.stats.in_flight == 1 and adm.depth("chat") == 1
    # and after a release: a freed `a` goes to the next request behind the retry, `b` still to the retry
    later = asyncio.create_task(adm.acquire(lambda: [a, b], RouteContext("chat"), "standard", 60))
    await asyncio.sleep(0)
    assert adm.depth("chat") == 2
    slot.release()
    assert (await asyncio.wait_for(later, 5)).candidate is a
    b.stats.in_flight = 0
    b.stats.starts.clear()
    adm.kick()
    assert (await asyncio.wait_for(retry, 5)).candidate is b

"""The gateway's routing pieces without a cluster: GPU levels, the gpu-aware score and its filters, the
baselines, prefix affinity with its load bound, the circuit breaker, and admission (slots, priority queue,
queue bound, deadline, client gone)."""

from __future__ import annotations

import asyncio
import random

import pytest

from controlplane.gateway.admission import Admission, Rejected
from controlplane.gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from controlplane.gateway.config import GatewayConfig
from controlplane.gateway.policy import Candidate, RouteContext, affinity_key, gpu_levels, make
from controlplane.gateway.stats import ReplicaStats
from controlplane.gateway.view import GpuInfo, ReplicaInfo
from mesh import config

GIB = 1 << 30


def cfg(**kw) -> GatewayConfig:
    env = {"MESH_GATEWAY_INSECURE": "1"}
    env.update({f"MESH_GATEWAY_{k.upper()}": str(v) for k, v in kw.items()})
    return config.load(GatewayConfig, None, environ=env)


def cand(name: str, *, used_gib: float = 10, temp: float = 40, in_flight: int = 0, limit: int = 1,
         ttft: float | None = None, tpot: float | None = None, waiting=None, kv=None, ready=True, c=None,
         clock=None) -> Candidate:
    c = c or cfg()
    g = GpuInfo(name, 0, int(used_gib * GIB), 80 * GIB, 0, temp, 0, False, True, True)
    r = ReplicaInfo(name, "chat", f"127.0.0.1:{abs(hash(name)) % 60000}", ready, (name, 0), "llama.cpp", 1,
                    None, waiting, kv)
    s = ReplicaStats(CircuitBreaker(c.breaker_failures, c.breaker_open_seconds,
                                    **({"clock": clock} if clock else {})), c.ema_alpha, ttft, tpot, in_flight)
    p, t = gpu_levels(g, c.pressure_limits, c.thermal_limits)
    return Candidate(r, s, g, limit, p, t)


def test_levels_follow_seed_003_bands():
    c = cfg()
    levels = [gpu_levels(GpuInfo("n", 0, int(pct * 0.8 * GIB), 80 * GIB, 0, temp, 0, False, True, True),
                         c.pressure_limits, c.thermal_limits) for pct, temp in
              ((49, 64), (50, 65), (70, 80), (71, 81), (85, 85), (86, 86))]
    assert levels == [("low", "normal"), ("normal", "warning"), ("normal", "warning"), ("high", "throttling"),
                      ("high", "throttling"), ("critical", "critical")]
    # configurable
    c = cfg(memory_pressure_pct="10,20,30", thermal_c="30,40,50")
    assert gpu_levels(GpuInfo("n", 0, 25 * GIB, 80 * GIB, 0, 45, 0, False, True, True), c.pressure_limits,
                      c.thermal_limits) == ("critical", "throttling")
    assert gpu_levels(None, c.pressure_limits, c.thermal_limits) == ("low", "normal")


def test_gpu_aware_skips_critical_and_throttling_and_prefers_cool_idle_fast():
    p = make("gpu-aware", cfg(), random.Random(1))
    ctx = RouteContext("chat")
    hot, full, ok = cand("hot", temp=84), cand("full", used_gib=79), cand("ok")
    assert p.pick([hot, full, ok], ctx)[0] is ok
    assert p.pick([hot, full], ctx)[0] is None           # nothing healthy: the request waits
    # warmer and fuller rank lower, but are still used
    warm, cool = cand("warm", temp=70, used_gib=60), cand("cool")
    assert p.pick([warm, cool], ctx)[0] is cool
    assert p.pick([warm], ctx)[0] is warm
    # latency: the replica with the lower EMA time to first token + per token wins
    slow, fast = cand("slow", ttft=0.5, tpot=0.05), cand("fast", ttft=0.1, tpot=0.02)
    assert p.pick([slow, fast], ctx)[0] is fast
    # a busy replica (no free slot) is never picked; a vLLM-like one with slots left is
    busy, roomy = cand("busy", in_flight=1), cand("roomy", in_flight=3, limit=8)
    assert p.pick([busy, roomy], ctx)[0] is roomy
    # the backend's own queue and KV use count when reported
    queued, empty = cand("queued", limit=8, waiting=6, kv=0.9), cand("empty", limit=8, waiting=0, kv=0.1)
    assert p.pick([queued, empty], ctx)[0] is empty
    # excluded (the retry's first replica) and not-ready replicas are skipped
    assert p.pick([ok, cand("other")], RouteContext("chat", exclude=frozenset({ok.key})))[0].key == "chat/other"
    assert p.pick([cand("starting", ready=False)], ctx)[0] is None


def test_weights_are_configuration():
    # with the thermal weight at 0 and latency dominant, a warm but fast replica beats a cool slow one
    p = make("gpu-aware", cfg(weight_thermal=0, weight_latency=5), random.Random(1))
    warm_fast, cool_slow = cand("wf", temp=75, ttft=0.1, tpot=0.01), cand("cs", temp=30, ttft=1.0, tpot=0.1)
    assert p.pick([warm_fast, cool_slow], RouteContext("chat"))[0] is warm_fast
    p = make("gpu-aware", cfg(weight_thermal=5, weight_latency=0), random.Random(1))
    assert p.pick([warm_fast, cool_slow], RouteContext("chat"))[0] is cool_slow


def test_baselines_ignore_gpu_state():
    hot, cool = cand("a-hot", temp=88), cand("b-cool")
    rr = make("round-robin", cfg())
    picks = [rr.pick([hot, cool], RouteContext("chat"))[0].key for _ in range(4)]
    assert picks == ["chat/a-hot", "chat/b-cool", "chat/a-hot", "chat/b-cool"]
    ll = make("least-loaded", cfg())
    x, y = cand("x", limit=4, in_flight=2, temp=88), cand("y", limit=4, in_flight=3)
    assert ll.pick([x, y], RouteContext("chat"))[0] is x
    with pytest.raises(ValueError, match="gpu-aware"):
        make("random", cfg())


def test_prefix_affinity_with_a_load_bound():
    p = make("gpu-aware", cfg(), random.Random(3))
    body = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "next"}]}
    key = affinity_key("team-a", body, 256)
    assert key == affinity_key("team-a", {**body, "messages": body["messages"][:3] + [
        {"role": "user", "content": "something else"}]}, 256)                      # same conversation prefix
    assert key != affinity_key("team-b", body, 256)                                   # per tenant
    a, b, c = (cand(n, limit=4) for n in "abc")
    first = p.pick([a, b, c], RouteContext("chat", key))[0]
    # the same conversation returns to its replica even when another scores a little better
    first.stats.in_flight = 1
    assert p.pick([a, b, c], RouteContext("chat", key)) == (first, "prefix affinity")
    # ... unless it is loaded beyond the bound: power of two choices among the others
    first.stats.in_flight = 3
    chosen, why = p.pick([a, b, c], RouteContext("chat", key))
    assert chosen is not first and "power of two" in why


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

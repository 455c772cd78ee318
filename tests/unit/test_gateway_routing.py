"""The gateway's routing pieces without a cluster: GPU levels, the gpu-aware score and its filters, the
baselines, prefix affinity with its load bound (the circuit breaker and admission: test_gateway_admission.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from controlplane.gateway.admission import Admission
from controlplane.gateway.breaker import CircuitBreaker
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


def test_gpu_aware_skips_critical_but_only_penalizes_throttling():
    p = make("gpu-aware", cfg(), random.Random(1))
    ctx = RouteContext("chat")
    hot, full, ok = cand("hot", temp=84), cand("full", used_gib=79), cand("ok")
    assert hot.thermal == "throttling" and full.pressure == "critical"
    assert p.pick([hot, full, ok], ctx)[0] is ok                # the cool one is expected to finish first
    assert p.pick([hot, full], ctx)[0] is hot                   # throttling: slower, still used
    ok.stats.in_flight = 1                                      # the cool one is busy: the hot one serves
    assert p.pick([hot, full, ok], ctx)[0] is hot
    assert p.pick([full], ctx)[0] is None                       # critical alone: the request waits
    assert p.pick([cand("burning", temp=90)], ctx)[0] is None
    # warmer and fuller (not critical) rank lower, but are still used
    warm, cool = cand("warm", temp=70, used_gib=60), cand("cool", used_gib=45)
    assert p.pick([warm, cool], ctx)[0] is cool and p.pick([warm], ctx)[0] is warm
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


def test_a_throttled_replicas_slowdown_counts_once():
    from controlplane.gateway import cost
    c = cfg()
    p = make("gpu-aware", c, random.Random(1))
    ctx = RouteContext("chat", max_tokens=10)
    # table: (replica, expected service seconds for 10 tokens). Measured replicas count as measured: the hot
    # one measured at 1.0 s is 1.0 s (its EMA was taken while throttled: no 0.85 factor on top); measured at
    # 1/0.85 s it is that, once. An unmeasured hot replica borrows the pool's median / 0.85.
    hot_same, cool = cand("hot", temp=84, ttft=0.5, tpot=0.05), cand("cool", ttft=0.5, tpot=0.05)
    hot_slow = cand("hot-slow", temp=84, ttft=0.5 / 0.85, tpot=0.05 / 0.85)
    hot_new, cool_new = cand("hot-new", temp=84), cand("cool-new")
    pool = [hot_same, cool, hot_slow, hot_new, cool_new]
    table = [(cool, 1.0), (hot_same, 1.0), (hot_slow, 1 / 0.85), (hot_new, 1.0 / 0.85), (cool_new, 1.0)]
    for cnd, want in table:
        assert cost.service_time(cnd, 10, pool, c) == pytest.approx(want), cnd.key
    # the throttle speed is configuration (for unmeasured replicas only)
    assert cost.service_time(cand("h", temp=84), 10, [cand("m", ttft=0.5, tpot=0.05)],
                             cfg(throttle_speed=0.5)) == pytest.approx(2.0)
    # vLLM-like slots: the cool replica with half its slots taken (ECT 1.5 s) loses to the idle hot one
    # measured at 1/0.85 s (1.18 s); with one taken (1.125 s) the cool one wins
    hot_slow.limit = cool.limit = 8
    cool.stats.in_flight = 4
    assert p.pick([hot_slow, cool], ctx)[0] is hot_slow
    cool.stats.in_flight = 1
    assert p.pick([hot_slow, cool], ctx)[0] is cool
    # the first-token estimate is the measured EMA, not divided by the speed again
    assert p.first_token([hot_slow]) == pytest.approx(0.5 / 0.85)


def test_work_conserving_a_sound_idle_replica_is_never_left_unused():
    p = make("gpu-aware", cfg(), random.Random(1))
    ctx = RouteContext("chat", max_tokens=10)
    # table: (replicas, the one that must be picked). Whatever the others' speed, a request goes to a free
    # sound replica when one exists, even a slow one (the fast ones are busy), even a hot one.
    rows = [
        (lambda: [cand("fast", ttft=0.1, tpot=0.01, in_flight=1), cand("slow", ttft=2, tpot=0.5)], "chat/slow"),
        (lambda: [cand("cool", ttft=0.5, tpot=0.05, in_flight=1), cand("hot", temp=84, ttft=1, tpot=0.1)], "chat/hot"),
        (lambda: [cand("a", ttft=0.5, tpot=0.05, in_flight=1), cand("b", ttft=0.5, tpot=0.05, in_flight=1),
                  cand("c", ttft=5, tpot=0.5)], "chat/c"),
        # among free ones, the lowest expected completion time
        (lambda: [cand("slow", ttft=2, tpot=0.5), cand("fast", ttft=0.1, tpot=0.01)], "chat/fast"),
    ]
    for make_cands, want in rows:
        chosen, why = p.pick(make_cands(), ctx)
        assert chosen is not None and chosen.key == want, (want, why)
    # a bench run's trace: the fast sound replica busy, a critical one (x4 risk on at least the fast one's 0.8 s:
    # 3.2 s) and a hot sound one (measured 4 s) free. It must not wait for the busy fast one while the hot one
    # idles; the lowest expected completion among the free ones serves
    chosen, why = p.pick([cand("fast", ttft=0.4, tpot=0.04, in_flight=1), cand("hot", temp=84, ttft=2, tpot=0.2),
                          cand("full", used_gib=79, ttft=0.3, tpot=0.03)], ctx)
    assert chosen is not None and chosen.key == "chat/full", why
    chosen, why = p.pick([cand("fast", ttft=0.4, tpot=0.04, in_flight=1), cand("hot", temp=84, ttft=0.5, tpot=0.05),
                          cand("full", used_gib=79, ttft=0.3, tpot=0.03)], ctx)
    assert chosen is not None and chosen.key == "chat/hot", why
    # in admission: with a sound replica free nothing waits in the queue
    adm = Admission(p, queue_size=4)
    free_slow = cand("slow", ttft=2, tpot=0.5)

    async def go():
        return await adm.acquire(lambda: [cand("busy", in_flight=1, ttft=0.1, tpot=0.01), free_slow],
                                 RouteContext("chat", max_tokens=10), "standard", 30)
    slot = asyncio.run(go())
    assert slot.candidate is free_slow and slot.waited == 0


def test_a_critical_or_failing_replica_is_avoided_only_when_waiting_is_better():
    import time as _t
    p = make("gpu-aware", cfg(), random.Random(1))
    far = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 600)
    # the sound replica is busy, ~1 s per request; a critical one (risk x4, so 4 s expected) is free
    busy = cand("busy", in_flight=1, ttft=0.5, tpot=0.05)
    full = cand("full", used_gib=79, ttft=0.5, tpot=0.05)
    assert full.pressure == "critical"
    # waiting: ~1 s for the slot + 1 s = 2 s, better than 4 s there: it waits
    chosen, why = p.pick([busy, full], far)
    assert chosen is None and "expected wait 1.0s" in why
    # three queued ahead: waiting (4 s + 1 s) is worse than the critical replica's 4 s: it serves
    deep = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 600, ahead=3)
    chosen, why = p.pick([busy, full], deep)
    assert chosen is full and "risky replica" in why
    # requests queued behind it: leaving the critical replica idle delays each of them one slot-interval (1 s);
    # one behind: 2 s + 1 s < 4 s, it still waits; three behind: 2 s + 3 s > 4 s, the critical one serves
    one = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 600, behind=1)
    assert p.pick([busy, full], one)[0] is None
    three = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 600, behind=3)
    chosen, why = p.pick([busy, full], three)
    assert chosen is full and "3 queued behind" in why
    # a GPU at critical temperature the same way (its EMA, measured before it heated, does not show it)
    burning_fast = cand("burning-fast", temp=90, ttft=0.5, tpot=0.05)
    assert burning_fast.thermal == "critical"
    assert p.pick([busy, burning_fast], far)[0] is None and p.pick([busy, burning_fast], deep)[0] is burning_fast
    # a failing replica the same way: recent failures weigh (1 + 2 x 3/5 = x2.2) against waiting
    failing = cand("failing", ttft=0.5, tpot=0.05)
    failing.stats.recent_failures = 3.0
    assert p.pick([busy, failing], far)[0] is None
    assert p.pick([busy, failing], deep)[0] is failing
    # a wait past the deadline: the critical one serves
    near = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 0.5)
    assert p.pick([busy, full], near)[0] is full
    # a risky replica is not assumed faster than the sound ones (its EMA predates its GPU's state): a critical
    # one measured 10x faster than the busy sound one still waits for it with nothing queued
    slow_busy = cand("slowbusy", in_flight=1, ttft=5, tpot=0.5)
    assert p.pick([slow_busy, full], far)[0] is None
    # off by configuration: a critical GPU is never used while a sound one exists
    assert make("gpu-aware", cfg(critical_overflow=False)).pick([busy, full], near)[0] is None
    # every GPU critical: the request waits (seed 003's queue), no estimate
    burning = cand("burning", temp=90)
    assert p.pick([burning, full], far)[0] is None
    assert p.expected_wait([burning, full], far) == float("inf")
    # a failing replica alone (GPU sound) is used: nothing better to wait for
    lone = cand("lone")
    lone.stats.recent_failures = 3
    assert p.pick([lone], far)[0] is lone
    # baselines cannot tell
    assert make("least-loaded", cfg()).expected_wait([busy, full], near) is None


def test_a_long_running_request_tells_a_stale_ema():
    import time as _t
    from controlplane.gateway import cost
    c = cfg()
    p = make("gpu-aware", c, random.Random(1))
    busy = cand("busy", in_flight=1, ttft=0.5, tpot=0.05)           # EMA: 1 s per request
    full = cand("full", used_gib=79, ttft=0.5, tpot=0.05)
    assert cost.service_time(busy, 10, [busy, full], c) == pytest.approx(1.0)
    # its request has run 20 s (the machine slowed down): the replica is at least that slow now
    started = _t.monotonic() - 20
    busy.stats.starts.append(started)
    got = cost.service_time(busy, 10, [busy, full], c)
    assert 20.0 <= got <= _t.monotonic() - started          # its age when asked (a paused machine adds to it)
    # so a request with 10 s left to its deadline no longer waits for it: the critical one serves
    ctx = RouteContext("chat", max_tokens=10, deadline_at=_t.monotonic() + 10)
    chosen, why = p.pick([busy, full], ctx)
    assert chosen is full and "exceeds" in why
    # admission keeps the start times with the slots
    adm = Admission(p, queue_size=4)
    a = cand("a")

    async def go():
        s1 = await adm.acquire(lambda: [a], RouteContext("chat"), "standard", 1)
        assert len(a.stats.starts) == 1 and a.stats.oldest_age() >= 0
        s1.release()
        assert not a.stats.starts and a.stats.oldest_age() == 0.0
    asyncio.run(go())


def test_recent_failures_fade_with_time_and_successes():
    now = [0.0]
    s = ReplicaStats(CircuitBreaker(3, 2, clock=lambda: now[0]), half_life=10.0, clock=lambda: now[0])
    s.failed()
    s.failed()
    assert s.recent_failures == pytest.approx(2.0)
    now[0] = 10.0
    assert s.recent_failures == pytest.approx(1.0)          # one half-life later
    s.ok()
    assert s.recent_failures == pytest.approx(0.5)          # and halved on a success
    now[0] = 100.0
    assert s.recent_failures == 0.0


def test_weights_are_configuration():
    # an unmeasured hot replica takes the measured median (1.05 s): with the thermal weight at 0 it beats a
    # cool one measured at 1.1 s, with weight 1 (1.05 / 0.85 = 1.24 s) it does not
    ctx = RouteContext("chat", max_tokens=10)
    fast_busy, cool_slow = cand("fb", ttft=0.5, tpot=0.05, in_flight=1), cand("cs", ttft=0.6, tpot=0.05)
    hot_new = cand("hn", temp=84)
    p = make("gpu-aware", cfg(weight_thermal=0), random.Random(1))
    assert p.pick([fast_busy, cool_slow, hot_new], ctx)[0] is hot_new
    p = make("gpu-aware", cfg(weight_thermal=1), random.Random(1))
    assert p.pick([fast_busy, cool_slow, hot_new], ctx)[0] is cool_slow
    # latency ignored: the busier (by in-flight share) loses whatever its speed
    p = make("gpu-aware", cfg(weight_latency=0), random.Random(1))
    a, b = cand("a", limit=4, in_flight=1, ttft=0.1), cand("b", limit=4, in_flight=2, ttft=0.01)
    assert p.pick([a, b], RouteContext("chat"))[0] is a
    # recent failures and high memory pressure weigh by their weights
    f, g = cand("f", ttft=1.0), cand("g", ttft=1.2)
    f.stats.recent_failures = 1
    assert make("gpu-aware", cfg(), random.Random(1)).pick([f, g], RouteContext("chat"))[0] is g
    assert make("gpu-aware", cfg(weight_failures=0), random.Random(1)).pick([f, g], RouteContext("chat"))[0] is f
    hi, lo = cand("hi", used_gib=64, ttft=1.0), cand("lo", ttft=1.2)
    assert hi.pressure == "high"
    assert make("gpu-aware", cfg(weight_pressure=1), random.Random(1)).pick([hi, lo], RouteContext("chat"))[0] is lo
    assert make("gpu-aware", cfg(weight_pressure=0), random.Random(1)).pick([hi, lo], RouteContext("chat"))[0] is hi


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

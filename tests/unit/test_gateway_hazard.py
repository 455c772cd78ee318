"""The observed failure risk per GPU state (controlplane/gateway/hazard.py) and how gpu-aware prices a risky
replica with it (cost.py, risk_pricing observed) against the fixed pricing it replaces."""

from __future__ import annotations

import random
import time

import pytest

from controlplane.gateway import cost
from controlplane.gateway.breaker import CircuitBreaker
from controlplane.gateway.hazard import HazardBook
from controlplane.gateway.policy import Candidate, RouteContext, gpu_levels, make
from controlplane.gateway.stats import ReplicaStats, StatsTable
from controlplane.gateway.view import GpuInfo
from mesh.config import ConfigError
from tests.unit.test_gateway_routing import GIB, cand, cfg

CRIT = "memory-critical"


@pytest.fixture(autouse=True)
def frozen_evidence_clock(monkeypatch):
    """The books made without a clock (StatsTable's, the candidates') see time stand still: the counts halve
    every 300 s of the real clock, which on a loaded machine moved a figure between two reads."""
    prior, half_life, _ = HazardBook.__init__.__defaults__
    monkeypatch.setattr(HazardBook.__init__, "__defaults__", (prior, half_life, lambda: 0.0))


def far(**kw) -> RouteContext:
    return RouteContext("chat", max_tokens=10, deadline_at=time.monotonic() + 600, **kw)


def record(c: Candidate, outcomes) -> None:
    """Requests sent to c in its GPU's current state, each served (False) or failed (True), as the gateway
    records them."""
    for failed in outcomes:
        if failed:
            c.stats.failed(False, c.risk_state)
        else:
            c.stats.ok(c.risk_state)


def with_gpu(c: Candidate, *, used_gib: float = 10, temp: float = 40) -> Candidate:
    """The same replica (same stats) seen again after its GPU's reading changed."""
    conf = cfg()
    g = GpuInfo(c.gpu.node, 0, int(used_gib * GIB), 80 * GIB, 0, temp, 0, False, True, True)
    p, t = gpu_levels(g, conf.pressure_limits, conf.thermal_limits)
    return Candidate(c.replica, c.stats, g, c.limit, p, t)


def test_the_estimate_converges_to_the_observed_rate():
    now = [0.0]
    book = HazardBook(prior_requests=3, half_life=300, clock=lambda: now[0])
    own: dict = {}
    assert book.estimate(own, CRIT, 1.0) == 1.0                # no evidence: the prior
    rng = random.Random(7)
    outcomes = [rng.random() < 0.2 for _ in range(3000)]
    for i, failed in enumerate(outcomes):
        now[0] = i * 0.01                                       # 30 s in all: a tenth of a half-life
        book.record(own, CRIT, failed)
    observed = sum(outcomes) / len(outcomes)
    assert book.estimate(own, CRIT, 1.0) == pytest.approx(observed, abs=0.01)
    assert abs(observed - 0.2) < 0.03
    # the same from a prior of 0: the evidence, not the prior, decides
    own0: dict = {}
    for failed in outcomes:
        book.record(own0, "memory-high", failed)
    assert book.estimate(own0, "memory-high", 0.0) == pytest.approx(observed, abs=0.01)
    # a steady rate is still found when the counts decay (many requests per half-life)
    now[0], own1 = 0.0, {}
    fast = HazardBook(prior_requests=3, half_life=20, clock=lambda: now[0])
    for i, failed in enumerate(outcomes):
        now[0] = i * 0.1                                        # 300 s: 15 half-lives
        fast.record(own1, CRIT, failed)
    assert fast.estimate(own1, CRIT, 1.0) == pytest.approx(0.2, abs=0.07)


def test_without_evidence_the_estimate_returns_to_the_prior():
    now = [0.0]
    book = HazardBook(prior_requests=3, half_life=60, clock=lambda: now[0])
    own: dict = {}
    for _ in range(30):
        book.record(own, CRIT, False)
    assert book.estimate(own, CRIT, 1.0) == pytest.approx(3 / 33)
    now[0] = 60.0                                               # one half-life: 15 requests' worth left
    assert book.estimate(own, CRIT, 1.0) == pytest.approx(3 / 18)
    now[0] = 6000.0
    assert book.estimate(own, CRIT, 1.0) == pytest.approx(1.0)
    assert book.evidence(own) == {CRIT: {"requests": 0.0, "failures": 0.0}}
    with pytest.raises(ValueError):
        HazardBook(prior_requests=0)


def test_a_fresh_gateway_prices_as_the_fixed_rule():
    observed, fixed = cfg(), cfg(risk_pricing="fixed")
    assert observed.risk_pricing == "observed"                  # the default
    states = [dict(), dict(used_gib=64), dict(used_gib=79), dict(temp=84), dict(temp=90),
              dict(used_gib=79, temp=90), dict(used_gib=64, temp=90)]
    for kw in states:
        c = cand("x", ttft=0.5, tpot=0.05, **kw)
        assert cost.risk(c, observed) == pytest.approx(cost.risk(c, fixed)), kw
        assert cost.state_risk(c, observed) == pytest.approx(cost.fixed_risk(c.pressure, c.thermal))
    assert cost.risk(cand("full", used_gib=79), observed) == pytest.approx(4.0)      # today's x4
    assert cost.risk(cand("high", used_gib=64), observed) == pytest.approx(1.25)
    # and so picks as it did, in the situations the routing tests use
    scenes = [
        (lambda: [cand("busy", in_flight=1, ttft=0.5, tpot=0.05), cand("full", used_gib=79, ttft=0.5, tpot=0.05)],
         far()),
        (lambda: [cand("busy", in_flight=1, ttft=0.5, tpot=0.05), cand("full", used_gib=79, ttft=0.5, tpot=0.05)],
         far(ahead=3)),
        (lambda: [cand("busy", in_flight=1, ttft=0.5, tpot=0.05), cand("full", used_gib=79, ttft=0.5, tpot=0.05)],
         far(behind=1)),
        (lambda: [cand("busy", in_flight=1, ttft=0.5, tpot=0.05), cand("burn", temp=90, ttft=0.5, tpot=0.05)],
         far(ahead=3)),
        (lambda: [cand("hi", used_gib=64, ttft=1.0), cand("lo", ttft=1.2)], RouteContext("chat")),
        (lambda: [cand("fast", ttft=0.4, tpot=0.04, in_flight=1), cand("hot", temp=84, ttft=2, tpot=0.2),
                  cand("full", used_gib=79, ttft=0.3, tpot=0.03)], RouteContext("chat", max_tokens=10)),
    ]
    for scene, ctx in scenes:
        a = make("gpu-aware", observed, random.Random(1)).pick(scene(), ctx)[0]
        b = make("gpu-aware", fixed, random.Random(1)).pick(scene(), ctx)[0]
        assert (a and a.key) == (b and b.key)


def test_a_critical_replica_that_does_not_fail_gets_used_when_the_sound_one_is_busy():
    p = make("gpu-aware", cfg(), random.Random(1))
    busy = cand("busy", in_flight=1, ttft=0.5, tpot=0.05)      # sound, ~1 s per request, busy
    full = cand("full", used_gib=79, ttft=0.5, tpot=0.05)      # critical memory, free
    assert p.pick([busy, full], far())[0] is None              # fresh: 4 s there vs 2 s waiting: it waits
    record(full, [False] * 20)                                 # 20 requests served there, none failed
    assert full.stats.failure_probability(CRIT, 1.0) == pytest.approx(3 / 23)
    chosen, why = p.pick([busy, full], far())
    assert chosen is full and "state risk 0.39" in why         # 1 s x (1 + 3 x 3/23) < 2 s waiting
    # the fixed rule, on the same evidence, keeps it idle
    assert make("gpu-aware", cfg(risk_pricing="fixed"), random.Random(1)).pick([busy, full], far())[0] is None


def test_a_critical_replica_that_keeps_failing_is_avoided():
    p = make("gpu-aware", cfg(), random.Random(1))
    busy = cand("busy", in_flight=1, ttft=0.5, tpot=0.05)
    full = cand("full", used_gib=79, ttft=0.5, tpot=0.05)
    record(full, [i % 2 == 0 for i in range(20)])             # every other request failed
    full.stats.recent_failures = 0.0                           # the short-memory term aside: the estimate alone
    assert full.stats.failure_probability(CRIT, 1.0) == pytest.approx(13 / 23)
    assert p.pick([busy, full], far())[0] is None              # 1 s x (1 + 3 x 13/23) = 2.7 s > 2 s waiting
    # the same GPU state, the same wait: a replica that served its 20 cleanly is used
    clean = cand("clean", used_gib=79, ttft=0.5, tpot=0.05)
    record(clean, [False] * 20)
    assert p.pick([busy, clean], far())[0] is clean
    # both free: the clean one serves, the failing one stays idle
    chosen, _ = p.pick([busy, full, clean], far())
    assert chosen is clean
    # and with the failures' short-memory term back (as the gateway keeps it), the failing one is worse still
    full.stats.failed(False, CRIT)
    assert cost.risk(full, cfg()) > 1 + 3 * 13 / 23
    # failing every request: priced as a certain failure (the prior's x4), no worse
    worst = cand("worst", used_gib=79, ttft=0.5, tpot=0.05)
    record(worst, [True, False, True] * 7)
    record(worst, [True] * 20)
    assert cost.state_risk(worst, cfg()) == pytest.approx(3 * (3 + 34) / (3 + 41))
    assert cost.state_risk(worst, cfg()) <= 3.0


def test_the_other_replicas_in_the_same_state_inform_a_new_one():
    table = StatsTable()
    a = cand("a", used_gib=64)                                  # memory-high: prior 0.25 / 3 per request
    a.stats = table.of("a")
    b = cand("b", used_gib=64)
    b.stats = table.of("b")
    prior = 0.25 / 3
    assert b.stats.failure_probability("memory-high", prior) == pytest.approx(prior)
    record(a, [True, False] * 10)                               # a fails half its requests
    pa = a.stats.failure_probability("memory-high", prior)
    pb = b.stats.failure_probability("memory-high", prior)
    # b has seen nothing: it takes the others' rate (shrunk toward the prior); a its own (shrunk toward b's)
    others_of_b = (3 * prior + 10) / (3 + 20)
    assert pb == pytest.approx(others_of_b)
    assert prior < pb < 0.5 and pa == pytest.approx((3 * prior + 10) / 23)
    # a replica's own evidence is not counted twice (once as its own, once as the fleet's)
    assert pa == pytest.approx(pb)
    # the fleet keeps the evidence of a replica that went away
    table.forget_except({"b"})
    assert "a" not in table.by_replica
    assert b.stats.failure_probability("memory-high", prior) == pytest.approx(others_of_b)


def test_the_bookkeeping_survives_the_gpu_state_changing():
    table = StatsTable()
    x = cand("x", used_gib=79, ttft=0.5, tpot=0.05)
    x.stats = table.of("x")
    assert x.risk_state == CRIT
    record(x, [True, False, True, False, True])                  # failed 3 of 5 while critical
    p_crit = x.stats.failure_probability(CRIT, 1.0)
    # the GPU recovers: sound, no state risk, and its requests are not counted under any state
    ok = with_gpu(x, used_gib=10)
    assert ok.risk_state == "" and cost.state_risk(ok, cfg()) == 0.0
    record(ok, [False] * 10)
    assert set(x.stats.by_state) == {CRIT}
    # critical again: still known for what it did while critical
    again = with_gpu(x, used_gib=79)
    assert again.stats is x.stats and again.risk_state == CRIT
    assert again.stats.failure_probability(CRIT, 1.0) == pytest.approx(p_crit)
    assert cost.state_risk(again, cfg()) == pytest.approx(3 * p_crit)
    # another risky state is its own: critical temperature starts from its prior
    hot = with_gpu(x, used_gib=10, temp=90)
    assert hot.risk_state == "thermal-critical"
    assert cost.state_risk(hot, cfg()) == pytest.approx(3.0)
    record(hot, [False] * 7)
    assert set(x.stats.by_state) == {CRIT, "thermal-critical"}
    assert x.stats.failure_probability(CRIT, 1.0) == pytest.approx(p_crit)
    # both at once is a state of its own
    assert with_gpu(x, used_gib=79, temp=90).risk_state == "memory-critical+thermal-critical"


def test_the_pricing_options_are_validated():
    for kw, field in ((dict(risk_pricing="guess"), "risk_pricing"), (dict(failure_cost=0.5), "failure_cost"),
                      (dict(failure_prior_requests=0), "failure_prior_requests"),
                      (dict(failure_risk_half_life_seconds=0), "failure_risk_half_life_seconds")):
        with pytest.raises(ConfigError) as e:
            cfg(**kw)
        assert field in str(e.value)
    # below 3 the critical prior is capped at certain failure: a fresh critical GPU costs failure_cost more
    c = cand("full", used_gib=79)
    assert cost.state_risk(c, cfg(failure_cost=2)) == pytest.approx(2.0)
    assert cost.state_risk(cand("high", used_gib=64), cfg(failure_cost=2)) == pytest.approx(0.25)
    assert cost.state_risk(c, cfg(failure_cost=6)) == pytest.approx(3.0)


def test_replica_stats_made_alone_have_their_own_book():
    s = ReplicaStats(CircuitBreaker())
    s.ok(CRIT)
    s.failed(False, CRIT)
    s.ok("")                                                    # a sound request: not counted
    assert s.book.evidence(s.by_state) == {CRIT: {"requests": 2.0, "failures": 1.0}}
    assert s.served == 2 and s.failures == 1


async def test_the_gateway_counts_each_outcome_under_the_gpu_state_it_was_sent_in():
    """Through the real request path (fake backends over HTTP): a stream cut after 3 tokens counts as a
    failure of its replica under the GPU's state, its continuation and a clean stream as served."""
    import httpx

    from controlplane.gateway.app import create_app
    from controlplane.gateway.service import Gateway
    from tests.unit.test_gateway_resume import Fleet, events, serve, view

    fleet, servers = Fleet(cuts=1, after=3), []
    try:
        ports = []
        for name in ("a", "b"):
            server, task, port = await serve(fleet.app(name))
            servers.append((server, task))
            ports.append(port)
        gw = Gateway(cfg())
        gw.view.apply(view("llama.cpp", ports))
        for i in range(2):                                      # both GPUs at high memory pressure (80 %)
            gw.view.gpus[("n", i)] = GpuInfo("n", i, 64 * GIB, 80 * GIB, 0, 40, 0, False, True, True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw",
                                     timeout=30) as client:
            for _ in range(2):
                r = await client.post("/v1/completions", json={"model": "chat", "prompt": "Once", "max_tokens": 6,
                                                               "stream": True})
                assert r.status_code == 200 and not any("error" in e for e in events(r.text))
            status = (await client.get("/v1/gpu/status")).json()
            metrics = (await client.get("/metrics")).text
        await gw.http.aclose()
    finally:
        for server, task in servers:
            server.should_exit = True
            await task
    cut_on = fleet.seen[0][0]
    by_rep = {r["replica"]: r["by_gpu_state"] for m in status["models"] for r in m["replicas"]}
    assert by_rep[f"chat/chat-{'ab'.index(cut_on)}"]["memory-high"]["failures"] == pytest.approx(1.0)
    assert sum(s["memory-high"]["requests"] for s in by_rep.values()) == pytest.approx(3.0, abs=0.01)
    assert sum(s["memory-high"]["failures"] for s in by_rep.values()) == pytest.approx(1.0, abs=0.01)
    # what gpu-aware prices each replica by, in the status and as a metric: the pooled posterior mean
    prior = 0.25 / 3
    clean = next(r for r in by_rep.values() if r["memory-high"]["failures"] == 0)
    n = clean["memory-high"]["requests"]                    # its own: n served; the other's: 1 failed of 3 - n
    want = 3 * ((3 * prior + 1) / (3 + 3 - n)) / (3 + n)
    assert clean["memory-high"]["failure_probability"] == pytest.approx(want, abs=1e-3)
    line = next(x for x in metrics.splitlines() if x.startswith("gpumesh_gateway_state_failure_probability{")
                and f'replica="chat/chat-{"ab".index(cut_on)}"' in x)
    assert 'state="memory-high"' in line and float(line.split()[-1]) > prior
    fleet_ev = gw.stats.book.fleet["memory-high"]
    assert (round(fleet_ev.requests, 2), round(fleet_ev.failures, 2)) == (3.0, 1.0)

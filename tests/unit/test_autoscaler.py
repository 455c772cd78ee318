"""The autoscaling algorithm's rules (mesh/autoscale/autoscaler.py), one table row per rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mesh.autoscale import Autoscaler, Sample, ScalingPolicy, choose_variant


@dataclass
class Case:
    name: str
    policy: ScalingPolicy
    samples: list[Sample]
    now: float
    ready: int
    starting: int = 0
    kwargs: dict = field(default_factory=dict)
    want: int = 0
    mode: str = "stable"
    bound_by: str = ""
    reason_has: str = ""


def steady(value: float, t0: float, t1: float, step: float = 2.0, ready: int = 1, **extra) -> list[Sample]:
    """Samples of in-flight ``value`` every ``step`` s from t0 to t1 inclusive."""
    out, t = [], t0
    while t <= t1 + 1e-9:
        out.append(Sample(t=t, in_flight=value, request_rate=value, ready=ready, **extra))
        t += step
    return out


P = ScalingPolicy(min_replicas=1, max_replicas=20, target=2.0, stable_window_s=60, panic_window_s=6,
                  panic_threshold=2.0, scale_down_delay_s=0, max_scale_up_rate=10)

CASES = [
    Case("stable average over the window / target, rounded up", P, steady(5, 0, 60), 60, ready=3, want=3),
    Case("samples older than the stable window do not count", P,
         steady(40, 0, 20) + steady(4, 62, 120), 120, ready=2, want=2),
    Case("queue metric counts only waiting requests",
         ScalingPolicy(max_replicas=20, metric="queue", target=1.0, scale_down_delay_s=0),
         [Sample(t=t, in_flight=9, queue=3, request_rate=1) for t in range(0, 61, 2)], 60, ready=3, want=3),
    Case("kv_cache: mean use x ready replicas / per-replica target",
         ScalingPolicy(max_replicas=20, metric="kv_cache", target=0.5, scale_down_delay_s=0),
         [Sample(t=t, kv_cache=0.9, ready=2, request_rate=1) for t in range(0, 61, 2)], 60, ready=2, want=4),
    Case("ttft above the objective scales up by the ratio",
         ScalingPolicy(max_replicas=20, metric="ttft", target=500, scale_down_delay_s=0),
         [Sample(t=t, ttft_ms=1000, ready=2, request_rate=1) for t in range(0, 61, 2)], 60, ready=2, want=4,
         reason_has="objective"),
    Case("ttft within 10% of the objective holds",
         ScalingPolicy(max_replicas=20, metric="ttft", target=500, scale_down_delay_s=0),
         [Sample(t=t, ttft_ms=520, ready=3, request_rate=1) for t in range(0, 61, 2)], 60, ready=3, want=3,
         mode="hold"),
    Case("ttft unknown holds",
         ScalingPolicy(max_replicas=20, metric="ttft", target=500),
         [Sample(t=0, ttft_ms=0, request_rate=1)], 0, ready=2, want=2, mode="hold"),
    Case("panic: a burst in the panic window scales on the panic window", P,
         steady(2, 0, 52) + steady(30, 54, 60), 60, ready=1, want=10, mode="panic", bound_by="stabilization"),
    Case("panic counts the replicas starting: never fewer than running + starting", P,
         steady(2, 0, 52) + steady(9, 54, 60), 60, ready=2, starting=6, want=8, mode="panic"),
    Case("scale-up limited by max_scale_up_rate",
         ScalingPolicy(max_replicas=100, target=1.0, max_scale_up_rate=2.0, panic_threshold=1000,
                       scale_down_delay_s=0), steady(50, 0, 60), 60, ready=3, want=6, bound_by="stabilization"),
    Case("predictive raises desired to the forecast's upper quantile",
         ScalingPolicy(max_replicas=20, target=2.0, predictive=True, scale_down_delay_s=0),
         steady(2, 0, 60), 60, ready=1, kwargs={"forecast_upper": 9.0, "cold_start_s": 30}, want=5,
         mode="predictive", reason_has="forecast"),
    Case("a forecast is ignored when the policy is not predictive", P, steady(2, 0, 60), 60, ready=1,
         kwargs={"forecast_upper": 9.0}, want=1),
    Case("clamped to max_replicas", ScalingPolicy(max_replicas=4, target=1.0, panic_threshold=100,
                                                  scale_down_delay_s=0),
         steady(10, 0, 60), 60, ready=4, want=4, bound_by="max"),
    Case("clamped to min_replicas", ScalingPolicy(min_replicas=2, max_replicas=4, target=1.0,
                                                  scale_down_delay_s=0),
         steady(0, 0, 60), 60, ready=2, want=2, bound_by="min"),
    Case("the cost ceiling binds and says so",
         ScalingPolicy(max_replicas=20, target=1.0, cost_ceiling_per_hour=2.0, panic_threshold=100,
                       scale_down_delay_s=0),
         steady(8, 0, 60), 60, ready=8, kwargs={"replica_cost_per_hour": 0.6}, want=3, bound_by="cost_ceiling",
         reason_has="cost ceiling"),
    Case("the pool's room binds and says so",
         ScalingPolicy(max_replicas=20, target=1.0, panic_threshold=100, scale_down_delay_s=0),
         steady(8, 0, 60), 60, ready=2, starting=1, kwargs={"pool_room": 2}, want=5, bound_by="pool",
         reason_has="pool"),
    Case("scale to zero after the idle period",
         ScalingPolicy(min_replicas=0, max_replicas=4, target=1.0, scale_to_zero_after_s=30,
                       scale_down_delay_s=0),
         steady(1, 0, 10) + steady(0, 12, 60), 60, ready=1, want=0, mode="idle"),
    Case("one replica kept during the scale-to-zero grace",
         ScalingPolicy(min_replicas=0, max_replicas=4, target=1.0, scale_to_zero_after_s=120,
                       stable_window_s=20, scale_down_delay_s=0),
         steady(1, 0, 10) + steady(0, 12, 60), 60, ready=1, want=1, reason_has="grace"),
    Case("from zero to one at once on any demand",
         ScalingPolicy(min_replicas=0, max_replicas=4, target=10.0, scale_to_zero_after_s=30,
                       scale_up_delay_s=30),
         steady(0, 0, 58) + [Sample(t=60, queue=1, request_rate=0.1)], 60, ready=0, want=1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case: Case) -> None:
    a = Autoscaler(case.policy)
    for s in case.samples:
        a.observe(s)
    d = a.decide(case.now, ready=case.ready, starting=case.starting, **case.kwargs)
    assert d.desired == case.want, d
    assert d.mode == case.mode, d
    assert d.bound_by == case.bound_by, d
    assert case.reason_has in d.reason, d
    assert d.reason.endswith(".") and "stable_avg" in d.signals


def wanted_8_then_2() -> Autoscaler:
    """Wanted 8 replicas until t=10, then 2 until t=40, under a 60 s scale-down delay."""
    a = Autoscaler(ScalingPolicy(max_replicas=20, target=1.0, stable_window_s=10, panic_threshold=100,
                                 scale_down_delay_s=60))
    for t in range(0, 11, 2):
        a.observe(Sample(t=t, in_flight=8, request_rate=1))
    assert a.decide(10, ready=8, starting=0).desired == 8
    for t in range(12, 41, 2):
        a.observe(Sample(t=t, in_flight=2, request_rate=1))
    return a


def test_scale_down_waits_for_the_highest_want_in_the_delay() -> None:
    a = wanted_8_then_2()
    held = a.decide(40, ready=8, starting=0)
    assert held.desired == 8 and held.bound_by == "stabilization"
    for t in range(42, 81, 2):
        a.observe(Sample(t=t, in_flight=2, request_rate=1))
        a.decide(t, ready=8, starting=0)
    assert a.decide(80, ready=8, starting=0).desired == 2      # the want of 8 (t=10) left the 60 s delay


def test_panic_lasts_a_stable_window_after_the_last_trigger() -> None:
    a = Autoscaler(P)
    for s in steady(2, 0, 52) + steady(30, 54, 60):
        a.observe(s)
    assert a.decide(60, ready=1, starting=0).mode == "panic"
    for s in steady(0.5, 62, 110):
        a.observe(s)
    assert a.decide(110, ready=10, starting=0).mode == "panic"      # still within 60 s of the trigger
    assert a.decide(110, ready=10, starting=0).desired == 10        # and never scales down while panicking
    for s in steady(0.5, 112, 125):
        a.observe(s)
    assert a.decide(125, ready=10, starting=0).mode == "stable"


def test_window_is_bounded() -> None:
    a = Autoscaler(P)
    for t in range(0, 10000, 2):
        a.observe(Sample(t=t, in_flight=1))
    assert len(a._samples) <= 31


@pytest.mark.parametrize("policy,field_name", [
    (ScalingPolicy(metric="rps"), "metric"),
    (ScalingPolicy(target=0), "target"),
])
def test_bad_policy_named(policy: ScalingPolicy, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        Autoscaler(policy)


@pytest.mark.parametrize("variants,want", [
    ([("full", True), ("q4", True)], "full"),
    ([("full", False), ("q4", True)], "q4"),
    ([("full", False), ("q4", False)], None),
    ([], None),
])
def test_choose_variant(variants, want) -> None:
    assert choose_variant(variants) == want


def test_a_caller_may_shorten_the_scale_down_delay_but_never_lengthen_it() -> None:
    fed = wanted_8_then_2
    assert fed().decide(40, ready=8, starting=0).desired == 8                     # the policy's 60 s holds
    fast = fed().decide(40, ready=8, starting=0, scale_down_delay_s=0.0)
    assert fast.desired == 2 and fast.bound_by == ""                             # down at once
    assert fed().decide(40, ready=8, starting=0, scale_down_delay_s=20.0).desired == 2   # want 8 was 30 s ago
    held = fed().decide(40, ready=8, starting=0, scale_down_delay_s=3600.0)      # capped at the policy's 60 s
    assert held.desired == 8 and "last 60s" in held.reason


def test_a_new_policy_waits_its_scale_down_delay_before_scaling_down_what_it_found() -> None:
    """A policy set on a deployment running 3 replicas at a load that wants 1: with no history, its first
    decision scaled to 1 at once, as if the delay did not apply; it counts the 3 it found as a want now."""
    a = Autoscaler(ScalingPolicy(max_replicas=10, target=1.0, stable_window_s=10, panic_threshold=100,
                                 scale_down_delay_s=120))
    for t in range(0, 11, 2):
        a.observe(Sample(t=t, in_flight=1, request_rate=1))
    first = a.decide(10, ready=3, starting=0)
    assert first.desired == 3 and first.bound_by == "stabilization" and "last 120s" in first.reason
    for t in range(12, 131, 2):
        a.observe(Sample(t=t, in_flight=1, request_rate=1))
        assert a.decide(t, ready=3, starting=0).desired == 3
    assert a.decide(131, ready=3, starting=0).desired == 1      # the delay passed: down to what the load wants
    up = Autoscaler(ScalingPolicy(max_replicas=10, target=1.0, stable_window_s=10, panic_threshold=100,
                                  scale_down_delay_s=120))
    for t in range(0, 11, 2):
        up.observe(Sample(t=t, in_flight=5, request_rate=1))
    assert up.decide(10, ready=3, starting=0).desired == 5        # a first scale-up is not held

"""The predictive policy's forecast and scaler as `meshctl bench autoscale` runs them (mesh/autoscale/scalers.py,
planner.py): the rate forecaster looks a lead time ahead from history only, the scaler wants the sizing rule's
replicas for the forecast rate, the planner's fallbacks and nowcast, catch-up when a replica is ready within the
SLO's room, and the oracle forecast."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest


def test_rate_forecaster_forecasts_the_bucket_a_lead_time_ahead_from_history_only() -> None:
    from mesh.autoscale.scalers import RateForecaster
    pattern = [1.0, 1.0, 6.0, 2.0]                            # requests per second, season of 4 buckets of 10 s
    f = RateForecaster(10.0, 12.0, season=4, level=0.9, refit_every=1, min_history=50, models=("snaive",))
    seen = []
    for k in range(64):                                      # ticks of 2 s, arrivals at the bucket's rate
        for j in range(5):
            now = 10.0 * k + 2.0 * (j + 1)
            f.observe(now, pattern[k % 4] * 2.0)
            if k >= 50 and j == 0:
                seen.append((k, f.upper_rate(now)))
    assert f.log.fits > 0 and f.log.failures == 0
    for k, upper in seen:
        # at 2 s into bucket k the lead reaches bucket k + 1: the upper edge covers the max of k, k + 1
        assert upper == pytest.approx(max(pattern[k % 4], pattern[(k + 1) % 4]), abs=0.05)
    err = f.log.error(np.array([pattern[k % 4] for k in range(64)]))
    assert err["buckets"] > 0 and err["mae_rps"] == pytest.approx(0.0, abs=0.05)


def _figures(cold_start_s: float = 30.0):
    from mesh.autoscale.planner import ServiceFigures
    return ServiceFigures(service_s=5.66, ttft_s=0.0, slots=1, cold_start_s=cold_start_s)   # room 6.36 s at 6360 ms


def test_predictive_scaler_wants_the_erlang_replicas_for_the_forecast_rate() -> None:
    from mesh.autoscale.scalers import AutoscalerScaler
    from mesh.autoscale.sizing import erlang_replicas
    from mesh.autoscale.types import Sample, ScalingPolicy
    policy = ScalingPolicy(min_replicas=1, max_replicas=64, target=1.3, predictive=True, max_scale_up_rate=100,
                           slo_ttft_ms=6360, sizing="erlang", sizing_quantile=0.97)
    s = AutoscalerScaler(policy, figures=_figures(), forecaster=_FixedRate(2.5))
    want = s.scale(2.0, Sample(t=2.0, in_flight=1, queue=0, request_rate=0.5, ready=1), ready=1, starting=0)
    n = erlang_replicas(2.5, 5.66, 1, 6.36, 0.97)
    assert want == n and n > math.ceil(2.5 * 5.66 / 1.3)               # more than Little's law at the target
    assert s.last.mode == "predictive"
    with pytest.raises(ValueError, match="sizing rule"):
        AutoscalerScaler(replace(policy, sizing="guess"), figures=_figures())


def test_queueing_planner_uses_the_last_bucket_before_a_fit_and_never_forecasts_below_it() -> None:
    from mesh.autoscale.planner import Planner
    from mesh.autoscale.types import Sample, ScalingPolicy
    policy = ScalingPolicy(max_replicas=8, target=1.0, predictive=True, slo_ttft_ms=6360, nowcast=False)
    plan = Planner(policy, tick_s=2.0, bucket_s=10.0)
    assert plan.upper_rate(1.0, None) is None                          # nothing seen
    for j in range(5):
        plan.observe(Sample(t=2.0 * (j + 1), request_rate=3.0))         # 30 arrivals in bucket 0: 3 requests/s
    plan.observe(Sample(t=12.0, request_rate=0.0))
    assert plan.upper_rate(12.0, None) == pytest.approx(3.0) and plan.naive_fallbacks == 1
    assert plan.upper_rate(12.0, 1.0) == pytest.approx(3.0)            # a fitted forecast never below it
    assert plan.upper_rate(12.0, 5.0) == pytest.approx(5.0)
    little = Planner(replace(policy, sizing="little"), tick_s=2.0, bucket_s=10.0)
    for j in range(5):
        little.observe(Sample(t=2.0 * (j + 1), request_rate=3.0))
    little.observe(Sample(t=12.0, request_rate=0.0))
    assert little.upper_rate(12.0, None) is None                       # the little rule keeps the old behaviour
    assert little.upper_rate(12.0, 1.0) == pytest.approx(1.0)


class _FixedRate:
    """A forecaster that always says ``rate`` requests/s."""

    def __init__(self, rate: float) -> None:
        from mesh.autoscale.planner import RateBuckets
        from mesh.autoscale.scalers import ForecastLog
        self.rate = rate
        self.log = ForecastLog()
        self.buckets = RateBuckets(60.0)
        self.bucket_s = 60.0

    def upper_rate(self, now):
        return self.rate


def _scaler(cold_start_s: float, catch_up: bool, quantile: float = 0.97):
    from mesh.autoscale.scalers import AutoscalerScaler
    from mesh.autoscale.types import ScalingPolicy
    policy = ScalingPolicy(min_replicas=1, max_replicas=64, target=3.0, predictive=True, max_scale_up_rate=100,
                           scale_down_delay_s=120, panic_threshold=100, slo_ttft_ms=6360, sizing="erlang",
                           sizing_quantile=quantile, catch_up=catch_up)
    return AutoscalerScaler(policy, figures=_figures(cold_start_s), tick_s=2.0, forecaster=_FixedRate(2.5))


def test_catch_up_sizes_the_floor_at_the_median_when_a_replica_is_ready_within_the_slo_room() -> None:
    from mesh.autoscale.scalers import CATCH_UP_QUANTILE
    from mesh.autoscale.sizing import erlang_replicas
    from mesh.autoscale.types import Sample
    fast = _scaler(1.2, catch_up=True)                  # 1.2 s + 2 s tick <= 6.36 s of room
    assert fast.catching_up and fast.floor_quantile == CATCH_UP_QUANTILE
    slow = _scaler(30.0, catch_up=True)                 # 32 s > 6.36 s: nothing changes
    assert not slow.catching_up and slow.floor_quantile == 0.97
    off = _scaler(1.2, catch_up=False)
    assert not off.catching_up and off.floor_quantile == 0.97
    sample = Sample(t=2.0, in_flight=1, request_rate=0.5, ready=1)
    n_median = erlang_replicas(2.5, 5.66, 1, 6.36, CATCH_UP_QUANTILE)
    n_tail = erlang_replicas(2.5, 5.66, 1, 6.36, 0.97)
    assert n_median < n_tail
    assert fast.scale(2.0, sample, ready=1, starting=0) == n_median
    assert slow.scale(2.0, sample, ready=1, starting=0) == n_tail
    assert off.scale(2.0, sample, ready=1, starting=0) == n_tail


def test_catch_up_scales_down_to_the_floor_without_the_delay() -> None:
    from mesh.autoscale.types import Sample
    fast, slow = _scaler(1.2, catch_up=True), _scaler(30.0, catch_up=True)
    for s in (fast, slow):
        s.forecaster.rate = 2.5
        high = s.scale(2.0, Sample(t=2.0, in_flight=1, request_rate=2.5, ready=1), ready=1, starting=0)
        s.forecaster.rate = 0.5                         # the forecast drops
        s.last_high = high
    low_fast = fast.scale(4.0, Sample(t=4.0, in_flight=1, request_rate=0.5, ready=fast.last_high),
                          ready=fast.last_high, starting=0)
    low_slow = slow.scale(4.0, Sample(t=4.0, in_flight=1, request_rate=0.5, ready=slow.last_high),
                          ready=slow.last_high, starting=0)
    assert low_fast < fast.last_high                    # down at once, to the floor for 0.5 requests/s
    assert low_slow == slow.last_high and slow.last.bound_by == "stabilization"   # held by the 120 s delay


def test_nowcast_keeps_the_forecast_rate_at_least_the_bucket_under_way_once_a_third_has_passed() -> None:
    from mesh.autoscale.planner import RateBuckets
    b = RateBuckets(30.0)
    b.observe(30.0, 30.0)                               # bucket 0: 1 request/s
    b.observe(32.0, 0.0)                                # bucket 1 begins
    assert b.last_rate() == pytest.approx(1.0)
    assert b.nowcast_rate(32.0) is None                 # 2 s of 30: too early
    b.observe(40.0, 40.0)                               # 40 arrivals in the first 10 s of bucket 1
    assert b.nowcast_rate(40.0) == pytest.approx(4.0)   # a third has passed: its 4 requests/s so far


def test_the_oracle_forecast_is_the_realized_bucket_rate_a_lead_ahead() -> None:
    from mesh.autoscale.scalers import OracleForecaster
    arrivals = np.array([1.0, 2.0, 3.0] + [10.0 + i / 4 for i in range(40)])   # 3 in bucket 0, 40 in bucket 1
    f = OracleForecaster(10.0, 4.0, arrivals, 20.0)
    assert f.upper_rate(2.0) == pytest.approx(0.3)                 # now .. now + 4 s: bucket 0 only
    assert f.upper_rate(7.0) == pytest.approx(4.0)                 # the lead reaches bucket 1: its 40 in 10 s
    assert f.log.point[1] == pytest.approx(4.0)

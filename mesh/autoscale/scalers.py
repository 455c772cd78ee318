"""The policies `meshctl bench autoscale` compares, as scalers the simulation (or the real-mode driver) asks
for a replica count every tick.

- ``fixed-peak``: the replicas the series' peak rate needs (Little's law at the policy's target), all the time.
- ``reactive``: the Autoscaler on current load with Knative-like windows (predictive off).
- ``predictive``: the same decision code as the live controller (mesh/autoscale/planner.py: sizing, persistence,
  the nowcast and catch-up), with the calibration's figures and a forecast of the request rate: bucketed at the
  series' step, forecast with ``mesh.forecast.choose`` (model choice by backtest, split-conformal interval),
  refit every ``refit_every`` buckets on the history seen so far; the interval's upper edge over now .. now +
  lead time (the measured cold start plus one tick) is the Planner's ``forecast_rate``. The controller gets
  that rate from the history store's ``request_rate`` series instead (controlplane/controllers/autoscale_forecast.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mesh.autoscale.planner import CATCH_UP_QUANTILE, NOWCAST_FRACTION, Planner, RateBuckets, ServiceFigures
from mesh.autoscale.types import Decision, Sample, ScalingPolicy

__all__ = ["CATCH_UP_QUANTILE", "NOWCAST_FRACTION", "AutoscalerScaler", "FixedScaler", "ForecastLog",
           "OracleForecaster", "RateForecaster", "peak_replicas"]


class FixedScaler:
    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def scale(self, now: float, sample: Sample, *, ready: int, starting: int) -> int:
        return self.replicas


def peak_replicas(peak_rate: float, service_s: float, target: float, max_replicas: int) -> int:
    """Replicas for a rate by Little's law: ceil(rate x service time / per-replica target)."""
    return max(1, min(max_replicas, math.ceil(round(peak_rate * service_s / target, 9))))


@dataclass
class ForecastLog:
    """Forecasts made for each bucket (the first one made for it, at least a lead time ahead)."""

    point: dict[int, float] = field(default_factory=dict)
    upper: dict[int, float] = field(default_factory=dict)
    fits: int = 0
    failures: int = 0
    naive_fallbacks: int = 0               # decisions made on the last bucket's rate (no fitted forecast yet)
    models: dict[str, int] = field(default_factory=dict)

    def error(self, actual: np.ndarray) -> dict:
        ks = [k for k in self.point if k < len(actual)]
        if not ks:
            return {"buckets": 0, "fits": self.fits, "failures": self.failures, "models": self.models,
                    "naive_fallbacks": self.naive_fallbacks}
        a = np.array([actual[k] for k in ks])
        p = np.array([self.point[k] for k in ks])
        u = np.array([self.upper[k] for k in ks])
        mae = float(np.mean(np.abs(a - p)))
        return {"buckets": len(ks), "mae_rps": round(mae, 4),
                "wape": round(float(np.sum(np.abs(a - p)) / np.sum(a)), 4) if np.sum(a) > 0 else None,
                "upper_coverage": round(float(np.mean(a <= u + 1e-9)), 4), "fits": self.fits,
                "failures": self.failures, "models": self.models, "naive_fallbacks": self.naive_fallbacks}


class RateForecaster:
    """Fits the bucketed arrivals (``buckets``, which the Planner counts) and forecasts the rate's upper edge
    ahead; persistence and the nowcast are the Planner's (mesh/autoscale/planner.py), as in the controller."""

    def __init__(self, bucket_s: float, lead_s: float, *, season: int, level: float, refit_every: int,
                 min_history: int, models: tuple[str, ...], max_history: int = 0, cache: dict | None = None) -> None:
        self.buckets = RateBuckets(bucket_s)
        self.bucket_s = bucket_s
        self.lead_s = lead_s
        self.season = season
        self.level = level
        self.refit_every = max(1, refit_every)
        self.min_history = min_history
        self.models = models
        self.max_history = max_history
        self._fitted_at = -10**9
        self._fc_start = 0                     # bucket index of the forecast's first step
        self._hi: list[float] = []
        self._pt: list[float] = []
        self.log = ForecastLog()
        self.cache = cache if cache is not None else {}   # history length -> forecast: the arrivals, hence the
        #                                                   forecasts, are the same for every run on one series

    @property
    def counts(self) -> list[float]:
        return self.buckets.counts

    def observe(self, now: float, arrived: float) -> None:
        """``arrived`` requests in the tick that ended at ``now`` (used alone; a Planner feeds ``buckets``)."""
        self.buckets.observe(now, arrived)

    def _refit(self) -> None:
        from mesh.forecast import choose
        hist = np.array(self.counts, dtype=float) / self.bucket_s
        horizon = int(math.ceil(self.lead_s / self.bucket_s)) + self.refit_every + 1
        self._fitted_at = len(self.counts)
        key = (len(self.counts), horizon)
        if key not in self.cache:
            try:
                self.cache[key] = choose(hist, season=self.season, horizon=horizon, models=self.models,
                                         level=self.level, max_history=self.max_history)
            except Exception:                   # too short for a backtest, or a model failed: no forecast
                self.cache[key] = None
        f = self.cache[key]
        if f is None:
            self.log.failures += 1
            self._hi, self._pt = [], []
            return
        self.log.fits += 1
        self.log.models[f.model] = self.log.models.get(f.model, 0) + 1
        self._fc_start = len(self.counts)
        self._hi, self._pt = list(f.hi), list(f.points)

    def upper_rate(self, now: float) -> float | None:
        """The fitted forecast's upper rate over now .. now + lead (None: no fit yet, or it failed)."""
        done = len(self.counts)
        if done >= self.min_history and done - self._fitted_at >= self.refit_every:
            self._refit()
        if not self._hi:
            return None
        k0 = int(now // self.bucket_s)
        k1 = int((now + self.lead_s) // self.bucket_s)
        his = []
        for k in range(k0, k1 + 1):
            i = k - self._fc_start
            if 0 <= i < len(self._hi):
                his.append(self._hi[i])
                if k == k1 and k not in self.log.point:
                    self.log.point[k] = self._pt[i]
                    self.log.upper[k] = self._hi[i]
        return max(his) if his else None


class OracleForecaster(RateForecaster):
    """A bound, not a policy: the realized rate of each bucket of ``arrivals``, known ahead (what a perfect
    forecast of the bucket rates would give the same decision code; `meshctl bench autoscale --forecast oracle`)."""

    def __init__(self, bucket_s: float, lead_s: float, arrivals: np.ndarray, end_s: float) -> None:
        super().__init__(bucket_s, lead_s, season=1, level=0.5, refit_every=1, min_history=0, models=("oracle",))
        n = int(math.ceil(end_s / bucket_s)) + 1
        self.actual = np.bincount(np.minimum((np.asarray(arrivals) // bucket_s).astype(int), n - 1),
                                  minlength=n) / bucket_s

    def upper_rate(self, now: float) -> float | None:
        k0 = int(now // self.bucket_s)
        k1 = min(int((now + self.lead_s) // self.bucket_s), len(self.actual) - 1)
        if k0 > k1:
            return None
        if k1 not in self.log.point:
            self.log.point[k1] = self.log.upper[k1] = float(self.actual[k1])
        return float(self.actual[k0:k1 + 1].max())


class AutoscalerScaler:
    """The Planner (the live controller's decision code) driven by the simulation's samples, with the
    calibration's figures and, when predictive, a forecaster."""

    def __init__(self, policy: ScalingPolicy, *, figures: ServiceFigures, replica_cost_per_hour: float = 0.0,
                 forecaster: RateForecaster | None = None, tick_s: float = 2.0) -> None:
        self.planner = Planner(policy, tick_s=tick_s, rates=forecaster.buckets if forecaster is not None else None,
                               bucket_s=forecaster.bucket_s if forecaster is not None else 60.0)
        self.autoscaler = self.planner.autoscaler
        self.figures = figures
        self.cost = replica_cost_per_hour
        self.forecaster = forecaster
        self.reaction_s = figures.cold_start_s + tick_s
        self.catching_up = self.planner.catching_up(figures)
        self.floor_quantile = self.planner.floor_quantile(figures)

    @property
    def decisions(self) -> dict[str, int]:
        return self.planner.decisions

    @property
    def last(self) -> Decision | None:
        return self.planner.last

    def scale(self, now: float, sample: Sample, *, ready: int, starting: int) -> int:
        self.planner.observe(sample)
        rate = self.forecaster.upper_rate(now) if self.forecaster is not None else None
        d = self.planner.decide(now, ready=ready, starting=starting, figures=self.figures, forecast_rate=rate,
                                replica_cost_per_hour=self.cost)
        if self.forecaster is not None:
            self.forecaster.log.naive_fallbacks = self.planner.naive_fallbacks
        return d.desired

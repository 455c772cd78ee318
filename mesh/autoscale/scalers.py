"""The policies `meshctl bench autoscale` compares, as scalers the simulation (or the real-mode driver) asks
for a replica count every tick.

- ``fixed-peak``: the replicas the series' peak rate needs (Little's law at the policy's target), all the time.
- ``reactive``: the Autoscaler on current load with Knative-like windows (predictive off).
- ``predictive``: the same Autoscaler with predictive warm-up: the request rate, bucketed at the series'
  step, is forecast with ``mesh.forecast.choose`` (model choice by backtest, split-conformal interval), refit
  every ``refit_every`` buckets on the history seen so far; the interval's upper edge over now .. now + lead
  time (the measured cold start plus one tick) is sized into replicas by ``sizing`` (mesh/autoscale/sizing.py:
  ``erlang``, the fewest replicas whose queueing wait meets the SLO's room at a quantile, for the Poisson
  bursts inside a bucket; ``poisson``; or ``little``, rate x service time at the target), and handed to the
  Autoscaler as ``forecast_upper`` = those replicas x the target (the concurrency they carry at the target).
  With the queueing rules the forecast rate is never below the last finished bucket's rate, and with
  ``nowcast`` never below the rate seen so far in the bucket under way once a third of it has passed (the
  freshest evidence of a jump the bucket forecast did not see).

  **Catch-up** (``catch_up``, on in the bench): the reaction time is the cold start plus one tick, how long a
  replica started on the first sign of a queue takes to serve it. When it is within the SLO's room to queue
  (``wait_s``), a burst the forecast did not see is caught by the Autoscaler's own (stable and panic) want
  before its requests miss the SLO, so the forecast floor need not hold the burst by itself: it is sized at
  the median (``CATCH_UP_QUANTILE``) instead of the sizing quantile, and the policy scales down without its
  scale-down delay (down to the larger of the want now and the floor over now .. now + lead), since a wrong
  scale-down is undone within the room. With a longer cold start nothing changes: the floor at the sizing
  quantile and the policy's delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mesh.autoscale import sizing
from mesh.autoscale.autoscaler import Autoscaler
from mesh.autoscale.types import Decision, Sample, ScalingPolicy


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


NOWCAST_FRACTION = 1 / 3      # how much of the bucket under way must have passed before its rate so far counts


class RateForecaster:
    """Buckets the observed arrivals and forecasts the rate's upper quantile ahead (see module doc)."""

    def __init__(self, bucket_s: float, lead_s: float, *, season: int, level: float, refit_every: int,
                 min_history: int, models: tuple[str, ...], max_history: int = 0, cache: dict | None = None,
                 queueing: bool = False, nowcast: bool = False) -> None:
        self.queueing = queueing               # with the queueing sizing rules: a naive forecast (the last finished
        #                                        bucket's rate) before the first fit, and never below that rate
        self.nowcast = nowcast                 # and never below the rate seen so far in the bucket under way, once
        #                                        NOWCAST_FRACTION of it has passed
        self.bucket_s = bucket_s
        self.lead_s = lead_s
        self.season = season
        self.level = level
        self.refit_every = max(1, refit_every)
        self.min_history = min_history
        self.models = models
        self.max_history = max_history
        self.counts: list[float] = []          # arrivals per finished bucket
        self._partial = 0.0
        self._bucket = 0
        self._fitted_at = -10**9
        self._fc_start = 0                     # bucket index of the forecast's first step
        self._hi: list[float] = []
        self._pt: list[float] = []
        self.log = ForecastLog()
        self.cache = cache if cache is not None else {}   # history length -> forecast: the arrivals, hence the
        #                                                   forecasts, are the same for every run on one series

    def observe(self, now: float, arrived: float) -> None:
        """``arrived`` requests in the tick that ended at ``now`` (a tick ending on a bucket's edge is that
        bucket's last)."""
        k = max(0, math.ceil(now / self.bucket_s - 1e-9) - 1)
        while self._bucket < k:
            self.counts.append(self._partial)
            self._partial = 0.0
            self._bucket += 1
        self._partial += arrived

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
        """The forecast's upper rate over now .. now + lead (None without a forecast; see ``queueing``)."""
        done = len(self.counts)
        if done >= self.min_history and done - self._fitted_at >= self.refit_every:
            self._refit()
        if not self._hi:
            # too little history for the backtest (or the fit failed): the naive forecast, the last finished
            # bucket's rate, with no interval
            if not self.counts or not self.queueing:
                return None
            self.log.naive_fallbacks += 1
            rate = self.nowcast_rate(now)
            return max(self.counts[-1] / self.bucket_s, rate if rate is not None else 0.0)
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
        if not his:
            return None
        if self.queueing:                       # never below the last finished bucket's rate (persistence)
            his.append(self.counts[-1] / self.bucket_s)
        rate = self.nowcast_rate(now)
        if rate is not None:
            his.append(rate)
        return max(his)

    def nowcast_rate(self, now: float) -> float | None:
        """The arrival rate so far in the bucket under way, once NOWCAST_FRACTION of it has passed (else None,
        and None without ``nowcast`` or the queueing rules)."""
        if not (self.nowcast and self.queueing):
            return None
        elapsed = now - self._bucket * self.bucket_s
        if elapsed < NOWCAST_FRACTION * self.bucket_s - 1e-9:
            return None
        return self._partial / elapsed


CATCH_UP_QUANTILE = 0.5       # the floor's quantile when the reactive want catches a burst within the SLO's room


class AutoscalerScaler:
    """The Autoscaler driven by the simulation's samples (and a forecaster when predictive)."""

    def __init__(self, policy: ScalingPolicy, *, service_s: float, cold_start_s: float,
                 replica_cost_per_hour: float = 0.0, forecaster: RateForecaster | None = None,
                 sizing_rule: str = "little", slots: int = 1, wait_s: float = 0.0, quantile: float = 0.99,
                 catch_up: bool = False, tick_s: float = 2.0) -> None:
        if sizing_rule not in sizing.RULES:
            raise ValueError(f"sizing rule {sizing_rule!r}: allowed {', '.join(sizing.RULES)}")
        self.autoscaler = Autoscaler(policy)
        self.target = policy.target
        self.sizing_rule = sizing_rule
        self.slots = slots
        self.wait_s = wait_s
        self.quantile = quantile
        self.service_s = service_s
        self.cold_start_s = cold_start_s
        self.cost = replica_cost_per_hour
        self.forecaster = forecaster
        self.decisions: dict[str, int] = {}
        self.last: Decision | None = None
        self.reaction_s = cold_start_s + tick_s
        self.catching_up = (catch_up and forecaster is not None and sizing_rule != "little"
                            and self.reaction_s <= wait_s)
        self.floor_quantile = CATCH_UP_QUANTILE if self.catching_up else quantile

    def scale(self, now: float, sample: Sample, *, ready: int, starting: int) -> int:
        self.autoscaler.observe(sample)
        upper = None
        if self.forecaster is not None:
            self.forecaster.observe(now, sample.request_rate * (now - getattr(self, "_prev", 0.0)))
            self._prev = now
            rate = self.forecaster.upper_rate(now)
            if rate is not None:
                upper = self.forecast_upper(rate)
        d = self.autoscaler.decide(now, ready=ready, starting=starting, replica_cost_per_hour=self.cost,
                                   forecast_upper=upper, cold_start_s=self.cold_start_s,
                                   scale_down_delay_s=0.0 if self.catching_up and upper is not None else None)
        self.decisions[d.mode] = self.decisions.get(d.mode, 0) + 1
        self.last = d
        return d.desired

    def forecast_upper(self, rate: float) -> float:
        """The forecast's upper rate as demand in the Autoscaler's units (concurrency)."""
        if self.sizing_rule == "little":
            return rate * self.service_s                # Little's law: concurrency = rate x time in system
        n = sizing.replicas_for(self.sizing_rule, rate, self.service_s, slots=self.slots, wait_s=self.wait_s,
                                quantile=self.floor_quantile)
        return n * self.target                          # the Autoscaler wants ceil(upper / target) = n

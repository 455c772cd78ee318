"""A deployment's scaling decision, predictive rules included: the one implementation that the live
autoscaler controller (controlplane/controllers/autoscaler.py) and `meshctl bench autoscale`
(mesh/autoscale/scalers.py) both run.

    plan = Planner(policy, tick_s=2.0)
    plan.observe(sample)                                     # every tick
    d = plan.decide(now, ready=2, starting=0, figures=ServiceFigures(service_s=5.7, ttft_s=0.4, slots=1,
                    cold_start_s=1.2), forecast_rate=3.1)    # the forecast's upper request rate, or None

What it adds to the Knative-like `Autoscaler` (mesh/autoscale/autoscaler.py), for a predictive policy:

- **The rate it provisions for**: the forecast's upper rate over now .. now + lead time, and with a
  queueing sizing rule (erlang, poisson) never below the last finished bucket's rate (persistence) nor,
  with ``policy.nowcast``, the rate so far in the bucket under way once NOWCAST_FRACTION of it has passed.
  Without a fitted forecast yet, a queueing rule uses the last finished bucket's rate (the naive forecast).
- **Sizing** (mesh/autoscale/sizing.py): the replicas that rate needs; erlang bounds P(wait > the SLO's room
  to queue) by 1 - ``policy.sizing_quantile``, where the room is the TTFT objective minus the TTFT on a free
  slot. The result goes to the Autoscaler as its forecast floor, in the policy metric's units
  (``demand_for``: a queueing rule's replicas x target; ``little``, Little's law's mean concurrency as that
  load would read in the metric). A ``ttft`` policy gets no floor (its ratio rule takes none).
- **Catch-up**: when a cold start plus one tick fits in that room, a burst the reactive rules see is caught
  by a replica started then, so the floor is sized at the median (CATCH_UP_QUANTILE) and there is no
  scale-down delay while a forecast floor holds (a wrong scale-down is undone within the room); without a
  floor (ttft, no forecast) the policy's delay stays.

``ServiceFigures`` are what sizing needs of one replica: the bench knows them from its calibration, the
controller measures them (``measured_figures``: Little's law over the window, the registry's TTFT) and
keeps the last through quiet windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.autoscale import sizing
from mesh.autoscale.autoscaler import Autoscaler
from mesh.autoscale.types import SIZINGS, Decision, Sample, ScalingPolicy

NOWCAST_FRACTION = 1 / 3      # how much of the bucket under way must have passed before its rate so far counts
CATCH_UP_QUANTILE = 0.5       # the floor's quantile when the reactive want catches a burst within the SLO's room
BUCKET_S = 60.0               # the controller's rate bucket (the bench's is the series' step)


@dataclass(frozen=True)
class ServiceFigures:
    """What sizing needs of one replica."""

    service_s: float            # mean time a request holds its slot (time in service)
    ttft_s: float = 0.0         # time to first token on a free slot
    slots: int = 1              # requests a replica serves at once
    cold_start_s: float = 0.0   # slice creation + model load


class RateBuckets:
    """Arrivals counted per bucket of ``bucket_s`` (the finished ones in ``counts``) and the bucket under way."""

    def __init__(self, bucket_s: float) -> None:
        if not bucket_s > 0:
            raise ValueError(f"bucket_s {bucket_s!r}: must be > 0")
        self.bucket_s = bucket_s
        self.counts: list[float] = []       # arrivals per finished bucket
        self.origin: float | None = None    # bucket 0 starts here (the bench: 0; the controller: its first sample)
        self._partial = 0.0
        self._bucket = 0

    def observe(self, now: float, arrived: float, *, origin: float = 0.0) -> None:
        """``arrived`` requests in the tick that ended at ``now`` (a tick ending on a bucket's edge is that
        bucket's last)."""
        if self.origin is None:
            self.origin = origin
        k = max(0, math.ceil((now - self.origin) / self.bucket_s - 1e-9) - 1)
        while self._bucket < k:
            self.counts.append(self._partial)
            self._partial = 0.0
            self._bucket += 1
        self._partial += arrived

    def last_rate(self) -> float | None:
        """The last finished bucket's rate (None before one finished)."""
        return self.counts[-1] / self.bucket_s if self.counts else None

    def nowcast_rate(self, now: float) -> float | None:
        """The rate so far in the bucket under way, once NOWCAST_FRACTION of it has passed (else None)."""
        if self.origin is None:
            return None
        elapsed = now - self.origin - self._bucket * self.bucket_s
        if elapsed < NOWCAST_FRACTION * self.bucket_s - 1e-9:
            return None
        return self._partial / elapsed


class Planner:
    """One deployment's autoscaler with the predictive rules (see the module doc). Pure, no I/O, no clock."""

    def __init__(self, policy: ScalingPolicy, *, tick_s: float = 2.0, bucket_s: float = BUCKET_S,
                 origin: float | None = 0.0, rates: RateBuckets | None = None) -> None:
        if policy.sizing_rule not in SIZINGS:
            raise ValueError(f"sizing rule {policy.sizing!r}: allowed {', '.join(SIZINGS)}")
        self.autoscaler = Autoscaler(policy)
        self.policy = policy
        self.tick_s = tick_s
        self.rates = rates if rates is not None else RateBuckets(bucket_s)   # shared with a bench forecaster
        self._origin = origin              # None: the first sample's time (a live controller's wall clock)
        self._prev_t: float | None = None
        self.naive_fallbacks = 0           # decisions on the last bucket's rate (no fitted forecast yet)
        self.decisions: dict[str, int] = {}
        self.last: Decision | None = None

    @property
    def queueing(self) -> bool:
        return self.policy.sizing_rule != "little"

    def observe(self, sample: Sample) -> None:
        self.autoscaler.observe(sample)
        prev = self._prev_t if self._prev_t is not None else sample.t - self.tick_s
        origin = self._origin if self._origin is not None else sample.t - self.tick_s
        self.rates.observe(sample.t, sample.request_rate * max(0.0, sample.t - prev), origin=origin)
        self._prev_t = sample.t

    @property
    def samples(self) -> list[Sample]:
        """The samples kept (the last stable window's)."""
        return list(self.autoscaler._samples)

    def recent(self, now: float, seconds: float) -> list[Sample]:
        """The samples kept of the last ``seconds`` before ``now``."""
        return [x for x in self.samples if now - seconds <= x.t <= now]

    def wait_s(self, figures: ServiceFigures) -> float:
        """The SLO's room to queue: the objective minus the TTFT on a free slot (0 without an SLO)."""
        return max(0.0, self.policy.slo_ms / 1000 - figures.ttft_s)

    def catching_up(self, figures: ServiceFigures | None) -> bool:
        """A cold start plus one tick fits in the room to queue (catch-up applies; never without a floor to
        size at the median: a ttft policy keeps its quantile and its scale-down delay)."""
        p = self.policy
        return (figures is not None and p.catch_up and self.floor_applies and self.queueing and p.slo_ms > 0
                and figures.cold_start_s + self.tick_s <= self.wait_s(figures))

    def floor_quantile(self, figures: ServiceFigures | None) -> float:
        return CATCH_UP_QUANTILE if self.catching_up(figures) else self.policy.sizing_quantile

    def upper_rate(self, now: float, forecast_rate: float | None) -> float | None:
        """The rate to provision for (see the module doc): the forecast's, persistence and the nowcast."""
        last = self.rates.last_rate()
        nowcast = self.rates.nowcast_rate(now) if (self.policy.nowcast and self.queueing) else None
        if forecast_rate is None:
            if last is None or not self.queueing:
                return None
            self.naive_fallbacks += 1
            return max(last, nowcast if nowcast is not None else 0.0)
        rates = [forecast_rate]
        if self.queueing and last is not None:
            rates.append(last)
        if nowcast is not None:
            rates.append(nowcast)
        return max(rates)

    @property
    def floor_applies(self) -> bool:
        """The Autoscaler adds a forecast floor (every metric but ttft: its ratio rule has no unit for one)."""
        return self.policy.predictive and self.policy.metric != "ttft"

    def replicas_for(self, rate: float, figures: ServiceFigures) -> int:
        """The replicas ``rate`` needs by the queueing sizing rule, the search capped at max_replicas + 1
        (more is clamped to max_replicas anyway; the cap bounds the cost of a huge forecast on the control
        plane's event loop)."""
        p = self.policy
        return sizing.replicas_for(p.sizing_rule, rate, figures.service_s, slots=figures.slots,
                                   wait_s=self.wait_s(figures), quantile=self.floor_quantile(figures),
                                   limit=p.max_replicas + 1)

    def demand_for(self, rate: float, figures: ServiceFigures) -> float:
        """The demand ``rate`` brings in the policy metric's units (the Autoscaler's forecast floor).

        A queueing rule (erlang, poisson): its replicas x target, so the Autoscaler wants exactly those.
        ``little``: Little's law, the mean concurrency a = rate x service time, as a fluid in the metric's
        units: concurrency a; kv_cache a / slots (a replica's KV cache holds ``slots`` sequences, so a
        sequences fill a / slots replicas' worth); queue the requests beyond the replicas' slots at the
        target's queue per replica, a x target / (slots + target) (n replicas hold n x (slots + target))."""
        p = self.policy
        if self.queueing:
            return self.replicas_for(rate, figures) * p.target
        a = rate * figures.service_s
        if p.metric == "kv_cache":
            return a / figures.slots
        if p.metric == "queue":
            return a * p.target / (figures.slots + p.target)
        return a

    def decide(self, now: float, *, ready: int, starting: int, figures: ServiceFigures | None = None,
               forecast_rate: float | None = None, replica_cost_per_hour: float = 0.0,
               pool_room: int | None = None) -> Decision:
        """The decision now. ``forecast_rate``: the forecast's upper request rate over now .. now + lead
        (None: no fitted forecast); ``figures`` None: sizing impossible (no forecast floor)."""
        p = self.policy
        upper = None
        rate = None
        if p.predictive and figures is not None and figures.service_s > 0:
            rate = self.upper_rate(now, forecast_rate)
            if rate is not None and self.floor_applies:
                upper = self.demand_for(rate, figures)
        catching = self.catching_up(figures)
        d = self.autoscaler.decide(now, ready=ready, starting=starting, replica_cost_per_hour=replica_cost_per_hour,
                                   forecast_upper=upper, pool_room=pool_room,
                                   cold_start_s=figures.cold_start_s if figures is not None else 0.0,
                                   scale_down_delay_s=0.0 if catching and upper is not None else None)
        # (upper is None for ttft, whose ratio rule takes no floor: its scale-down delay stays)
        if p.predictive and figures is not None:
            d.signals.update(service_s=round(figures.service_s, 4), ttft_free_s=round(figures.ttft_s, 4),
                             wait_room_s=round(self.wait_s(figures), 4), catch_up=float(catching),
                             floor_quantile=self.floor_quantile(figures))
            if rate is not None:
                d.signals["provisioned_rate"] = round(rate, 4)
        self.decisions[d.mode] = self.decisions.get(d.mode, 0) + 1
        self.last = d
        return d


def measured_figures(samples: Iterable[Sample], *, slots: int, cold_start_s: float,
                     ttft_s: float | None = None) -> ServiceFigures | None:
    """A live deployment's figures from its recent samples: the time in service by Little's law (mean in
    flight over mean request rate), the TTFT on a free slot (``ttft_s`` when known, e.g. the registry's
    measured figure, else the least TTFT observed while nothing queued); None while no request was seen."""
    xs = list(samples)
    in_flight = sum(s.in_flight for s in xs)
    rate = sum(s.request_rate for s in xs)
    if not xs or in_flight <= 0 or rate <= 0:
        return None
    if ttft_s is None:
        calm = [s.ttft_ms for s in xs if s.ttft_ms > 0 and s.queue == 0] or [s.ttft_ms for s in xs if s.ttft_ms > 0]
        ttft_s = min(calm) / 1000 if calm else 0.0
    return ServiceFigures(service_s=in_flight / rate, ttft_s=ttft_s, slots=max(1, slots), cold_start_s=cold_start_s)

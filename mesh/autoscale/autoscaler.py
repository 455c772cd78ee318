"""The autoscaling algorithm: Knative's KPA (stable and panic windows, scale-up rate, scale-to-zero grace),
with predictive warm-up from a forecast's upper quantile, a cost ceiling and a resource pool's room.

    a = Autoscaler(policy)
    a.observe(Sample(t=now, in_flight=7, queue=2, request_rate=3.5, ready=2))     # every few seconds
    d = a.decide(now, ready=2, starting=0, replica_cost_per_hour=0.62)
    d.desired, d.mode, d.reason, d.bound_by, d.signals

The rules, in the order ``decide`` applies them:

1. Demand in the policy's metric, averaged over the stable window and over the (shorter) panic window:
   concurrency = in-flight + queued requests; queue = queued requests; kv_cache = mean use x ready replicas
   (replicas' worth of KV cache in use); ttft is ratio-based (replicas x observed TTFT / objective, with a 10%
   tolerance band, as Kubernetes' HPA does).
2. desired = ceil(stable average / target). Panic when the panic-window average reaches ``panic_threshold``
   x the ready replicas' capacity (ready x target): desired then follows the panic window, never goes below
   the replicas already running or starting, and panic lasts a stable window after the last trigger.
3. Predictive (``policy.predictive`` and a ``forecast_upper``): desired >= ceil(forecast_upper / target),
   where forecast_upper is the demand expected at now + lead time, in the metric's units.
4. Scale-up at most ``max_scale_up_rate`` x max(ready, 1) per decision; a scale-up waits until every want
   in the last ``scale_up_delay_s`` asked for it; a scale-down goes only to the highest want of the last
   ``scale_down_delay_s`` (Knative's scale-down delay; a caller may pass a shorter one per decision). A new
   autoscaler (a policy just set, a new leader) counts the replicas it found as its first want, so its first
   scale-down also waits the delay: with no history, a fresh policy scaled 3 replicas to 1 on its first decision.
5. Scale to zero: with ``min_replicas == 0`` and ``scale_to_zero_after_s > 0``, zero replicas once no request
   was seen for that long; until then at least one. From zero, one replica at once on any demand.
6. Clamp to [min, max], then to the cost ceiling (floor(ceiling / replica cost), ``bound_by="cost_ceiling"``)
   and to ready + starting + pool_room (``bound_by="pool"``).
"""

from __future__ import annotations

import math
from collections import deque

from mesh.autoscale.types import METRICS, Decision, Sample, ScalingPolicy

TTFT_TOLERANCE = 0.1        # HPA's default: no change while observed/objective is within 10% of 1


def _demand(sample: Sample, metric: str) -> float:
    """A sample's demand in the metric's units (ttft: the observed milliseconds)."""
    if metric == "concurrency":
        return sample.in_flight + sample.queue
    if metric == "queue":
        return sample.queue
    if metric == "kv_cache":
        return sample.kv_cache * sample.ready
    return sample.ttft_ms


def _has_requests(sample: Sample) -> bool:
    return sample.request_rate > 0 or sample.in_flight > 0 or sample.queue > 0


class Autoscaler:
    """One deployment's autoscaler: feed it samples, ask it for a decision. Pure, no I/O, no clock."""

    def __init__(self, policy: ScalingPolicy):
        if policy.metric not in METRICS:
            raise ValueError(f"metric {policy.metric!r}: allowed {', '.join(METRICS)}")
        if not policy.target > 0:
            raise ValueError(f"target {policy.target!r}: must be > 0")
        self.policy = policy
        self._samples: deque[Sample] = deque()
        self._wants: deque[tuple[float, int]] = deque()     # (t, desired before stabilization)
        self._last_request_t: float | None = None
        self._first_t: float | None = None
        self._panic_until = -math.inf
        self._decided = False

    @property
    def window_s(self) -> float:
        return max(self.policy.stable_window_s, self.policy.panic_window_s)

    def observe(self, sample: Sample) -> None:
        """Keep ``sample`` (samples older than the stable window are dropped)."""
        self._samples.append(sample)
        if self._first_t is None:
            self._first_t = sample.t
        if _has_requests(sample):
            self._last_request_t = sample.t if self._last_request_t is None else max(self._last_request_t, sample.t)
        self._trim(sample.t)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0].t < now - self.window_s:
            self._samples.popleft()
        keep = max(self.policy.scale_down_delay_s, self.policy.scale_up_delay_s)
        while self._wants and self._wants[0][0] < now - keep:
            self._wants.popleft()

    def _average(self, now: float, window: float) -> tuple[float, int]:
        values = [_demand(s, self.policy.metric) for s in self._samples if now - window <= s.t <= now]
        if self.policy.metric == "ttft":
            values = [v for v in values if v > 0]        # 0 = unknown
        return (sum(values) / len(values) if values else 0.0), len(values)

    def decide(self, now: float, *, ready: int, starting: int, replica_cost_per_hour: float = 0.0,
               forecast_upper: float | None = None, pool_room: int | None = None,
               cold_start_s: float = 0.0, scale_down_delay_s: float | None = None) -> Decision:
        """``scale_down_delay_s`` (optional, at most the policy's) replaces the policy's scale-down delay for
        this decision: a predictive caller that knows a wrong scale-down is undone within the SLO's room
        passes 0 (mesh/autoscale/scalers.py)."""
        p = self.policy
        self._trim(now)
        down_delay = p.scale_down_delay_s if scale_down_delay_s is None else \
            max(0.0, min(p.scale_down_delay_s, scale_down_delay_s))
        current = ready + starting
        stable, n_stable = self._average(now, p.stable_window_s)
        panic_avg, n_panic = self._average(now, p.panic_window_s)
        signals: dict[str, float] = {"stable_avg": round(stable, 4), "panic_avg": round(panic_avg, 4),
                                     "ready": float(ready), "starting": float(starting), "target": p.target}
        if forecast_upper is not None:
            signals["forecast_upper"] = round(float(forecast_upper), 4)
        if cold_start_s:
            signals["cold_start_s"] = float(cold_start_s)
        latest = self._samples[-1] if self._samples else None
        demand_now = latest is not None and _has_requests(latest)

        # 1-2: stable or panic want
        mode = "stable"
        if p.metric == "ttft":
            if n_stable == 0:
                want = current
                mode = "hold"
                reason = "no time-to-first-token observed yet: holding"
            else:
                ratio = stable / p.target
                signals["ttft_ratio"] = round(ratio, 4)
                base = max(ready, 1)
                if abs(ratio - 1) <= TTFT_TOLERANCE:
                    want = current
                    mode = "hold"
                    reason = f"TTFT {stable:.0f} ms is within 10% of the {p.target:.0f} ms objective: holding"
                else:
                    want = math.ceil(base * ratio) if ratio > 1 else min(current, math.ceil(base * ratio))
                    reason = (f"TTFT {stable:.0f} ms against a {p.target:.0f} ms objective "
                              f"(x{ratio:.2f}) wants {want} replicas")
        else:
            want_stable = math.ceil(round(stable / p.target, 9))
            want_panic = math.ceil(round(panic_avg / p.target, 9))
            signals["want_stable"] = float(want_stable)
            signals["want_panic"] = float(want_panic)
            capacity = max(ready, 1) * p.target
            if n_panic and panic_avg > 0 and panic_avg >= p.panic_threshold * capacity:
                self._panic_until = now + p.stable_window_s
            if now < self._panic_until:
                mode = "panic"
                want = max(want_panic, want_stable, current)
                reason = (f"panic: {p.metric} {panic_avg:.2f} over the last {p.panic_window_s:g}s is >= "
                          f"{p.panic_threshold:g}x the ready capacity {capacity:g}; wants {want}, never fewer")
            else:
                want = want_stable
                reason = (f"{p.metric} {stable:.2f} averaged over {p.stable_window_s:g}s at a target of "
                          f"{p.target:g} per replica wants {want}")

        # 3: predictive warm-up
        if p.predictive and forecast_upper is not None and p.metric != "ttft":
            want_forecast = math.ceil(round(max(0.0, forecast_upper) / p.target, 9))
            signals["want_forecast"] = float(want_forecast)
            if want_forecast > want:
                want = want_forecast
                mode = "predictive"
                reason = (f"forecast upper {forecast_upper:.2f} {p.metric} at now + lead time "
                          f"({cold_start_s:g}s cold start) wants {want} replicas ahead of demand")

        bound_by = ""
        # 4: scale-up rate and stabilization
        if want > current:
            cap = math.ceil(p.max_scale_up_rate * max(ready, 1))
            if want > cap and current > 0:
                want = max(cap, current)
                bound_by = "stabilization"
                reason += f"; scale-up limited to {p.max_scale_up_rate:g}x the ready replicas"
        if not self._decided:
            self._decided = True
            self._wants.append((now, current))      # what it found: its first scale-down waits the delay
        self._wants.append((now, want))
        if mode != "panic" and want < current and down_delay > 0:
            recent = max(w for t, w in self._wants if t >= now - down_delay)
            if recent > want:
                want = min(recent, current)
                bound_by = "stabilization"
                reason += f"; scale-down held at {want}, the highest want of the last {down_delay:g}s"
        if want > current and p.scale_up_delay_s > 0 and current > 0:
            lowest = min(w for t, w in self._wants if t >= now - p.scale_up_delay_s)
            if lowest < want:
                want = max(lowest, current)
                bound_by = "stabilization"
                reason += f"; scale-up waits {p.scale_up_delay_s:g}s of steady wants"

        # 5: scale to zero and from zero
        floor_replicas = p.min_replicas
        idle_s = now - (self._last_request_t if self._last_request_t is not None
                        else (self._first_t if self._first_t is not None else now))
        signals["idle_s"] = round(idle_s, 3)
        if p.min_replicas == 0:
            if p.scale_to_zero_after_s <= 0:
                floor_replicas = 1
            elif idle_s >= p.scale_to_zero_after_s and mode != "panic":
                want = 0
                if current > 0:
                    mode = "idle"
                    reason = f"no requests for {idle_s:.0f}s (>= {p.scale_to_zero_after_s:g}s): scaling to zero"
            elif want == 0:
                want = max(1 if current > 0 else 0, 0)
                if want:
                    reason = (f"no demand for {idle_s:.0f}s, under the {p.scale_to_zero_after_s:g}s "
                              f"scale-to-zero grace: keeping one replica")
        if current == 0 and demand_now and want < 1:
            want = 1
            mode = "stable" if mode == "idle" else mode
            reason = "demand at zero replicas: starting one at once"

        # 6: bounds
        if want < floor_replicas:
            want = floor_replicas
            bound_by = "min"
        if want > p.max_replicas:
            want = p.max_replicas
            bound_by = "max"
            reason += f"; capped at max_replicas {p.max_replicas}"
        if p.cost_ceiling_per_hour > 0 and replica_cost_per_hour > 0:
            affordable = math.floor(round(p.cost_ceiling_per_hour / replica_cost_per_hour, 9))
            signals["affordable"] = float(affordable)
            if want > affordable:
                want = affordable
                bound_by = "cost_ceiling"
                reason += (f"; the cost ceiling ${p.cost_ceiling_per_hour:g}/h at ${replica_cost_per_hour:g}/h "
                           f"per replica allows {affordable}")
        if pool_room is not None:
            room = current + max(0, pool_room)
            signals["pool_room"] = float(pool_room)
            if want > room:
                want = room
                bound_by = "pool"
                reason += f"; the pool has room for {max(0, pool_room)} more, so {room}"
        want = max(0, want)
        if want == current and mode == "stable" and bound_by == "":
            reason += " (no change)"
        return Decision(desired=want, mode=mode, reason=reason + ".", bound_by=bound_by, signals=signals)


def choose_variant(variants_fit: list[tuple[str, bool]]) -> str | None:
    """The first variant that fits (``[(name, fits), ...]`` in the policy's preference order), else None."""
    for name, fits in variants_fit:
        if fits:
            return name
    return None

"""The gpu-aware policy's cost model: expected completion time (ECT) per replica, and the expected wait for
a slot when none is free.

- Service time S(c): what one request costs on the replica: its own EMA time to first token plus EMA time
  per output token × the request's max_tokens; a replica not measured yet takes the median of those that
  are (1 s when none is). A GPU in the throttling band is slower by the clock ratio it runs at
  (`throttle_speed`, 0.85: an H100's SM clock at 85 °C), a critical one by `critical_speed`; the slowdown
  is applied as (1/speed)^weight_thermal on top of the EMA (which lags a GPU that has just heated up).
- ECT(c) = S(c) × (1 + weight_inflight × in flight / slots + weight_backend_queue × (backend waiting /
  slots + KV use)) × risk(c): least-loaded with speed awareness. risk = 1 + weight_pressure × 0.25 at
  high memory pressure + weight_failures × recent failures / 5: a GPU near its memory limit or a replica
  that just failed costs a little more, it is not left out.
- expected_wait: when no usable replica has a free slot, slots free up at Σ slots/S(c) per second over
  the usable replicas; a request with `ahead` requests in front of it waits about (ahead + 1) / that rate.
  Infinite when no replica is usable (every GPU critical, every circuit open): only the fleet changing
  can help then.
"""

from __future__ import annotations

import math
import statistics

PRESSURE_RISK = {"low": 0.0, "normal": 0.0, "high": 0.25, "critical": 1.0}


def speed(c, cfg) -> float:
    """The replica's relative compute speed from its GPU's thermal state (1.0: full clocks)."""
    if c.thermal == "throttling":
        return cfg.throttle_speed
    if c.thermal == "critical":
        return cfg.critical_speed
    return 1.0


def _own(c, max_tokens: int) -> float | None:
    s = c.stats
    if s.ttft_ema is None and s.tpot_ema is None:
        return None
    return (s.ttft_ema or 0.0) + (s.tpot_ema or 0.0) * max_tokens


def base_service(c, max_tokens: int, pool, cfg) -> float:
    """Seconds one request of `max_tokens` takes on c at the speed it was measured at."""
    if cfg.weight_latency <= 0:
        return 1.0
    mine = _own(c, max_tokens)
    if mine is not None and mine > 0:
        return mine
    known = [e for e in (_own(x, max_tokens) for x in pool) if e is not None and e > 0]
    return statistics.median(known) if known else 1.0


def service_time(c, max_tokens: int, pool, cfg) -> float:
    """Expected seconds of one request on c now: measured service time, slowed by the GPU's thermal state."""
    return base_service(c, max_tokens, pool, cfg) * (1.0 / speed(c, cfg)) ** cfg.weight_thermal


def risk(c, cfg) -> float:
    return (1.0 + cfg.weight_pressure * PRESSURE_RISK.get(c.pressure, 0.0)
            + cfg.weight_failures * min(c.stats.recent_failures, 5.0) / 5.0)


def completion(c, max_tokens: int, pool, cfg) -> float:
    """Expected completion time of a request sent to c now (seconds, risk-weighted): the score."""
    queue = cfg.weight_inflight * c.stats.in_flight / c.limit
    backend = cfg.weight_backend_queue * ((c.replica.waiting or 0) / c.limit + (c.replica.kv_usage or 0.0))
    return service_time(c, max_tokens, pool, cfg) * (1.0 + queue + backend) * risk(c, cfg)


def expected_wait(usable, max_tokens: int, pool, cfg, ahead: int) -> float:
    """Seconds until a slot on one of `usable` frees for a request with `ahead` requests before it."""
    if not usable:
        return math.inf
    if any(c.free for c in usable):
        return 0.0
    rate = sum(c.limit / service_time(c, max_tokens, pool, cfg) for c in usable)
    return (ahead + 1) / rate if rate > 0 else math.inf


def first_token(usable, pool, cfg) -> float:
    """Expected time to first token on the best usable replica (0 when nothing is measured): what a
    deadline on the first token leaves for waiting is the deadline minus this."""
    ttfts = [c.stats.ttft_ema / speed(c, cfg) for c in usable if c.stats.ttft_ema is not None]
    return min(ttfts) if ttfts else 0.0

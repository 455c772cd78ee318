"""The gpu-aware policy's cost model: expected completion time (ECT) per replica, and the expected wait for
a slot when none is free.

- Service time S(c): what one request costs on the replica: its own EMA time to first token plus EMA time
  per output token × the request's max_tokens; a replica not measured yet takes the median of those that
  are (1 s when none is). A GPU's thermal slowdown is counted once: a replica measured while throttled
  already shows it in its EMA, so the thermal factor ((1/speed)^weight_thermal, `throttle_speed` 0.85: an
  H100's SM clock at 85 °C; `critical_speed` in the critical band) applies only to a replica that has no
  measurement of its own and borrows the pool's median (which was measured at full clocks).
- ECT(c) = S(c) × (1 + weight_inflight × in flight / slots + weight_backend_queue × (backend waiting /
  slots + KV use)) × risk(c): least-loaded with speed awareness. risk = 1 + weight_pressure × state risk +
  weight_failures × recent failures / 5: the expected cost of a request that fails there and is served
  again elsewhere, in service times. The state risk of a GPU at high memory pressure or critical memory or
  temperature is, with `risk_pricing` observed (the default), P(a request sent there fails) × failure_cost,
  P being the failure rate the gateway observed on replicas in that state (hazard.py) with a prior of the
  fixed risk / failure_cost; with `risk_pricing` fixed it is the fixed risk below (0.25 high, 3.0 critical)
  whatever happens there. A fresh gateway prices both ways alike. A GPU near its memory limit or a replica
  that just failed costs more; it is not left out (the policy weighs it against waiting for a sound one).
- A replica's service time is at least the age of its oldest in-flight request: the EMA learns only when a
  request ends, so a replica that suddenly became slow would otherwise look fast for as long as it is slow.
- expected_wait: when no usable replica has a free slot, slots free up at Σ slots/S(c) per second over
  the usable replicas; a request with `ahead` requests in front of it waits about (ahead + 1) / that rate.
  Infinite when no replica is usable (every GPU critical, every circuit open): only the fleet changing
  can help then.
"""

from __future__ import annotations

import math
import statistics

# The risk a GPU state adds, in service times, before any request there is seen (risk_pricing fixed: always).
# A GPU at critical memory fails allocations (the backend dies of a CUDA OOM, docs/gateway.md); one at
# critical temperature runs at a fraction of its clocks or shuts down; either way a request there may fail
# and run again, and the replica be gone for a restart: 3 service times more (x4), i.e. with failure_cost 3,
# "a request there fails" until the gateway has seen otherwise. Throttling adds none: its slowdown is measured.
PRESSURE_RISK = {"low": 0.0, "normal": 0.0, "high": 0.25, "critical": 3.0}
THERMAL_RISK = {"normal": 0.0, "warning": 0.0, "throttling": 0.0, "critical": 3.0}


def risk_state(pressure: str, thermal: str) -> str:
    """The risky part of a GPU's state, the key its observed failures are kept under ("" when sound:
    nothing is counted there, a sound replica's failures are the recent-failures term and the breaker)."""
    parts = []
    if PRESSURE_RISK.get(pressure, 0.0) > 0:
        parts.append(f"memory-{pressure}")
    if THERMAL_RISK.get(thermal, 0.0) > 0:
        parts.append(f"thermal-{thermal}")
    return "+".join(parts)


def fixed_risk(pressure: str, thermal: str) -> float:
    return max(PRESSURE_RISK.get(pressure, 0.0), THERMAL_RISK.get(thermal, 0.0))


def failure_prior(state: str, cfg) -> float:
    """The prior probability that a request sent to a replica in `state` (a risk_state key) fails: the fixed
    risk / failure_cost, at most 1."""
    fixed = 0.0
    for part in state.split("+") if state else ():
        kind, _, lvl = part.partition("-")
        fixed = max(fixed, (PRESSURE_RISK if kind == "memory" else THERMAL_RISK).get(lvl, 0.0))
    return min(1.0, fixed / cfg.failure_cost)


def state_risk(c, cfg) -> float:
    """Expected extra cost, in service times, of sending a request to c in its GPU's state: fixed, or the
    observed failure probability there × failure_cost (prior: the fixed risk / failure_cost, at most 1)."""
    fixed = fixed_risk(c.pressure, c.thermal)
    if fixed <= 0 or cfg.risk_pricing == "fixed":
        return fixed
    prior = min(1.0, fixed / cfg.failure_cost)       # = failure_prior(the state's key): no key to parse here
    return c.stats.failure_probability(risk_state(c.pressure, c.thermal), prior) * cfg.failure_cost


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
    """Expected seconds of one request on c now: its own measured service time (which already holds any
    thermal slowdown it was measured under); unmeasured, the pool's median slowed by its thermal state. At
    least as long as its oldest in-flight request has run: a replica that became slow (the machine, the
    GPU) shows it there before its EMA learns it."""
    mine = _own(c, max_tokens) if cfg.weight_latency > 0 else None
    if mine is None or mine <= 0:
        mine = base_service(c, max_tokens, pool, cfg) * (1.0 / speed(c, cfg)) ** cfg.weight_thermal
    age = c.stats.oldest_age() if cfg.weight_latency > 0 else 0.0
    return max(mine, age)


def risk(c, cfg) -> float:
    return (1.0 + cfg.weight_pressure * state_risk(c, cfg)
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
    ttfts = [c.stats.ttft_ema for c in usable if c.stats.ttft_ema is not None]
    return min(ttfts) if ttfts else 0.0

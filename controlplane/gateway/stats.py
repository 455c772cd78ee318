"""What the gateway measures per replica: EMA time to first token and per output token, its own in-flight
count (fresher than a backend's /metrics), recent failures, the circuit breaker, and the requests and failures
it saw while the replica's GPU was in each risky state (hazard.py: the observed failure risk)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from controlplane.gateway.breaker import CircuitBreaker
from controlplane.gateway.hazard import HazardBook


@dataclass
class ReplicaStats:
    breaker: CircuitBreaker
    alpha: float = 0.3
    ttft_ema: float | None = None      # seconds
    tpot_ema: float | None = None      # seconds per output token
    in_flight: int = 0
    requests: int = 0
    failures: int = 0                  # total
    _recent: float = 0.0               # recent failures: halves on each success and every half_life seconds
    served: int = 0
    half_life: float = 10.0
    clock: object = time.monotonic
    _recent_at: float = 0.0
    starts: deque = field(default_factory=deque)     # time.monotonic() each in-flight request took its slot
    book: HazardBook = field(default_factory=HazardBook)        # the fleet's (StatsTable shares one)
    by_state: dict = field(default_factory=dict)     # risky GPU state -> hazard.Evidence of this replica in it

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds the oldest in-flight request has run (0 when none): a replica that suddenly became slow
        shows it here long before its EMA, which learns only when a request ends."""
        if not self.starts:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.starts[0])

    @property
    def recent_failures(self) -> float:
        """Failures lately, decayed by half per success and per `half_life` seconds (a replica that failed
        and came back is not held against for ever while nothing is sent to it)."""
        if self._recent <= 0:
            return 0.0
        now = self.clock()
        self._recent *= 0.5 ** (max(0.0, now - self._recent_at) / self.half_life)
        self._recent_at = now
        if self._recent < 0.01:
            self._recent = 0.0
        return self._recent

    @recent_failures.setter
    def recent_failures(self, value: float) -> None:
        self._recent, self._recent_at = value, self.clock()

    def observe(self, ttft: float | None, tpot: float | None) -> None:
        a = self.alpha
        if ttft is not None:
            self.ttft_ema = ttft if self.ttft_ema is None else a * ttft + (1 - a) * self.ttft_ema
        if tpot is not None and tpot > 0:
            self.tpot_ema = tpot if self.tpot_ema is None else a * tpot + (1 - a) * self.tpot_ema

    def ok(self, state: str = "") -> None:
        """A request served; `state`: the risky GPU state the replica was in when it was sent ("" sound: not
        counted in the observed failure risk)."""
        self.served += 1
        self.recent_failures /= 2
        self.breaker.success()
        if state:
            self.book.record(self.by_state, state, failed=False)

    def failed(self, unreachable: bool = False, state: str = "") -> None:
        """A failed request; `unreachable`: the connection was refused or cut (the circuit opens at once);
        `state` as in ok()."""
        self.failures += 1
        self.recent_failures += 1
        if state:
            self.book.record(self.by_state, state, failed=True)
        if unreachable:
            self.breaker.trip()
        else:
            self.breaker.failure()

    def failure_probability(self, state: str, prior: float) -> float:
        """The observed probability that a request sent here while its GPU is in `state` fails (hazard.py)."""
        return self.book.estimate(self.by_state, state, prior)


@dataclass
class StatsTable:
    failures: int = 3
    open_seconds: float = 5.0
    alpha: float = 0.3
    failure_half_life: float = 10.0
    book: HazardBook = field(default_factory=HazardBook)       # observed failure risk per GPU state
    by_replica: dict[str, ReplicaStats] = field(default_factory=dict)

    def of(self, key: str) -> ReplicaStats:
        s = self.by_replica.get(key)
        if s is None:
            s = self.by_replica[key] = ReplicaStats(CircuitBreaker(self.failures, self.open_seconds), self.alpha,
                                                          half_life=self.failure_half_life, book=self.book)
        return s

    def forget_except(self, keys: set[str]) -> None:
        for k in list(self.by_replica):
            if k not in keys and self.by_replica[k].in_flight == 0:
                del self.by_replica[k]

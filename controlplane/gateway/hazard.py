"""The failure rate the gateway observes on replicas whose GPU is in a risky state (critical memory or
temperature, high memory), per state, as the probability that a request sent there fails (a crash, a cut
stream, a 5xx, a refused connection).

The estimate is the posterior mean of a Beta-Binomial model with partial pooling over the fleet:

- prior: p0 per state, given by the caller (cost.py: today's fixed risk / failure_cost, so a fresh gateway
  prices a risky replica exactly as the fixed rule did), weighted as `prior_requests` requests of evidence;
- the other replicas in the same state: others = (n0·p0 + F_others) / (n0 + N_others);
- the replica itself, shrunk toward the others: p = (n0·others + f) / (n0 + n);

where f, n (F, N) are failures and requests counted while the replica (the others) was in that state when
the request was sent. Every count decays by half every `half_life` seconds (exponential forgetting), so
without new evidence the estimate returns to the prior: a GPU's condition changes, and a replica that is no
longer sent requests is not judged for ever by what it did long ago. Evidence is kept per state and never
reset when the GPU's state changes: a replica that failed while critical is still known for it when its GPU
turns critical again (decayed by the time in between).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Evidence:
    """Decayed counts of requests and failures in one state (of one replica, or of the whole fleet)."""
    failures: float = 0.0
    requests: float = 0.0
    at: float = 0.0                  # clock time the counts were last decayed to

    def decay(self, now: float, half_life: float) -> None:
        if now > self.at:
            k = 0.5 ** ((now - self.at) / half_life)
            self.failures *= k
            self.requests *= k
            self.at = now
            if self.requests < 1e-6:
                self.failures = self.requests = 0.0


class HazardBook:
    """The fleet's evidence per state, and the estimate for one replica (its own evidence is kept in its
    ReplicaStats and handed in, so it goes when the replica goes; the fleet's stays)."""

    def __init__(self, prior_requests: float = 3.0, half_life: float = 300.0, clock=time.monotonic) -> None:
        if prior_requests <= 0 or half_life <= 0:
            raise ValueError("prior_requests and half_life must be positive")
        self.prior_requests = prior_requests
        self.half_life = half_life
        self.clock = clock
        self.fleet: dict[str, Evidence] = {}

    def record(self, own: dict[str, Evidence], state: str, failed: bool) -> None:
        """One request sent to a replica while its GPU was in `state` ended: failed or served."""
        now = self.clock()
        for book in (own, self.fleet):
            ev = book.get(state)
            if ev is None:
                ev = book[state] = Evidence(at=now)
            ev.decay(now, self.half_life)
            ev.requests += 1.0
            ev.failures += 1.0 if failed else 0.0

    def _counts(self, book: dict[str, Evidence], state: str, now: float) -> tuple[float, float]:
        ev = book.get(state)
        if ev is None:
            return 0.0, 0.0
        ev.decay(now, self.half_life)
        return ev.failures, ev.requests

    def estimate(self, own: dict[str, Evidence], state: str, prior: float) -> float:
        """Probability that a request sent to this replica in `state` fails (posterior mean)."""
        now = self.clock()
        n0 = self.prior_requests
        f, n = self._counts(own, state, now)
        fa, na = self._counts(self.fleet, state, now)
        fo, no = max(fa - f, 0.0), max(na - n, 0.0)     # the other replicas' evidence in this state
        others = (n0 * prior + fo) / (n0 + no)
        return min(1.0, max(0.0, (n0 * others + f) / (n0 + n)))

    def evidence(self, own: dict[str, Evidence]) -> dict[str, dict]:
        """{state: {"requests", "failures"}} of one replica now (decayed), for the status endpoint."""
        now = self.clock()
        out = {}
        for state in sorted(own):
            f, n = self._counts(own, state, now)
            out[state] = {"requests": round(n, 2), "failures": round(f, 2)}
        return out

"""How many replicas a request rate needs, by queueing theory (the predictive policy's sizing rule in
`meshctl bench autoscale`).

A forecast gives a mean rate per bucket (a minute); inside the bucket arrivals are Poisson, so the
concurrency a rate ``lam`` brings with a time in system ``S`` is Poisson with mean ``a = lam x S`` (the
M/G/inf occupancy), and a replica serves ``slots`` requests at once. Three rules, each the smallest replica
count ``n`` that meets it:

- ``little``: ``n = ceil(a / target)``, Little's law: the mean concurrency at a per-replica target, no
  allowance for bursts inside the bucket (what the predictive policy used before).
- ``poisson``: ``P(concurrency > n x slots) <= 1 - quantile`` with concurrency ~ Poisson(a): every request
  finds a free slot but for the tail (``scipy.stats.poisson.ppf``).
- ``erlang``: M/M/c with ``c = n x slots`` servers (Erlang C): ``P(wait > wait_s) <= 1 - quantile``, where
  ``P(wait > t) = C(c, a) x exp(-(c - a) t / S)``; ``wait_s`` is the SLO's room for queueing (the TTFT
  objective minus the TTFT on a free slot). This is the rule that matches the SLO: a request may wait,
  just not longer than the objective allows.

    erlang_replicas(rate=2.0, service_s=5.7, slots=1, wait_s=6.3, quantile=0.99)
    poisson_replicas(rate=2.0, service_s=5.7, slots=1, quantile=0.99)
"""

from __future__ import annotations

import math

from scipy.stats import poisson

from mesh.autoscale.types import SIZINGS

RULES = SIZINGS         # the rules a policy's `sizing` names (mesh/autoscale/types.py)


def _check(rate: float, service_s: float, slots: int, quantile: float | None = None) -> None:
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate {rate!r}: must be a finite number >= 0")
    if not (math.isfinite(service_s) and service_s > 0):
        raise ValueError(f"service_s {service_s!r}: must be > 0")
    if slots < 1:
        raise ValueError(f"slots {slots!r}: must be >= 1")
    if quantile is not None and not 0 < quantile < 1:
        raise ValueError(f"quantile {quantile!r}: must be between 0 and 1")


def little_replicas(rate: float, service_s: float, target: float) -> int:
    """ceil(rate x service time / target): the mean concurrency at ``target`` per replica."""
    _check(rate, service_s, 1)
    if target <= 0:
        raise ValueError(f"target {target!r}: must be > 0")
    return math.ceil(round(rate * service_s / target, 9))


def poisson_replicas(rate: float, service_s: float, slots: int, quantile: float, limit: int | None = None) -> int:
    """The fewest replicas whose slots hold the ``quantile`` of a Poisson(rate x service) concurrency
    (at most ``limit`` when given)."""
    _check(rate, service_s, slots, quantile)
    a = rate * service_s
    if a == 0:
        return 0
    n = math.ceil(int(poisson.ppf(quantile, a)) / slots)
    return n if limit is None else min(n, limit)


def erlang_c(servers: int, load: float) -> float:
    """P(an arrival waits) in M/M/c with ``servers`` servers and offered load ``load`` (Erlangs); 1 when the
    servers cannot carry it (load >= servers). Erlang B by its stable recursion, then C from B."""
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


def wait_exceeds(servers: int, load: float, service_s: float, wait_s: float) -> float:
    """P(wait > wait_s) in M/M/c: C(c, a) x exp(-(c - a) x wait_s / S)."""
    c = erlang_c(servers, load)
    if c >= 1.0:
        return 1.0
    return c * math.exp(-(servers - load) * wait_s / service_s)


def erlang_replicas(rate: float, service_s: float, slots: int, wait_s: float, quantile: float,
                    limit: int | None = None) -> int:
    """The fewest replicas (``slots`` servers each) so that P(a request waits longer than ``wait_s``) <=
    1 - ``quantile`` at Poisson ``rate`` and mean time in service ``service_s``; with ``limit``, at most
    that many (the search stops there: each step costs O(servers), so an unbounded load would cost
    O(load^2))."""
    _check(rate, service_s, slots, quantile)
    if not (math.isfinite(wait_s) and wait_s >= 0):
        raise ValueError(f"wait_s {wait_s!r}: must be a finite number >= 0")
    a = rate * service_s
    if a == 0:
        return 0
    n = max(1, math.floor(a / slots))
    if limit is not None and n >= limit:
        return limit
    while wait_exceeds(n * slots, a, service_s, wait_s) > 1 - quantile:
        n += 1
        if limit is not None and n >= limit:
            return limit
    return n


def replicas_for(rule: str, rate: float, service_s: float, *, slots: int = 1, target: float = 1.0,
                 wait_s: float = 0.0, quantile: float = 0.99, limit: int | None = None) -> int:
    """Dispatch on ``rule`` (one of RULES); ``limit``: at most that many replicas."""
    if rule == "erlang":
        return erlang_replicas(rate, service_s, slots, wait_s, quantile, limit)
    if rule == "poisson":
        return poisson_replicas(rate, service_s, slots, quantile, limit)
    if rule == "little":
        n = little_replicas(rate, service_s, target)
        return n if limit is None else min(n, limit)
    raise ValueError(f"sizing rule {rule!r}: allowed {', '.join(RULES)}")

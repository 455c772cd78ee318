"""The predictive policy's sizing rules (mesh/autoscale/sizing.py): Erlang C against its textbook sum, the
fewest replicas whose wait tail meets the quantile, Poisson concurrency, Little's law, and bad arguments named."""

from __future__ import annotations

import pytest


def _erlang_c_closed_form(c: int, a: float) -> float:
    """Erlang C by its textbook sum: (a^c/c! x c/(c-a)) / (sum_{k<c} a^k/k! + a^c/c! x c/(c-a))."""
    import math
    top = a ** c / math.factorial(c) * c / (c - a)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def test_erlang_c_matches_the_textbook_values() -> None:
    from mesh.autoscale.sizing import erlang_c
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)                     # M/M/2 at a = 1 Erlang
    for c, a in ((5, 3.2), (12, 9.7), (30, 25.0)):
        assert erlang_c(c, a) == pytest.approx(_erlang_c_closed_form(c, a), rel=1e-9)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 0.0) == 0.0        # overloaded: everyone waits; idle: nobody


@pytest.mark.parametrize("rate,service,slots,wait,q", [(0.92, 5.66, 1, 6.36, 0.97), (2.88, 5.66, 1, 6.36, 0.99),
                                                       (4.0, 2.0, 4, 0.5, 0.95), (0.05, 5.66, 1, 6.36, 0.97)])
def test_erlang_replicas_is_the_fewest_whose_wait_tail_meets_the_quantile(rate, service, slots, wait, q) -> None:
    import math
    from mesh.autoscale.sizing import erlang_replicas
    a = rate * service

    def tail(n: int) -> float:                                        # P(wait > wait_s), M/M/(n x slots)
        c = n * slots
        return 1.0 if c <= a else _erlang_c_closed_form(c, a) * math.exp(-(c - a) * wait / service)

    n = erlang_replicas(rate, service, slots, wait, q)
    assert tail(n) <= 1 - q
    assert n == 1 or tail(n - 1) > 1 - q
    assert n * slots > a                                               # never below the mean load


def test_poisson_replicas_hold_the_quantile_of_poisson_concurrency() -> None:
    import math
    from mesh.autoscale.sizing import poisson_replicas
    a = 2.0 * 5.0                                                      # 2 requests/s x 5 s in service
    cdf, k = 0.0, 0
    while True:                                                        # smallest k with P(N <= k) >= 0.99
        cdf += math.exp(-a) * a ** k / math.factorial(k)
        if cdf >= 0.99:
            break
        k += 1
    assert k == 18
    assert poisson_replicas(2.0, 5.0, 1, 0.99) == 18
    assert poisson_replicas(2.0, 5.0, 4, 0.99) == math.ceil(18 / 4)
    assert poisson_replicas(0.0, 5.0, 1, 0.99) == 0


def test_sizing_rules_refuse_bad_arguments_naming_them() -> None:
    from mesh.autoscale.sizing import erlang_replicas, little_replicas, poisson_replicas, replicas_for
    assert little_replicas(2.0, 5.0, 0.7) == 15                        # ceil(10 / 0.7)
    with pytest.raises(ValueError, match="quantile"):
        erlang_replicas(1.0, 5.0, 1, 6.0, 1.0)
    with pytest.raises(ValueError, match="rate"):
        poisson_replicas(-1.0, 5.0, 1, 0.9)
    with pytest.raises(ValueError, match="wait_s"):
        erlang_replicas(1.0, 5.0, 1, -1.0, 0.9)
    with pytest.raises(ValueError, match="service_s"):
        erlang_replicas(1.0, 0.0, 1, 1.0, 0.9)
    with pytest.raises(ValueError, match="allowed erlang, poisson, little"):
        replicas_for("guess", 1.0, 5.0)

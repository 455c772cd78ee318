"""`meshctl bench autoscale`'s simulation (mesh/autoscale/simulate.py): its accounting of TTFT, SLO misses, cold
starts and slice time on series small enough to check by hand, and the fixed policy's peak by Little's law."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.autoscale.latency import LatencyModel
from mesh.autoscale.scalers import FixedScaler, peak_replicas
from mesh.autoscale.simulate import simulate


HAND = LatencyModel(prefill_base_s=0.1, prefill_per_token_s=0.0, decode_per_token_s=0.9, load_s=4.0,
                    slice_create_s=1.0, slots=1, prompt_tokens=1, max_tokens=2)   # TTFT 0.1 s, service 1.0 s


class Always:
    def __init__(self, n: int) -> None:
        self.n = n

    def scale(self, now, sample, *, ready, starting):
        return self.n


def test_accounting_on_a_tiny_series_with_a_warm_replica() -> None:
    r = simulate(np.array([0.0, 0.5, 3.0]), HAND, FixedScaler(1), slo_ttft_s=0.5, end_s=10.0, tick_s=2.0,
                 initial_replicas=1, warm_start=True)
    # request 0: TTFT 0.1; request 1 waits for request 0 (until 1.0): 0.6, misses the 0.5 SLO; request 2: 0.1
    assert r.requests == 3 and r.met_slo == 2 and r.slo_attainment == pytest.approx(2 / 3)
    assert r.ttft_s == pytest.approx([0.1, 0.6, 0.1])
    assert r.slice_seconds == pytest.approx(10.0) and r.slice_hours == pytest.approx(10 / 3600)
    assert r.cold_start_misses == 0 and r.scale_events == 0


def test_a_request_that_waits_for_a_cold_start_is_a_miss_and_the_slice_pays_from_the_decision() -> None:
    r = simulate(np.array([1.0]), HAND, Always(1), slo_ttft_s=0.5, end_s=10.0, tick_s=2.0)
    # the tick at 2 s starts a replica (cold start 5 s): ready at 7, the request's TTFT = 7 - 1 + 0.1
    assert r.ttft_s == pytest.approx([6.1]) and r.met_slo == 0
    assert r.cold_start_misses == 1 and r.scale_events == 1
    assert r.slice_seconds == pytest.approx(8.0)               # from 2 s to the end at 10 s


def test_scale_down_drains_busy_replicas_and_pays_until_they_leave() -> None:
    class Down:
        def scale(self, now, sample, *, ready, starting):
            return 2 if now < 4 else 1

    # two warm replicas, both busy from 3.5 to 4.5 when the tick at 4 s wants one: one drains, leaves at 4.5
    r = simulate(np.array([3.5, 3.5]), HAND, Down(), slo_ttft_s=1.0, end_s=6.0, tick_s=2.0,
                 initial_replicas=2, warm_start=True)
    assert r.met_slo == 2 and r.slice_seconds == pytest.approx(6.0 + 4.5)


def test_peak_replicas_by_littles_law() -> None:
    assert peak_replicas(3.0, 1.0, 0.7, 64) == 5          # 3 req/s x 1 s = 3 in flight / 0.7 per replica
    assert peak_replicas(100.0, 1.0, 1.0, 8) == 8
    assert peak_replicas(0.0, 1.0, 1.0, 8) == 1

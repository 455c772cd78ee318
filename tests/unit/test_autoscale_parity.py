"""The live autoscaler controller and `meshctl bench autoscale` run one decision code (mesh/autoscale/planner.py).

A table of policies, each driven through the controller (controlplane/controllers/autoscaler.py over the
in-memory deployment manager of test_autoscaler_controller.py: its samples come from the replicas' load
readings, its service figures are measured, its forecast comes from the forecasting step) and through the
bench's scaler (mesh/autoscale/scalers.AutoscalerScaler with the calibration's figures) on the same samples
and the same forecast rates: every decision is equal. Then that catch-up and the nowcast act in the controller.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from controlplane.controllers import autoscale_forecast
from controlplane.controllers.autoscaler import AutoscalerController
from gpumesh.v1 import types_pb2 as T
from mesh.autoscale.planner import RateBuckets, ServiceFigures
from mesh.autoscale.scalers import AutoscalerScaler, ForecastLog
from mesh.autoscale.sizing import erlang_replicas
from mesh.autoscale.types import Sample
from tests.unit.test_autoscaler_controller import Manager, deployment, replica

SERVICE_S = 5.66            # time in service of a request
TTFT_S = 0.44               # TTFT on a free slot: 6.8 s objective - 0.44 s = 6.36 s of room to queue
TICK_S = 2.0
# requests per second in each 60 s bucket: calm, a jump the forecast does not see, then a drop
RATES = [1.0] * 30 + [3.0] * 30 + [0.5] * 60
FORECAST = [None] * 10 + [1.5] * 110           # the forecast's upper rate at each step (None: no fit yet)


class _Forecast:
    """The bench's forecaster with the table's rates (the controller gets the same from its forecasting step)."""

    def __init__(self) -> None:
        self.buckets = RateBuckets(60.0)
        self.bucket_s = 60.0
        self.log = ForecastLog()
        self.step = 0

    def upper_rate(self, now):
        return FORECAST[self.step]


def _load(t: float, rate: float, total: float) -> T.BackendLoad:
    load = T.BackendLoad(workload_id="w-1", scraped=True, requests_running=rate * SERVICE_S, requests_total=total,
                         ttft_seconds=TTFT_S)
    load.at.FromNanoseconds(int(t * 1e9))
    return load


async def _run(monkeypatch, cold_start_s: float, **policy) -> tuple[list, list]:
    """(the controller's decisions, the bench scaler's) over RATES, on the same samples and forecasts."""
    step = [0]

    async def upper(history, name, series, lead_s, quantile, step_floor, since=0.0):
        assert series == "request_rate"                     # what the controller forecasts
        k = step[0] + 1                                     # the fit started now is used on the next pass
        return (FORECAST[k] if k < len(FORECAST) else None), "table"
    monkeypatch.setattr(autoscale_forecast, "upper", upper)
    r, _ = replica(1)
    policy = {"target": 1.0, **policy}
    d = deployment(2, min_replicas=1, max_replicas=64, predictive=True, scale_down_delay_s=120,
                   panic_threshold=100, max_scale_up_rate=100, **policy)
    dm = Manager(d, [r])
    clock = [TICK_S]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=0,
                               default_cold_start=cold_start_s, interval=TICK_S)
    total = 0.0
    live, bench = [], []
    scaler = None
    for k, rate in enumerate(RATES):
        step[0] = k
        t = TICK_S * (k + 1)
        clock[0] = t
        if k:
            total += rate * TICK_S
        dm.store.loads["r-1"] = _load(t, rate if k else 0.0, total)
        for i in range(2, len(dm.by_name["chat"]) + 1):    # the others read too, idle: r-1 reports the whole load
            dm.store.loads[f"r-{i}"] = T.BackendLoad(workload_id=f"w-{i}", scraped=True)
        decision = await ctl.one("chat")
        st = ctl.states["chat"]
        if st.forecasting is not None:
            await st.forecasting
        if scaler is None:
            scaler = AutoscalerScaler(st.policy, figures=ServiceFigures(SERVICE_S, TTFT_S, 1, cold_start_s),
                                      forecaster=_Forecast(), tick_s=TICK_S)
        sample: Sample = st.plan.samples[-1]                 # the sample the controller built from the loads
        scaler.forecaster.step = k
        want = scaler.scale(t, sample, ready=int(decision.signals["ready"]),
                            starting=int(decision.signals["starting"]))
        live.append(decision)
        bench.append((want, scaler.last))
        dm.by_name["chat"] = [replica(i)[0] for i in range(1, max(1, decision.desired) + 1)]   # all READY next pass
    return live, bench


CASES = {
    "erlang, catch-up, nowcast": (1.2, dict(slo_ttft_ms=6800)),
    "erlang, no catch-up": (1.2, dict(slo_ttft_ms=6800, catch_up=False)),
    "erlang, cold start past the room": (30.0, dict(slo_ttft_ms=6800)),
    "erlang q0.97, no nowcast": (1.2, dict(slo_ttft_ms=6800, sizing_quantile=0.97, nowcast=False)),
    "poisson": (10.0, dict(slo_ttft_ms=6800, sizing="poisson")),
    "little, no objective": (1.2, dict()),
    "kv_cache, little": (1.2, dict(metric="kv_cache", target=0.8)),
    "queue, little": (1.2, dict(metric="queue", target=2.0)),
    "kv_cache, erlang": (1.2, dict(metric="kv_cache", target=0.8, slo_ttft_ms=6800)),
    "ttft objective, erlang": (1.2, dict(metric="ttft", target=6800)),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_the_controller_decides_as_the_bench_on_the_same_samples(monkeypatch, case):
    cold, policy = CASES[case]
    live, bench = await _run(monkeypatch, cold, **policy)
    for k, (d, (want, b)) in enumerate(zip(live, bench)):
        assert (d.desired, d.mode, d.bound_by) == (want, b.mode, b.bound_by), (k, d.reason, b.reason)
        assert d.signals.get("forecast_upper") == b.signals.get("forecast_upper"), k
    if policy.get("metric") == "ttft":                       # the ratio rule takes no floor: none is made
        assert all("forecast_upper" not in d.signals for d in live)
        assert any("provisioned_rate" in d.signals for d in live)
    else:
        assert any(d.mode == "predictive" for d in live)      # the forecast floor acted, not only the load


async def test_catch_up_acts_in_the_controller(monkeypatch):
    on, _ = await _run(monkeypatch, 1.2, slo_ttft_ms=6800, sizing_quantile=0.97)
    off, _ = await _run(monkeypatch, 1.2, slo_ttft_ms=6800, sizing_quantile=0.97, catch_up=False)
    k = 40                                                   # in the jump, the floor sized for 3 requests/s
    assert on[k].signals["catch_up"] == 1.0 and on[k].signals["floor_quantile"] == 0.5
    assert off[k].signals["catch_up"] == 0.0 and off[k].signals["floor_quantile"] == 0.97
    assert on[k].desired == erlang_replicas(3.0, SERVICE_S, 1, 6.36, 0.5) < off[k].desired
    k = 95                                                   # the drop's minute is over (persistence held it)
    assert on[k].desired < on[89].desired                    # down at once, without the 120 s delay
    assert off[k].desired == off[89].desired and off[k].bound_by == "stabilization"


async def test_the_nowcast_acts_in_the_controller(monkeypatch):
    on, _ = await _run(monkeypatch, 1.2, slo_ttft_ms=6800)
    off, _ = await _run(monkeypatch, 1.2, slo_ttft_ms=6800, nowcast=False)
    k = 44                                                   # 30 s into the jump's minute: half of it passed
    assert on[k].signals["provisioned_rate"] == pytest.approx(3.0)         # the rate so far in the minute
    assert off[k].signals["provisioned_rate"] == pytest.approx(1.5)        # the forecast (above the last minute's 1)
    k = 33                                                   # 8 s in: too early for the nowcast
    assert on[k].signals["provisioned_rate"] == pytest.approx(1.5)


def test_the_controller_measures_the_time_in_service_and_the_free_slot_ttft():
    from mesh.autoscale.planner import measured_figures
    samples = [Sample(t=2, in_flight=4, request_rate=1, ttft_ms=900, queue=2),
               Sample(t=4, in_flight=8, request_rate=2, ttft_ms=500),
               Sample(t=6, in_flight=0, request_rate=0, ttft_ms=0)]
    f = measured_figures(samples, slots=2, cold_start_s=12.0)
    assert f == ServiceFigures(service_s=12 / 3, ttft_s=0.5, slots=2, cold_start_s=12.0)   # Little: 12 / 3
    assert measured_figures(samples, slots=0, cold_start_s=1.0, ttft_s=0.3).ttft_s == 0.3    # the registry's
    assert measured_figures(samples, slots=0, cold_start_s=1.0).slots == 1
    assert measured_figures(samples[2:], slots=1, cold_start_s=1.0) is None                 # no request seen yet


def test_a_replica_serves_its_backend_concurrency_at_once_but_one_on_llama_cpp():
    from controlplane.controllers import autoscale_signals
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import model_service_pb2 as M
    spec = D.DeploymentSpec(name="chat", backend=D.BackendSettings(concurrency=8))
    assert autoscale_signals.slots(spec, M.Variant(name="bf16", backend=M.BACKEND_VLLM)) == 8
    assert autoscale_signals.slots(spec, M.Variant(name="q4", backend=M.BACKEND_LLAMA_CPP)) == 1
    assert autoscale_signals.slots(D.DeploymentSpec(name="chat"), None) == 1


# -- the forecast floor's units and the scale-down delay (mesh/autoscale/planner.py) --------------------------

def _planner(metric: str, target: float, **policy):
    from mesh.autoscale.planner import Planner
    from mesh.autoscale.types import ScalingPolicy
    p = ScalingPolicy(min_replicas=1, max_replicas=64, metric=metric, target=target, predictive=True, **policy)
    return Planner(p, tick_s=TICK_S)


def _reactive_want(metric: str, target: float, sample: Sample) -> int:
    """What the reactive rule wants after a stable window of ``sample``."""
    from mesh.autoscale.autoscaler import Autoscaler
    from mesh.autoscale.types import ScalingPolicy
    a = Autoscaler(ScalingPolicy(min_replicas=1, max_replicas=64, metric=metric, target=target, panic_threshold=100,
                                 scale_down_delay_s=0))
    for k in range(1, 31):
        a.observe(dataclasses.replace(sample, t=TICK_S * k))
    return a.decide(TICK_S * 30, ready=sample.ready, starting=0).desired


@pytest.mark.parametrize("metric,target,slots", [("concurrency", 4.0, 4), ("concurrency", 3.0, 1),
                                                 ("kv_cache", 0.8, 16), ("kv_cache", 0.5, 1),
                                                 ("queue", 2.0, 4), ("queue", 0.5, 1), ("queue", 3.0, 16)])
def test_the_little_floor_wants_the_replicas_at_which_the_reactive_rule_holds_that_load(metric, target, slots):
    """At 10 requests/s x 2 s in service (20 in flight), the floor for that rate (no objective: Little's law)
    wants the fewest replicas m on which that load, spread over m replicas of ``slots`` slots, leaves the
    reactive rule wanting no more than m: the load's fluid picture in each metric's units (kv_cache: a
    replica's KV cache holds ``slots`` sequences; queue: what the slots cannot hold waits)."""
    rate, service = 10.0, 2.0
    a = rate * service

    def load(m: int) -> Sample:
        return Sample(t=0, in_flight=min(a, m * slots), queue=max(0.0, a - m * slots),
                      kv_cache=a / slots / m, request_rate=rate, ready=m)
    n = next(m for m in range(1, 65) if _reactive_want(metric, target, load(m)) <= m)
    plan = _planner(metric, target)
    plan.observe(Sample(t=TICK_S, request_rate=0.0, ready=n))                 # no load now: the floor alone
    d = plan.decide(TICK_S, ready=n, starting=0, figures=ServiceFigures(service, 0.0, slots, 1.0), forecast_rate=rate)
    assert d.signals["want_forecast"] == n, d.reason
    assert d.desired == n and d.mode == "predictive"


def test_a_kv_cache_floor_is_not_the_concurrency():
    """The review's case: kv_cache target 0.8 at 10 requests/s x 2 s on replicas of 16 slots wants 2, not 25."""
    plan = _planner("kv_cache", 0.8)
    plan.observe(Sample(t=TICK_S, ready=1))
    d = plan.decide(TICK_S, ready=1, starting=0, figures=ServiceFigures(2.0, 0.0, 16, 1.0), forecast_rate=10.0)
    assert d.signals["forecast_upper"] == pytest.approx(20 / 16) and d.signals["want_forecast"] == 2


@pytest.mark.parametrize("catch_up", [True, False])
def test_a_ttft_policy_keeps_its_scale_down_delay_with_catch_up(catch_up):
    """A ttft policy takes no forecast floor, so catch-up does not drop its scale-down delay: TTFT falling to
    0.2x the objective holds 4 replicas for the delay either way (a cold start of 1 s + a 2 s tick fits the
    objective's 9.5 s of room, so catch-up would be on with a floor to size)."""
    plan = _planner("ttft", 10000.0, scale_down_delay_s=300, stable_window_s=20, catch_up=catch_up)
    figures = ServiceFigures(service_s=4.0, ttft_s=0.5, slots=1, cold_start_s=1.0)
    assert not plan.catching_up(figures)
    assert _planner("concurrency", 1.0, slo_ttft_ms=10000.0, catch_up=catch_up).catching_up(figures) == catch_up
    t = 0.0
    for _ in range(20):                                       # at the objective: hold 4
        t += TICK_S
        plan.observe(Sample(t=t, in_flight=4, ttft_ms=10000, request_rate=1.0, ready=4))
        d = plan.decide(t, ready=4, starting=0, figures=figures, forecast_rate=1.0)
        assert d.desired == 4, d.reason
    for _ in range(30):                                       # 0.2x the objective for 60 s, well inside 300 s
        t += TICK_S
        plan.observe(Sample(t=t, in_flight=4, ttft_ms=2000, request_rate=1.0, ready=4))
        d = plan.decide(t, ready=4, starting=0, figures=figures, forecast_rate=1.0)
        assert d.desired == 4, d.reason
    assert d.bound_by == "stabilization" and d.signals["ttft_ratio"] == pytest.approx(0.2)
    assert "forecast_upper" not in d.signals and d.signals["catch_up"] == 0.0


def test_a_huge_forecast_sizes_no_further_than_max_replicas():
    """erlang's search stops at max_replicas + 1 (each step costs O(servers)): a forecast of a billion
    requests per second is decided at once, at max_replicas."""
    from mesh.autoscale.sizing import erlang_replicas, poisson_replicas
    assert erlang_replicas(1e9, 5.0, 1, 1.0, 0.9, limit=65) == 65
    assert erlang_replicas(3.0, SERVICE_S, 1, 6.36, 0.5, limit=65) == erlang_replicas(3.0, SERVICE_S, 1, 6.36, 0.5)
    assert poisson_replicas(1e9, 5.0, 1, 0.9, limit=65) == 65
    plan = _planner("concurrency", 1.0, slo_ttft_ms=6800)
    plan.observe(Sample(t=TICK_S, ready=1))
    d = plan.decide(TICK_S, ready=1, starting=0, figures=ServiceFigures(SERVICE_S, TTFT_S, 1, 1.0), forecast_rate=1e9)
    assert d.signals["forecast_upper"] == 65 and d.desired == 10     # 65 wanted; 10x the ready replicas per step

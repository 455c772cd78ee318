"""The live autoscaler controller and `meshctl bench autoscale` run one decision code (mesh/autoscale/planner.py).

A table of policies, each driven through the controller (controlplane/controllers/autoscaler.py over the
in-memory deployment manager of test_autoscaler_controller.py: its samples come from the replicas' load
readings, its service figures are measured, its forecast comes from the forecasting step) and through the
bench's scaler (mesh/autoscale/scalers.AutoscalerScaler with the calibration's figures) on the same samples
and the same forecast rates: every decision is equal. Then that catch-up and the nowcast act in the controller.
"""

from __future__ import annotations

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

    async def upper(history, name, series, lead_s, quantile, step_floor):
        assert series == "request_rate"                     # what the controller forecasts
        k = step[0] + 1                                     # the fit started now is used on the next pass
        return (FORECAST[k] if k < len(FORECAST) else None), "table"
    monkeypatch.setattr(autoscale_forecast, "upper", upper)
    r, _ = replica(1)
    d = deployment(2, min_replicas=1, max_replicas=64, target=1.0, predictive=True, scale_down_delay_s=120,
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
}


@pytest.mark.parametrize("case", list(CASES))
async def test_the_controller_decides_as_the_bench_on_the_same_samples(monkeypatch, case):
    cold, policy = CASES[case]
    live, bench = await _run(monkeypatch, cold, **policy)
    for k, (d, (want, b)) in enumerate(zip(live, bench)):
        assert (d.desired, d.mode, d.bound_by) == (want, b.mode, b.bound_by), (k, d.reason, b.reason)
        assert d.signals.get("forecast_upper") == b.signals.get("forecast_upper"), k
    assert any(d.mode == "predictive" for d in live)          # the forecast floor acted, not only the load


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

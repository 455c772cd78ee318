"""The autoscaler controller over an in-memory deployment manager (the real one needs etcd: see
tests/integration/test_autoscaling.py): the sample it builds from the replicas' load signals and counters,
the replicas it sets and the events and status it writes, the cost ceiling's Warning, and Wake."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from controlplane.controllers import autoscale_signals
from controlplane.controllers.autoscaler import AutoscalerController
from controlplane.serving.scaling import ScalingOps
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as T
from mesh import errors, gpumodels, scalingpolicy
from mesh.cost import PriceTable

READY = D.REPLICA_STATE_READY


class Manager:
    """What the controller and ScalingOps use of controlplane/serving/deployments.DeploymentManager."""

    def __init__(self, d: D.Deployment, replicas: list[D.Replica]) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.by_name = {d.spec.name: replicas}          # each deployment's replicas
        self.store = SimpleNamespace(deployments={d.spec.name: d}, loads={}, get=self._get, full=self._get,
                                     replicas_of=lambda n: list(self.by_name.get(n, [])))
        self.replicas = replicas
        self.needs = {}                                 # variant -> VRAM need (default 2 GiB)
        self.ctl = SimpleNamespace(fleet=SimpleNamespace(slices={}, nodes={}))
        self.registry = SimpleNamespace(gpu_models=lambda: [gpumodels.get_model("H100-80GB")],
                                        get=lambda name: None)
        self.prices = PriceTable.parse(["H100-80GB=2.40"])
        self.scaling = ScalingOps(self)
        self.writes = 0

    def _get(self, name):
        if name not in self.store.deployments:
            raise errors.NotFound(f"no deployment {name!r}")
        return self.store.deployments[name]

    def _resolve(self, spec):
        # a 2 GiB replica: a 1g.10gb MIG slice, 1/8 of an H100 = $0.30/h, unless the test sizes the variant
        return None, self.needs.get(spec.variant, 2 << 30)

    async def create(self, spec):          # what DeploymentManager.create keeps of a companion
        d = D.Deployment(spec=spec, generation=1)
        self.store.deployments[spec.name] = d
        self.by_name.setdefault(spec.name, [])
        return d

    async def scale(self, name, replicas):
        return await self._change(name, 0, lambda d: setattr(d.spec, "replicas", replicas))

    async def delete(self, name):
        return self.store.deployments.pop(self._get(name).spec.name)

    async def _change(self, name, generation, edit):
        d = D.Deployment()
        d.CopyFrom(self._get(name))
        edit(d)
        d.generation += 1
        self.store.deployments[name] = d
        self.writes += 1
        return d

    async def write_autoscaler_status(self, name, status, generation=0):
        self.store.deployments[name].status.autoscaler.CopyFrom(status)
        self.writes += 1
        return True

    def _event_as(self, name, type, reason, message, tenant, source):
        self.events.append((type, reason, message))

    def _event(self, name, type, reason, message, tenant=""):
        self.events.append((type, reason, message))


def replica(i: int, running: float = 0, waiting: float = 0, total: float = 0, at: float = 0) -> tuple:
    r = D.Replica(id=f"r-{i}", deployment="chat", state=READY, workload_id=f"w-{i}", endpoint="127.0.0.1:1")
    load = T.BackendLoad(workload_id=f"w-{i}", scraped=True, requests_running=running, requests_waiting=waiting,
                         requests_total=total, kv_cache_usage=0.25, ttft_seconds=0.4)
    load.at.FromNanoseconds(int(at * 1e9))
    return r, load


def deployment(replicas: int, **policy) -> D.Deployment:
    return D.Deployment(spec=D.DeploymentSpec(name="chat", model="smol", replicas=replicas, tenant="team-a",
                                              scaling=scalingpolicy.build(**policy)))


def test_the_sample_sums_in_flight_and_queue_and_rates_the_counters():
    counters = autoscale_signals.Counters()
    (r1, l1), (r2, l2) = replica(1, 1, 2, total=10, at=100), replica(2, 1, 0, total=5, at=100)
    s = autoscale_signals.sample(100, [r1, r2], {"r-1": l1, "r-2": l2}, counters)
    assert (s.in_flight, s.queue, s.ready, s.request_rate) == (2, 2, 2, 0)     # no previous reading: no rate
    assert s.kv_cache == pytest.approx(0.25) and s.ttft_ms == pytest.approx(400)
    (r1, l1), (r2, l2) = replica(1, total=30, at=110), replica(2, total=15, at=110)
    s = autoscale_signals.sample(110, [r1, r2], {"r-1": l1, "r-2": l2}, counters)
    assert s.request_rate == pytest.approx(3.0)                                  # 30 requests over 10 s
    stale = T.BackendLoad(workload_id="w-old", scraped=True, requests_running=9)  # an earlier workload's reading
    s = autoscale_signals.sample(120, [r1], {"r-1": stale}, counters)
    assert s.in_flight == 0 and s.ready == 1
    assert autoscale_signals.counts([r1, D.Replica(state=D.REPLICA_STATE_PENDING),
                                     D.Replica(state=D.REPLICA_STATE_TERMINATING)]) == (1, 1)


def test_cold_start_from_the_replicas_then_the_registry_then_the_default():
    r = D.Replica(id="r-1")
    r.created_at.FromSeconds(100)
    r.ready_at.FromSeconds(142)
    assert autoscale_signals.cold_start([r], None, 30) == (42, "replicas")
    from gpumesh.v1 import model_service_pb2 as M
    v = M.Variant(name="q4")
    v.measured["H100-80GB"].load_seconds = 4.5
    assert autoscale_signals.cold_start([], v, 30) == (4.5 + autoscale_signals.SLICE_START_S, "registry")
    assert autoscale_signals.cold_start([], None, 30) == (30, "default")


async def test_a_burst_scales_up_with_an_event_and_the_status():
    reps = [replica(1, running=1, waiting=7, at=1)]
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, stable_window_s=10, panic_window_s=2,
                            scale_down_delay_s=0), [reps[0][0]])
    dm.store.loads["r-1"] = reps[0][1]
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    decision = await ctl.one("chat")
    d = dm.store.deployments["chat"]
    assert decision.desired == 4 and d.spec.replicas == 4            # 8 in flight + waiting at 2 per replica
    assert decision.mode == "panic" and d.status.autoscaler.desired == 4 and d.status.autoscaler.mode == "panic"
    assert d.status.autoscaler.HasField("last_scale_at")
    assert d.status.autoscaler.signals["queue"] == 7 and d.status.autoscaler.replica_cost_per_hour == pytest.approx(0.3)
    kind, reason, text = dm.events[-1]
    assert (kind, reason) == ("Normal", "Autoscaled") and "replicas 1 -> 4 (panic" in text and "queue=7" in text


async def test_the_cost_ceiling_stops_a_scale_up_and_warns_once():
    r, load = replica(1, running=1, waiting=7, at=1)
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, cost_ceiling_per_hour=0.65), [r])
    dm.store.loads["r-1"] = load
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "cost_ceiling"     # $0.65 / $0.30 = 2 replicas
    warnings = [e for e in dm.events if e[0] == "Warning"]
    assert len(warnings) == 1 and warnings[0][1] == "CostCeiling"
    assert "$0.65/h" in warnings[0][2] and "$0.3000/h each" in warnings[0][2] and "wants 4" in warnings[0][2]
    clock[0] += 2
    await ctl.one("chat")
    assert len([e for e in dm.events if e[0] == "Warning"]) == 1              # once per episode
    assert dm.store.deployments["chat"].status.autoscaler.bound_by == "cost_ceiling"


async def test_idle_scales_to_zero_and_wake_brings_one_back():
    r, load = replica(1, at=1)
    dm = Manager(deployment(1, max_replicas=2, target=2, scale_to_zero_after_s=5, stable_window_s=5,
                            panic_window_s=1, scale_down_delay_s=0), [r])
    dm.store.loads["r-1"] = load
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    assert (await ctl.one("chat")).desired == 1            # idle 0 s: within the grace
    clock[0] += 6
    decision = await ctl.one("chat")
    assert decision.desired == 0 and decision.mode == "idle"
    assert dm.store.deployments["chat"].spec.replicas == 0 and dm.events[-1][1] == "ScaledToZero"
    dm.replicas.clear()
    resp = await dm.scaling.wake("chat")
    assert resp.woke and resp.replicas == 1 and dm.events[-1][1] == "WokenFromZero"
    assert (await dm.scaling.wake("chat")).woke is False          # idempotent
    for _ in range(4):                                 # no replica READY yet: the held request is demand
        clock[0] += 3
        decision = await ctl.one("chat")
        assert decision.desired == 1 and dm.store.deployments["chat"].spec.replicas == 1
    r, load = replica(2, at=2)                         # READY: the request is served, the idle period starts
    dm.replicas.append(r)
    dm.store.loads["r-2"] = load
    clock[0] += 1
    assert (await ctl.one("chat")).desired == 1
    clock[0] += 6
    assert (await ctl.one("chat")).desired == 0


async def test_a_new_leader_still_counts_the_held_request_from_the_woken_status():
    r, load = replica(1, at=1)
    dm = Manager(deployment(0, max_replicas=2, target=2, scale_to_zero_after_s=5, stable_window_s=5,
                            panic_window_s=1, scale_down_delay_s=0), [])
    await dm.scaling.wake("chat")
    clock = [dm.store.deployments["chat"].status.autoscaler.woken_at.ToNanoseconds() / 1e9]
    dm.scaling.woken.clear()                          # the old leader's memory is gone with it
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    for _ in range(4):                                # no replica READY yet: still not scaled away
        clock[0] += 3
        assert (await ctl.one("chat")).desired == 1 and dm.store.deployments["chat"].spec.replicas == 1


async def test_wake_needs_a_policy_that_scales_to_zero():
    r, _ = replica(1)
    dm = Manager(deployment(1, max_replicas=2, target=2), [r])
    with pytest.raises(errors.FailedPrecondition, match="scales to zero"):
        await dm.scaling.wake("chat")


async def test_the_demand_forecast_reads_only_the_history_its_fit_sees(tmp_path, monkeypatch):
    """Every forecast pass read the deployment's whole request-rate series (a long raw tier: millions of samples
    on the history's thread, then binned); the fit sees the last MAX_BINS steps, and only those are read now."""
    from controlplane.controllers import autoscale_forecast
    from controlplane.forecast import forecasting
    from controlplane.forecast.history import HistoryStore
    from controlplane.forecast.recorder import HistoryRecorder
    monkeypatch.setattr(forecasting, "MAX_BINS", 300)
    seen = []
    check = forecasting.check_history
    monkeypatch.setattr(forecasting, "check_history", lambda p, rows: seen.append(len(rows)) or check(p, rows))
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "history.db")), clock=lambda: 0.0)
    try:
        for i in range(3000):
            rec.add("deployment", "chat", "request_rate", 1 + (i % 7) / 10, "team-a", at=1000.0 + i)
        await rec.flush()
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 5.0)
        assert value is not None, note
        assert seen == [1501]           # MAX_BINS steps of 5 s at one sample a second, and the edge (not 3000)
    finally:
        rec.store.close()


async def test_a_predictive_policy_provisions_for_the_forecast_of_its_recorded_request_rate(tmp_path):
    """The controller records the request rate into the history store (real SQLite) and forecasts it with the
    forecasting service's code: on a rising rate, the forecast's upper quantile one lead time ahead, times the
    time in service it measures (Little's law), wants more replicas than the load now."""
    from controlplane.controllers import autoscale_forecast
    from controlplane.forecast.history import HistoryStore
    from controlplane.forecast.recorder import HistoryRecorder
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "history.db")), clock=lambda: 0.0)
    try:
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0)
        assert value is None and "no samples" in note                        # nothing recorded yet: reactive
        for i in range(400):                                                 # rate rising 1 request/s per 100 s
            rec.add("deployment", "chat", "request_rate", i / 100, "team-a", at=1000.0 + i)
        await rec.flush()
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0)
        assert value is not None and value > 399 / 100, note                 # above the last value: rising

        r, load = replica(1, running=10, waiting=0, total=0, at=1)           # 10 in flight now wants 2 of 8
        dm = Manager(deployment(1, min_replicas=1, max_replicas=64, target=8, predictive=True, lead_time_s=20,
                                scale_down_delay_s=0), [r])
        dm.store.loads["r-1"] = load
        clock = [1400.0]
        ctl = AutoscalerController(dm, dm.registry, history=rec, clock=lambda: clock[0], forecast_every=1)
        first = await ctl.one("chat")
        assert first.mode != "predictive"                                    # the fit runs in the background
        await ctl.states["chat"].forecasting
        clock[0] += 1
        _, load = replica(1, running=10, waiting=0, total=4, at=2)           # 4 requests finished in 1 s
        dm.store.loads["r-1"] = load
        decision = await ctl.one("chat")
        rate = ctl.states["chat"].forecast
        assert decision.mode == "predictive", decision.reason
        assert decision.signals["service_s"] == pytest.approx(20 / 4)        # Little's law: mean 10 in flight / 2 per s
        assert decision.signals["forecast_upper"] == pytest.approx(rate * 5.0, rel=1e-3)
        assert decision.desired == math.ceil(rate * 5.0 / 8) > 2
        status = dm.store.deployments["chat"].status.autoscaler
        assert status.signals["lead_time_s"] == 20 and status.signals["forecast_rate"] == pytest.approx(rate, rel=1e-3)
        assert {s[2] for s in rec.pending} >= {"request_rate", "demand_concurrency"}   # what it saw went to the history
    finally:
        await rec.stop()


# -- a predictive policy's figures through quiet windows and a new leader; one deployment's failure -----------

def _forecast_rate(monkeypatch, rates: dict[str, float]) -> None:
    from controlplane.controllers import autoscale_forecast

    async def upper(history, name, series, lead_s, quantile, step_floor, since=0.0):
        return rates.get(name), "table"
    monkeypatch.setattr(autoscale_forecast, "upper", upper)


async def _pass(ctl: AutoscalerController, name: str = "chat"):
    """One pass of the controller over ``name``, the forecast's fit it started done."""
    decision = await ctl.one(name)
    st = ctl.states[name]
    if st.forecasting is not None:
        await st.forecasting
    return decision


def _predictive_deployment(**kw) -> D.Deployment:
    return deployment(1, min_replicas=1, max_replicas=8, target=1, predictive=True, stable_window_s=10,
                      panic_window_s=2, scale_down_delay_s=0, **kw)


async def test_the_forecast_floor_outlives_a_quiet_window(monkeypatch):
    """The time in service measured while requests came (4 in flight at 1 request/s: 4 s) still sizes the
    floor after a stable window with no request: the forecast of 1.5 requests/s keeps 6 replicas warm."""
    _forecast_rate(monkeypatch, {"chat": 1.5})
    r, _ = replica(1)
    dm = Manager(_predictive_deployment(), [r])
    clock = [0.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=0)
    clock[0], total = 1.0, 0.0
    dm.store.loads["r-1"] = replica(1, total=total, at=1)[1]     # the counter's first reading
    await _pass(ctl)
    for t in range(2, 6):                                     # 1 request/s, 4 in flight
        clock[0], total = float(t), total + 1
        dm.store.loads["r-1"] = replica(1, running=4, total=total, at=t)[1]
        d = await _pass(ctl)
    assert d.signals["service_s"] == pytest.approx(4.0) and d.signals["forecast_upper"] == pytest.approx(6.0)
    for t in range(5, 41):                                    # 36 s with no request, past the 10 s window
        clock[0] = float(t)
        dm.store.loads["r-1"] = replica(1, running=0, total=total, at=t)[1]
        d = await _pass(ctl)
        assert d.desired == 6 and d.signals["forecast_upper"] == pytest.approx(6.0), (t, d.reason)
    assert d.mode == "predictive" and ctl.states["chat"].figures_from == "measured"


async def test_a_new_leader_sizes_the_floor_with_the_figures_on_the_status_then_the_registry(monkeypatch):
    """A new leader has seen no request: it takes the time in service the previous leader wrote on the
    status; without one, the registry's `model bench` figures of the variant (TTFT + max_tokens / decode
    speed); without those, no floor."""
    from gpumesh.v1 import model_service_pb2 as M
    _forecast_rate(monkeypatch, {"chat": 1.0})

    async def first_decision(d: D.Deployment, variant=None):
        r, load = replica(1, running=0, total=0, at=1)
        dm = Manager(d, [r])
        dm.store.loads["r-1"] = load
        dm._resolve = lambda spec: (variant, 2 << 30)
        ctl = AutoscalerController(dm, dm.registry, clock=lambda: 100.0, forecast_every=0)
        await _pass(ctl)                                      # the first pass starts the fit
        return await _pass(ctl)

    d = _predictive_deployment()
    d.status.autoscaler.signals["service_s"] = 5.0
    d.status.autoscaler.signals["ttft_free_s"] = 0.25
    got = await first_decision(d)
    assert got.signals["forecast_upper"] == pytest.approx(5.0) and got.desired == 5 and got.mode == "predictive"

    v = M.Variant(name="q4")
    v.measured["H100-80GB"].CopyFrom(M.Measurement(tokens_per_second=20, max_tokens=64, ttft_seconds=0.3))
    got = await first_decision(_predictive_deployment(), v)
    assert got.signals["service_s"] == pytest.approx(0.3 + 64 / 20) and got.desired == 4     # 3.5 s: 3.5 wants 4
    assert got.signals["ttft_free_s"] == pytest.approx(0.3)

    got = await first_decision(_predictive_deployment(), M.Variant(name="q4"))
    assert "forecast_upper" not in got.signals and got.desired == 1


async def test_one_deployments_failure_does_not_stop_the_others(monkeypatch):
    """A deployment whose decision fails (an infinite forecast rate: the sizing code refuses it) is logged,
    counted and warned about once; the deployments after it are still decided on every pass."""
    from prometheus_client import REGISTRY
    _forecast_rate(monkeypatch, {"a-bad": math.inf})
    busy, load = replica(1, running=1, waiting=7, at=1)
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, stable_window_s=10, panic_window_s=2,
                            scale_down_delay_s=0), [busy])
    dm.store.loads["r-1"] = load
    bad = _predictive_deployment(slo_ttft_ms=5000)
    bad.spec.name = "a-bad"
    bad.status.autoscaler.signals["service_s"] = 4.0         # figures to size with (a previous leader's)
    r2 = D.Replica(id="r-2", deployment="a-bad", state=READY, workload_id="w-2")
    dm.store.deployments["a-bad"], dm.by_name["a-bad"] = bad, [r2]
    dm.store.loads["r-2"] = replica(2, at=1)[1]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: 100.0, forecast_every=0)
    before = REGISTRY.get_sample_value("gpumesh_autoscaler_errors_total", {"deployment": "a-bad"}) or 0.0
    for _ in range(3):
        await ctl.run_once()
        fit = ctl.states["a-bad"].forecasting
        if fit is not None:
            await fit
    assert dm.store.deployments["chat"].spec.replicas == 4                # decided behind the failing one
    after = REGISTRY.get_sample_value("gpumesh_autoscaler_errors_total", {"deployment": "a-bad"})
    assert after - before == 2                                            # passes 2 and 3 (pass 1 had no forecast)
    warnings = [e for e in dm.events if e[1] == "AutoscalerError"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning" and "rate inf" in warnings[0][2]
    assert "a-bad" in ctl.failing


async def test_a_deleted_deployments_metrics_go():
    """Each autoscaler metric kept a series per deployment ever scaled (only the desired-replicas gauge went):
    with deployments coming and going, the exported series grew for ever."""
    from prometheus_client import REGISTRY
    reps = [replica(1, running=1, waiting=7, at=1)]
    d = deployment(1, min_replicas=1, max_replicas=4, target=2, stable_window_s=10, panic_window_s=2,
                   scale_down_delay_s=0)
    d.spec.name = "chat-gone"          # a name no other test's controller counted
    dm = Manager(d, [reps[0][0]])
    dm.store.loads["r-1"] = reps[0][1]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: 1000.0)
    await ctl.run_once()

    def series():
        return [(m.name, s.labels) for m in REGISTRY.collect() if m.name.startswith("gpumesh_autoscaler")
                for s in m.samples if s.labels.get("deployment") == "chat-gone"]
    assert any(n == "gpumesh_autoscaler_decisions" for n, _ in series())
    assert any(n == "gpumesh_autoscaler_scale_events" for n, _ in series())
    del dm.store.deployments["chat-gone"]
    await ctl.run_once()
    assert series() == [] and ctl.decided == {}

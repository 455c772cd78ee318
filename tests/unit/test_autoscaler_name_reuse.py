"""Deployment names are global: a deployment deleted and created again under its name (by another tenant, or by the
same with another model) within one autoscaler interval is a new deployment. The autoscaler's state was kept by name,
so the earlier deployment's load samples, measured figures, forecast and episode flags carried over to the new one
(its first decisions, its status), and its demand forecast read the earlier deployment's request-rate history. Now
the state belongs to the deployment's identity (its name and creation time) and the forecast reads no history from
before the deployment was created."""

from __future__ import annotations

import pytest

from controlplane.controllers import autoscale_forecast
from controlplane.controllers.autoscaler import AutoscalerController
from controlplane.forecast.history import HistoryStore
from controlplane.forecast.recorder import HistoryRecorder
from gpumesh.v1 import deployment_service_pb2 as D
from tests.unit.test_autoscaler_controller import Manager, deployment, replica


def created(d: D.Deployment, at: float, tenant: str = "team-a") -> D.Deployment:
    d.created_at.FromNanoseconds(int(at * 1e9))
    d.spec.tenant = tenant
    return d


def recreate(dm: Manager, d: D.Deployment, loads: dict) -> None:
    """`chat` deleted and created again between two passes: a new record, new replicas, new readings."""
    dm.store.deployments["chat"] = d
    dm.by_name["chat"] = [r for r, _ in loads.values()]
    dm.store.loads.clear()
    dm.store.loads.update({rid: load for rid, (_, load) in loads.items()})
    dm.store.load_seen = {rid: load.at.ToNanoseconds() / 1e9 for rid, (_, load) in loads.items()}


async def _pass(ctl: AutoscalerController):
    decision = await ctl.one("chat")
    st = ctl.states["chat"]
    if st.forecasting is not None:
        await st.forecasting
    return decision


async def test_a_deployment_created_again_under_its_name_starts_with_no_state():
    policy = dict(min_replicas=1, max_replicas=8, target=2, predictive=True, stable_window_s=10, panic_window_s=2,
                  scale_down_delay_s=0, panic_threshold=100)
    r, load = replica(1, running=0, total=0, at=1)
    dm = Manager(created(deployment(1, **policy), 1.0), [r])
    dm.store.loads["r-1"] = load
    dm.store.load_seen = {"r-1": 1.0}
    clock = [1.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=1e9)
    await _pass(ctl)
    total = 0.0
    for t in range(2, 8):                         # team-a's chat: 12 in flight at 3 requests/s
        clock[0], total = float(t), total + 3
        dm.store.loads["r-1"] = replica(1, running=12, total=total, at=t)[1]
        dm.store.load_seen["r-1"] = float(t)
        await _pass(ctl)
    clock[0] = 30.0                               # r-1's reading is 23 s old: a LoadStale episode
    await _pass(ctl)
    old = ctl.states["chat"]
    assert old.figures_from == "measured" and old.load_stale
    assert [e[1] for e in dm.events].count("LoadStale") == 1

    # deleted; team-b creates "chat" within the interval; its replica's reading is stale at once (cut off)
    clock[0] = 31.0
    r2, load2 = replica(2, running=0, total=0, at=10)
    r2.workload_id = load2.workload_id
    recreate(dm, created(deployment(1, **policy), 30.5, "team-b"), {"r-2": (r2, load2)})
    decision = await _pass(ctl)
    st = ctl.states["chat"]
    assert st.figures_from != "measured" and "service_s" not in decision.signals     # not team-a's figures
    assert all(s.t >= 30.5 for s in st.plan.samples)                                  # nor its load samples
    assert [e[1] for e in dm.events].count("LoadStale") == 2                          # its own episode, told
    status = dm.store.deployments["chat"].status.autoscaler
    assert "service_s" not in status.signals


async def test_an_earlier_deployments_failure_episode_does_not_silence_the_new_ones(monkeypatch):
    async def upper(history, name, series, lead_s, quantile, step_floor, since=0.0):
        return float("inf"), "table"          # the sizing code refuses an infinite rate: the pass fails
    monkeypatch.setattr(autoscale_forecast, "upper", upper)
    d = created(deployment(1, min_replicas=1, max_replicas=8, target=1, predictive=True, slo_ttft_ms=5000), 1.0)
    d.status.autoscaler.signals["service_s"] = 4.0
    r, load = replica(1, at=1)
    dm = Manager(d, [r])
    dm.store.loads["r-1"] = load
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: 100.0, forecast_every=0)
    for _ in range(3):
        await ctl.run_once()
        if ctl.states["chat"].forecasting is not None:
            await ctl.states["chat"].forecasting
    assert [e[1] for e in dm.events].count("AutoscalerError") == 1
    again = created(deployment(1, min_replicas=1, max_replicas=8, target=1, predictive=True, slo_ttft_ms=5000),
                    50.0, "team-b")
    again.status.autoscaler.signals["service_s"] = 4.0
    recreate(dm, again, {"r-1": (r, load)})
    for _ in range(2):
        await ctl.run_once()
        if ctl.states["chat"].forecasting is not None:
            await ctl.states["chat"].forecasting
    assert [e[1] for e in dm.events].count("AutoscalerError") == 2        # the new deployment's, once


async def test_the_forecast_reads_no_history_from_before_the_deployment_was_created(tmp_path):
    """The same tenant's "chat" of another model, created again at 1500: the request rate recorded for the
    earlier one (rising to 4 requests/s) forecasts nothing for it; its own samples do."""
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "history.db")), clock=lambda: 0.0)
    try:
        for i in range(400):
            rec.add("deployment", "chat", "request_rate", i / 100, "team-a", at=1000.0 + i)
        await rec.flush()
        r, load = replica(1, running=0, total=0, at=1500)
        dm = Manager(created(deployment(1, min_replicas=1, max_replicas=64, target=8, predictive=True,
                                        lead_time_s=20, scale_down_delay_s=0), 1500.0), [r])
        dm.store.loads["r-1"] = load
        clock = [1500.0]
        ctl = AutoscalerController(dm, dm.registry, history=rec, clock=lambda: clock[0], forecast_every=1)
        await _pass(ctl)
        st = ctl.states["chat"]
        assert st.forecast is None and "no samples" in st.forecast_note, st.forecast_note
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0, since=1500.0)
        assert value is None and "no samples" in note
        for i in range(400):                      # its own history
            rec.add("deployment", "chat", "request_rate", 1.0, "team-a", at=1500.0 + i)
        await rec.flush()
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0, since=1500.0)
        assert value == pytest.approx(1.0, abs=0.2), note
    finally:
        await rec.stop()

"""ForecastService over a real history store: the forecast of a known series, and every refusal naming
the field and the limit (unknown series, bad horizon/step/level, history too short), and tenant scoping."""

from __future__ import annotations

import asyncio
import math

import pytest

from controlplane.api import auth
from controlplane.forecast.history import HistoryStore, parse_tiers
from controlplane.forecast.recorder import HistoryRecorder
from controlplane.forecast.service import ForecastService
from mesh import errors

T0 = 1_700_000_000.0


def run_with(tmp_path, samples, fn, principal=auth.UNRESTRICTED, deployments=None):
    async def go():
        tmp_path.mkdir(parents=True, exist_ok=True)
        rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:1d", "1m:30d"])))
        for s in samples:
            rec.add(*s)
        await rec.flush()
        svc = ForecastService(rec, deployments=deployments)
        token = auth._current.set(principal)
        try:
            return await fn(svc)
        finally:
            auth._current.reset(token)
            await rec.stop()
    return asyncio.run(go())


def ramp(n=400, kind="gpu", name="n/0", metric="memory_used", tenant=""):
    # a slow ramp with a small wave: something a damped trend forecasts well
    return [(kind, name, metric, 1000.0 + 2.0 * i + 5 * math.sin(i / 7), tenant, T0 + i) for i in range(n)]


def test_forecast_of_a_ramp_has_points_times_and_an_interval(tmp_path):
    r = run_with(tmp_path, ramp(), lambda s: s.forecast("gpu", "n/0", "memory_used", 20, 1))
    assert len(r.points) == 20 and r.step_seconds == 1 and r.level == pytest.approx(0.9)
    assert r.history_points == 400 and r.history_span_seconds == pytest.approx(399)
    assert r.points[0].at.ToNanoseconds() / 1e9 == pytest.approx(T0 + 401)
    for p in r.points:
        assert p.lo <= p.value <= p.hi
    assert r.points[-1].value > r.last_value            # the ramp goes on
    assert r.model and r.backtest_mase > 0 and r.source == "embedded"


def test_constant_history_forecasts_the_value(tmp_path):
    flat = [("gpu", "n/0", "power", 300.0, "", T0 + i) for i in range(200)]
    r = run_with(tmp_path, flat, lambda s: s.forecast("gpu", "n/0", "power", 10, 1))
    assert r.model == "constant" and {p.value for p in r.points} == {300.0} and r.points[0].hi == 300.0


@pytest.mark.parametrize("args, exc, says", [
    (("gpu", "n/9", "memory_used", 10, 1, 0), errors.NotFound, "no series gpu/n/9 memory_used"),
    (("disk", "n/0", "memory_used", 10, 1, 0), errors.InvalidArgument, "kind: 'disk' is not a series kind"),
    (("gpu", "", "memory_used", 10, 1, 0), errors.InvalidArgument, "name: is required"),
    (("gpu", "n/0", "memory_used", 0, 1, 0), errors.InvalidArgument, "horizon_seconds: must be > 0"),
    (("gpu", "n/0", "memory_used", -5, 1, 0), errors.InvalidArgument, "horizon_seconds: must be > 0"),
    (("gpu", "n/0", "memory_used", 3600, 0, 0), errors.InvalidArgument,
     "horizon_seconds: 3600s is longer than the history of gpu/n/0 memory_used (399.0s)"),
    (("gpu", "n/0", "memory_used", 100, 0.01, 0), errors.InvalidArgument, "step_seconds"),
    (("gpu", "n/0", "memory_used", 10, 1, 1.5), errors.InvalidArgument, "level: must be between 0 and 1"),
    (("gpu", "n/0", "memory_used", 60, 1, 0), errors.FailedPrecondition,
     "needs at least 480 (480s of history)"),
])
def test_bad_requests_name_the_field_and_the_limit(tmp_path, args, exc, says):
    with pytest.raises(exc, match=None) as e:
        run_with(tmp_path, ramp(), lambda s: s.forecast(*args))
    assert says in str(e.value)


def test_a_tenant_reads_only_its_own_series(tmp_path):
    samples = ramp(kind="deployment", name="chat", metric="requests_running", tenant="acme") + ramp()
    acme = auth.Principal("client", "a", tenant="acme", role="tenant")
    other = auth.Principal("client", "b", tenant="other", role="tenant")
    viewer = auth.Principal("client", "v", role="viewer")

    async def both(s):
        listed = [x.name for x in (await s.ListSeries(_req(), None)).series]
        try:
            await s.forecast("gpu", "n/0", "memory_used", 10, 1)
            gpu = "ok"
        except errors.NotFound:
            gpu = "not found"
        return listed, gpu
    assert run_with(tmp_path / "a", samples, both, acme) == (["chat"], "not found")
    assert run_with(tmp_path / "b", samples, both, other) == ([], "not found")
    assert run_with(tmp_path / "c", samples, both, viewer) == (["n/0"], "ok")        # the fleet's series only
    acme_viewer = auth.Principal("client", "va", tenant="acme", role="viewer")
    assert run_with(tmp_path / "e", samples, both, acme_viewer) == (["chat", "n/0"], "ok")
    r = run_with(tmp_path / "d", samples, lambda s: s.forecast("deployment", "chat", "requests_running", 10, 1), acme)
    assert len(r.points) == 10


def _req(kind=""):
    from gpumesh.v1 import forecast_service_pb2 as F
    return F.ListSeriesRequest(kind=kind)


def test_meshctl_table_has_a_sparkline_and_readable_numbers(tmp_path):
    from tools.meshctl.forecast_live import format_forecast, sparkline
    assert sparkline([0, 1, 2, 3]) == "▁▃▆█" and sparkline([5, 5]) == "▁▁"
    r = run_with(tmp_path, ramp(), lambda s: s.forecast("gpu", "n/0", "memory_used", 20, 1))
    table = format_forecast(r, "table")
    assert "gpu/n/0 memory_used: model " in table and "90% interval" in table
    assert table.splitlines()[1].startswith("forecast ") and len(table.splitlines()[1]) == len("forecast ") + 20
    assert "TIME" in table and "Gi" in table
    import json
    doc = json.loads(format_forecast(r, "json"))
    assert len(doc["points"]) == 20 and doc["history"]["points"] == 400 and {"value", "lo", "hi", "at"} <= set(doc["points"][0])


@pytest.mark.parametrize("args, field", [
    (("gpu", "n/0", "m", float("nan"), 0, 0), "horizon_seconds"), (("gpu", "n/0", "m", float("inf"), 0, 0), "horizon_seconds"),
    (("gpu", "n/0", "m", 10, float("nan"), 0), "step_seconds"), (("gpu", "n/0", "m", 10, -1, 0), "step_seconds"),
    (("gpu", "n/0", "m", 10, 1e-300, 0), "step_seconds"), (("gpu", "n/0", "m", 10, 0, float("nan")), "level"),
    (("gpu", "a\x00b", "m", 10, 0, 0), "name"), (("gpu", "n/0", "x" * 70_000, 10, 0, 0), "metric"),
    (("", "n/0", "m", 10, 0, 0), "kind"), (("gpu", "n/0", "m", 3600, 1, 0), "step_seconds"),
])
def test_hostile_requests_are_invalid_argument_naming_the_field(args, field):
    from controlplane.forecast.forecasting import plan
    with pytest.raises(errors.InvalidArgument) as e:
        plan(*args)
    assert str(e.value).startswith(field + ":")


def test_step_demand_is_forecast_from_the_freshest_sample(tmp_path):
    # 1 Hz samples of a level that jumps every 37 s, forecast at 10 s steps: a bin's mean lags the level,
    # the last raw sample in it does not, so the choice falls on a model that reads it
    rng = __import__("numpy").random.default_rng(5)
    levels = rng.integers(0, 8, size=60) * 10.0
    levels[59] = levels[58] + 30                      # the last jump comes 3 s before the end
    samples = [("gpu", "n/0", "utilization", float(levels[i // 37]), "", T0 + i) for i in range(37 * 59 + 3)]
    r = run_with(tmp_path, samples, lambda s: s.forecast("gpu", "n/0", "utilization", 20, 10))
    assert "latest" in r.model or "linear" in r.model, r.model
    fresh = samples[-1][3]
    assert r.last_value < fresh                         # the last bin's mean lags: half old level, half new
    assert abs(r.points[0].value - fresh) < abs(r.last_value - fresh)


class FakePrometheus:
    """PrometheusHistory's surface over fixed rows (its HTTP side is tested against a real Prometheus in
    tests/integration/test_forecast_prometheus.py)."""

    url = "http://prom:9090"

    def __init__(self, rows):
        self.rows, self.reads = rows, []

    def serves(self, kind, metric):
        from controlplane.forecast.prometheus import PrometheusHistory
        return PrometheusHistory(self.url).serves(kind, metric)

    def query(self, name, metric, kind="gpu"):
        from controlplane.forecast.prometheus import PrometheusHistory
        return PrometheusHistory(self.url).query(name, metric, kind)

    async def read(self, kind, name, metric, step, points):
        self.reads.append((kind, name, metric))
        return self.rows


def test_slice_node_and_workload_series_come_from_prometheus_with_their_owners(tmp_path):
    """With prometheus_url, slice, node and workload series are read from Prometheus (the control plane's
    gpumesh_slice_*, gpumesh_node_*, gpumesh_workload_* gauges); a slice's series is still its tenant's
    only (the owner as history.db knows it), a node's the fleet's."""
    samples = ramp(kind="slice", name="s-1", tenant="acme") + ramp(kind="node", name="n1")
    rows = [(T0 + i, 1000.0 + 2.0 * i) for i in range(400)]
    acme = auth.Principal("client", "a", tenant="acme", role="tenant")
    other = auth.Principal("client", "b", tenant="other", role="tenant")

    def ask(kind, name, principal):
        prom = FakePrometheus(rows)

        async def go(svc):
            svc.prometheus = prom
            try:
                r = await svc.forecast(kind, name, "memory_used", 10, 1)
                return r.source, prom.reads
            except errors.NotFound as e:
                return "not found: " + str(e), prom.reads
        return run_with(tmp_path / f"{kind}-{principal.name}", samples, go, principal)
    assert ask("slice", "s-1", acme) == ("prometheus", [("slice", "s-1", "memory_used")])
    assert ask("slice", "s-1", other)[0].startswith("not found") and ask("slice", "s-1", other)[1] == []
    assert ask("node", "n1", auth.UNRESTRICTED)[0] == "prometheus"
    assert ask("node", "n1", acme)[0].startswith("not found")
    assert ask("workload", "w-unknown", acme)[0].startswith("not found")      # no owner known: fleet only
    # nor a viewer of another tenant (it reads the fleet's own series, and a series of unknown owner may be any
    # tenant's): only an admin reads a slice or workload series the history no longer knows
    viewer = auth.Principal("client", "v", tenant="other", role="viewer")
    source, reads = ask("workload", "w-unknown", viewer)
    assert source.startswith("not found") and reads == []                    # Prometheus not even asked
    assert ask("workload", "w-unknown", auth.UNRESTRICTED)[0] == "prometheus"


def test_prometheus_queries_name_the_gauge_and_the_object():
    from controlplane.forecast.prometheus import PrometheusHistory
    p = PrometheusHistory("http://prom:9090")
    assert p.query("s-1", "memory_used", "slice") == 'max(gpumesh_slice_memory_used_bytes{slice="s-1"})'
    assert p.query("n1", "temperature", "node") == 'max(gpumesh_node_temperature_celsius{node="n1"})'
    assert p.query('w"1', "utilization", "workload") == 'max(gpumesh_workload_utilization_percent{workload="w\\"1"})'
    assert p.query("n1/0", "temperature") == 'max(gpumesh_gpu_temperature_celsius{node="n1",gpu="0"})'
    assert p.serves("slice", "power") and p.serves("node", "allocated_memory") and not p.serves("deployment", "replicas")


def test_the_control_plane_exports_each_nodes_latest_series_as_gauges():
    from prometheus_client import CollectorRegistry, generate_latest

    from controlplane.api.metrics import FleetCollector
    rows = [("n1", ("slice", "s-1", "memory_used", "acme", T0, 5.0 * 2**30)),
            ("n1", ("node", "n1", "temperature", "", T0, 71.0)),
            ("n1", ("workload", "w-1", "utilization", "acme", T0, 40.0))]
    reg = CollectorRegistry()

    class One:
        def collect(self):
            return FleetCollector._series(rows)
    reg.register(One())
    text = generate_latest(reg).decode()
    assert 'gpumesh_slice_memory_used_bytes{node="n1",slice="s-1",tenant="acme"} 5.36870912e+09' in text
    assert 'gpumesh_node_temperature_celsius{node="n1"} 71.0' in text
    assert 'gpumesh_workload_utilization_percent{node="n1",tenant="acme",workload="w-1"} 40.0' in text


def test_non_finite_samples_from_prometheus_are_left_out(tmp_path):
    """Prometheus answers "NaN" and "+Inf" samples; the forecast is made from the finite ones (one such sample
    failed the whole call with INVALID_ARGUMENT about a 'series' field no request has)."""
    rows = [(T0 + i, 1000.0 + 2.0 * i + 5 * math.sin(i / 7)) for i in range(400)]
    rows[390] = (rows[390][0], math.nan)
    rows[200] = (rows[200][0], math.inf)

    async def go(svc):
        svc.prometheus = FakePrometheus(rows)
        return await svc.forecast("gpu", "n/0", "memory_used", 10, 1)
    r = run_with(tmp_path, ramp(), go)
    assert r.source == "prometheus" and len(r.points) == 10
    assert all(math.isfinite(v) for p in r.points for v in (p.value, p.lo, p.hi))


@pytest.mark.parametrize("body", ['[1, 2]', '{"status": "success", "data": []}',
                                  '{"status": "success", "data": {"result": [{"values": [[1, "x", 3]]}]}}'])
def test_an_answer_that_is_not_prometheus_is_unavailable(body):
    """JSON that is not a query_range answer (another server at prometheus_url) is UNAVAILABLE naming the URL,
    not INTERNAL (an AttributeError or a ValueError from the parsing)."""
    from aiohttp import web

    from controlplane.forecast.prometheus import PrometheusHistory

    async def answer(request):
        return web.Response(text=body, content_type="application/json")

    async def go():
        app = web.Application()
        app.router.add_get("/api/v1/query_range", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(errors.Unavailable, match="prometheus_url http://127.0.0.1"):
                await PrometheusHistory(f"http://127.0.0.1:{port}").read("gpu", "n/0", "temperature", 1.0, 10)
        finally:
            await runner.cleanup()
    asyncio.run(go())


def test_a_cancelled_call_holds_its_fit_slot_until_the_fit_ends(tmp_path, monkeypatch):
    """fit_slots bounds the fits running at once, also when callers give up (a short deadline): the slot went
    back with the cancelled call while its fit thread ran on, so a client retrying with short deadlines ran any
    number of fits at once."""
    import threading
    import time as _time

    from controlplane.forecast import forecasting
    real, running, peak, lock = forecasting.fit, [0], [0], threading.Lock()

    def slow_fit(*a, **k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        _time.sleep(0.1)
        with lock:
            running[0] -= 1
        return real(*a, **k)
    monkeypatch.setattr(forecasting, "fit", slow_fit)

    async def go(svc):
        for _ in range(4):
            task = asyncio.ensure_future(svc.forecast("gpu", "n/0", "memory_used", 20, 1))
            await asyncio.sleep(0.02)
            task.cancel()
        r = await svc.forecast("gpu", "n/0", "memory_used", 20, 1)
        return r
    r = run_with(tmp_path, ramp(), go)
    assert len(r.points) == 20 and peak[0] == 1


def test_a_history_too_short_for_the_daily_season_forecasts_without_it(tmp_path):
    """Three days of 5-minute bins (900) hold the daily season three times, but its backtest at 100 steps
    ahead needs 976: the fit raised INVALID_ARGUMENT naming `series` (no field of the request) for a request
    check_history had let through. Now the season is left out and the forecast is made."""
    wave = [("gpu", "n/0", "utilization", 50 + 10 * math.sin(2 * math.pi * i / 288) + (i % 7) / 7, "",
             T0 + 300.0 * i) for i in range(900)]
    r = run_with(tmp_path, wave, lambda s: s.forecast("gpu", "n/0", "utilization", 30000, 300))
    assert len(r.points) == 100 and r.history_points == 900 and r.model


def test_a_forecast_reads_only_the_history_its_fit_sees(tmp_path, monkeypatch):
    """The fit bins the last MAX_BINS steps; the whole series was read (a long raw tier: millions of samples,
    held per call and filtered and binned on the event loop). The same forecast from the bounded read."""
    from controlplane.forecast import forecasting
    monkeypatch.setattr(forecasting, "MAX_BINS", 500)
    seen = []
    finite = forecasting.finite
    monkeypatch.setattr(forecasting, "finite", lambda rows, *a: seen.append(len(rows)) or finite(rows, *a))
    r = run_with(tmp_path, ramp(n=5000), lambda s: s.forecast("gpu", "n/0", "memory_used", 20, 1))
    assert seen == [501] and r.history_points == 500 and len(r.points) == 20


def test_a_claimed_warm_slices_series_belongs_to_its_new_tenant(tmp_path):
    """A warm slice is carved for no tenant ("") and keeps its id when a tenant's Allocate claims it; its series
    kept the owner of its first sample, so the tenant's own slice usage was the fleet's: hidden from the tenant
    and read by every viewer, whatever its tenant. The owner follows the samples."""
    warm = [("slice", "s-1", "utilization", 0.0, "", T0 + i) for i in range(100)]
    claimed = [("slice", "s-1", "utilization", 50.0 + i % 5, "acme", T0 + 100 + i) for i in range(300)]
    acme = auth.Principal("client", "a", tenant="acme", role="tenant")
    viewer = auth.Principal("client", "v", tenant="other", role="viewer")

    async def listed(s):
        return [(x.name, x.tenant) for x in (await s.ListSeries(_req("slice"), None)).series]
    assert run_with(tmp_path / "a", warm + claimed, listed, acme) == [("s-1", "acme")]
    assert run_with(tmp_path / "v", warm + claimed, listed, viewer) == []


def test_a_deployment_name_taken_by_another_tenant_does_not_hand_it_the_old_history(tmp_path):
    """Deployment names are reused: tenant a's "chat" deleted and tenant b's "chat" created, b's first sample made
    the series b's, with a's samples still in it: b read a's request history (ListSeries' counts and span, the
    forecast's history and last value). A series that changes from one tenant's hands starts afresh; a warm
    slice's ("", the fleet's) samples still pass to the tenant that claims it (the test above)."""
    theirs = [("deployment", "chat", "requests", 1000.0 + i, "a", T0 + i) for i in range(300)]
    mine = [("deployment", "chat", "requests", 5.0, "b", T0 + 300 + i) for i in range(3)]
    b = auth.Principal("client", "b", tenant="b", role="tenant")

    async def listed(s):
        return [(x.name, x.tenant, x.samples) for x in (await s.ListSeries(_req("deployment"), None)).series]
    assert run_with(tmp_path / "b", theirs + mine, listed, b) == [("chat", "b", 3)]
    store = HistoryStore(str(tmp_path / "b" / "h.db"), parse_tiers(["raw:1d", "1m:30d"]))
    try:
        assert [v for _, v in store.read("deployment", "chat", "requests")] == [5.0] * 3
    finally:
        store.close()


def test_a_deployment_created_again_by_its_tenant_reads_no_history_from_before(tmp_path):
    """Tenant a's "chat" deleted and created again by a: the series keeps its owner, so it kept the earlier
    deployment's samples, and `meshctl forecast get deployment/chat` (and `forecast series`) read them, where the
    autoscaler's own forecast reads none from before the deployment's creation. The service bounds a deployment's
    series by the current deployment's created_at as well."""
    from types import SimpleNamespace

    from gpumesh.v1 import deployment_service_pb2 as D
    earlier = [("deployment", "chat", "requests", 1000.0 + i, "a", T0 + i) for i in range(300)]
    again = [("deployment", "chat", "requests", 5.0, "a", T0 + 1000 + i) for i in range(300)]
    d = D.Deployment()
    d.spec.name, d.spec.tenant = "chat", "a"
    d.created_at.FromNanoseconds(int((T0 + 999) * 1e9))
    dm = SimpleNamespace(store=SimpleNamespace(deployments={"chat": d}))
    a = auth.Principal("client", "a", tenant="a", role="tenant")

    async def both(s):
        listed = [(x.name, x.samples, x.first.ToNanoseconds() / 1e9)
                  for x in (await s.ListSeries(_req("deployment"), None)).series]
        return listed, await s.forecast("deployment", "chat", "requests", 10, 1)
    listed, r = run_with(tmp_path / "a", earlier + again, both, a, deployments=dm)
    assert listed == [("chat", 300, T0 + 1000)]
    assert r.history_points == 300 and r.history_span_seconds == pytest.approx(299) and r.model == "constant"
    gone = [("deployment", "old", "requests", 1.0, "a", T0 + i) for i in range(300)]      # no deployment: all of it
    listed = run_with(tmp_path / "b", gone, lambda s: s.ListSeries(_req("deployment"), None), a, deployments=dm)
    assert [(x.name, x.samples) for x in listed.series] == [("old", 300)]

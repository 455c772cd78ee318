"""The forecasting speed-up changes no result: `choose()` and `backtest()` give the same model, points,
intervals and errors, bit for bit, as the per-origin code they replaced (tests/unit/_forecast_reference.py,
the code of git 78a1951), on real trace series and on synthetic ones."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from mesh.forecast import combine, walk
from mesh.forecast.backtest import BacktestSpec, RollingForecasts, sequential_intervals
from tests.unit import _forecast_reference as ref

bt = importlib.import_module("mesh.forecast.backtest")      # (the package exports a function of that name)
select = importlib.import_module("mesh.forecast.select")
TRACES = os.environ.get("MESH_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces"))


@pytest.fixture
def reference():
    """A context in which mesh.forecast runs the reference (pre-speed-up) code paths."""
    return ref.reference


def _trace_series():
    """A few real series: Helios VC GPUs in use (10-minute means, with the freshest sample), the GenAI
    LoRA requests per hour, one GenAI container's GPU memory (5-minute means) and the GenAI QPS."""
    from mesh.forecast.series import load
    out = []
    helios = os.path.join(TRACES, "helios-earth-2020", "vc8Sj_cluster_sequence_vc.csv")
    if os.path.isfile(helios):
        s = load(helios, "time", "running_gpu_num", freq="10min")[0]
        out.append(("helios-vc8Sj", s.values[-2000:], s.recent[-2000:], 144))
    lora = os.path.join(TRACES, "alibaba-genai-2026", "lora_request_trace.csv")
    if os.path.isfile(lora):
        s = load(lora, "gmt_create", "predict_type", freq="1h", agg="count")[0]
        out.append(("genai-lora", s.values, None, 24))
    mem = os.path.join(TRACES, "alibaba-genai-2026", "pod_gpu_memory_used_bytes_anon.csv")
    if os.path.isfile(mem):
        parts = load(mem, "timestamp_anon", "value", "container_ip", freq="5min", fill="ffill")
        longest = max(parts, key=lambda s: (s.values.size, s.name))
        out.append(("genai-memory", longest.values, longest.recent, 12))
    qps = os.path.join(TRACES, "alibaba-genai-2026", "qps.csv")
    if os.path.isfile(qps):
        s = load(qps, "timestamp_anon", "value", freq="5min", fill="ffill")[0]
        out.append(("genai-qps", s.values, s.recent, 12))
    return out


SERIES = _trace_series()
# (horizon, origins, models, level): the backtest CLI's shape, the replay's demand and pressure calls
CALLS = [(3, 40, ("naive", "snaive", "ses", "latest", "linear"), 0.9),
         (2, 144, ("naive", "snaive"), 0.99),
         (2, 8, ("naive", "snaive"), 0.9),
         (6, 30, ("naive", "snaive", "latest"), 0.9),
         (1, 60, ("naive", "snaive", "ses", "latest", "linear"), 0.9)]     # one step: other numpy sum paths


def _same_forecast(a, b) -> None:
    assert a.model == b.model
    assert a.points == b.points and a.lo == b.lo and a.hi == b.hi
    assert a.backtest_error == b.backtest_error and a.errors == b.errors


@pytest.mark.skipif(not SERIES, reason=f"no traces under {TRACES}")
@pytest.mark.parametrize("name", [s[0] for s in SERIES])
@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"h{c[0]}-o{c[1]}-{len(c[2])}models")
def test_choose_is_unchanged_on_traces(name, call, reference):
    _, y, recent, season = next(s for s in SERIES if s[0] == name)
    h, origins, models, level = call
    fast = select.choose(y, season, h, models=models, level=level, origins=origins, recent=recent)
    with reference():
        assert select.sequential_intervals is ref.sequential_intervals_ref and bt.select is ref.select_ref
        slow = select.choose(y, season, h, models=models, level=level, origins=origins, recent=recent)
    _same_forecast(fast, slow)


@pytest.mark.skipif(not SERIES, reason=f"no traces under {TRACES}")
@pytest.mark.parametrize("name", [s[0] for s in SERIES])
@pytest.mark.parametrize("horizon", [3, 1])
def test_backtest_is_unchanged_on_traces(name, horizon, reference):
    _, y, recent, season = next(s for s in SERIES if s[0] == name)
    spec = BacktestSpec(horizon=horizon, season=season, models=("naive", "snaive", "ses", "latest", "linear"),
                        origins=60 if horizon > 1 else 150)
    iv_fast: dict = {}
    iv_slow: dict = {}
    fast, _ = bt.backtest(y, spec, intervals=iv_fast, recent=recent)
    with reference():
        slow, _ = bt.backtest(y, spec, intervals=iv_slow, recent=recent)
    for rep in (fast, slow):
        for m in rep["models"].values():
            m.pop("fit_seconds", None)
    assert fast == slow
    assert iv_fast.keys() == iv_slow.keys()
    for m in iv_fast:
        for x, z in zip(iv_fast[m], iv_slow[m]):
            assert np.array_equal(x, z), m


def test_choose_is_unchanged_on_synthetic_series(reference):
    rng = np.random.default_rng(7)
    t = np.arange(1100)
    cases = [np.maximum(0, np.round(3 + 2 * np.sin(2 * np.pi * t / 144) + rng.poisson(1.0, t.size) - 1)),
             np.cumsum(rng.standard_normal(t.size)),                       # a walk that goes negative
             (rng.random(t.size) < 0.1) * rng.integers(1, 5, t.size) * 1.0]  # intermittent
    for y in cases:
        for h, origins, models, level in CALLS:
            fast = select.choose(y, 144, h, models=models, level=level, origins=origins)
            with reference():
                slow = select.choose(y, 144, h, models=models, level=level, origins=origins)
            _same_forecast(fast, slow)


@pytest.mark.parametrize("limit", [0, walk.VECTOR_LIMIT], ids=["per-origin", "vectorised"])
def test_walk_matches_per_origin_intervals(limit, monkeypatch):
    """The sequential conformal walk, both of its paths, against one conformal.interval per origin: every
    stride, horizon, calibration window, floor and ACI step, on continuous, integer and intermittent data
    (ties and exact zeros)."""
    monkeypatch.setattr(walk, "VECTOR_LIMIT", limit)
    rng = np.random.default_rng(11)
    checked = 0
    for trial in range(60):
        m, h = int(rng.integers(2, 90)), int(rng.integers(1, 8))
        origins = 100 + int(rng.integers(1, 2 * h + 1)) * np.arange(m)
        actual = rng.standard_normal((m, h)) * 3 + 2
        if trial % 3 == 1:
            actual = np.round(np.abs(actual))
        if trial % 3 == 2:
            actual = np.abs(np.round(actual)) * (rng.random((m, h)) < 0.3)
        p = np.where(rng.random((m, h)) < 0.3, actual, np.round(actual + rng.standard_normal((m, h))))
        rf = RollingForecasts(origins, actual, {})
        for ev in (np.arange(m), np.arange(m // 2, m)):
            seen = np.searchsorted(origins + h, origins[ev], side="right") > 0
            for gamma in (0.02, 0.0):
                for floor in (None, 0.0):
                    for window in (0, 5):
                        s1: dict = {}
                        s2: dict = {}
                        a = ref.sequential_intervals_ref(rf, p, ev, 0.9, floor, window, gamma, s1)
                        b = sequential_intervals(rf, p, ev, 0.9, floor, window, gamma, s2)
                        assert s1 == s2
                        assert np.array_equal(a[0][seen], b[0][seen]) and np.array_equal(a[1][seen], b[1][seen])
                        checked += 1
    assert checked == 60 * 2 * 8


def test_mae_each_matches_mae_per_model():
    """Many forecasts' errors at once, on the rows of a selection (fancy-indexed, one step or several)."""
    from mesh.forecast import metrics
    rng = np.random.default_rng(5)
    for _ in range(300):
        r, h, k = int(rng.integers(2, 400)), int(rng.integers(1, 6)), int(rng.integers(1, 30))
        a = np.round(rng.standard_normal((r, h)) * 5, 3)
        points = {f"m{i}": a + rng.standard_normal((r, h)) for i in range(k)}
        rows = np.sort(rng.choice(r, size=int(rng.integers(1, r + 1)), replace=False))
        got = metrics.mae_each(a, points, rows)
        assert got == {m: metrics.mae(a[rows], p[rows]) for m, p in points.items()}


def test_step_weights_match_the_grid_loop():
    rng = np.random.default_rng(3)
    for _ in range(200):
        r, h = int(rng.integers(1, 200)), int(rng.integers(1, 13))
        a = np.round(rng.standard_normal((r, h)) * 4)
        p, n = a + rng.standard_normal((r, h)), a + np.round(rng.standard_normal((r, h)))
        assert np.array_equal(combine.step_weights(a, p, n), ref.step_weights_ref(a, p, n))

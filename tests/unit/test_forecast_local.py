"""The forecasters added for persistent, bursty demand (mesh/forecast/local.py and the statsforecast
ses/theta/ces): known series, the freshest-sample input (`recent`) through the backtest, its checks, the
CSV loader keeping it, and conformal coverage of the new models on synthetic noise."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import InvalidArgument
from mesh.forecast import BacktestSpec, backtest, choose, make
from mesh.forecast.events import concurrency, level_at
from mesh.forecast.local import DirectLinear, Latest
from mesh.forecast.series import load

SEASON = 24


def seasonal(n: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    y = 50 + 10 * np.sin(2 * np.pi * t / SEASON) + 4 * np.cos(4 * np.pi * t / SEASON)
    return y + np.random.default_rng(seed).normal(0, noise, n) if noise else y


def steps(n: int = 3000, per_bin: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Step-like demand (jobs starting and ending at random minutes), binned: (bin means, last sample per bin)."""
    rng = np.random.default_rng(seed)
    level = np.cumsum(rng.choice([0, 0, 0, 0, 0, 0, 8, -8], size=n * per_bin).astype(float))
    level -= level.min()
    raw = level.reshape(n, per_bin)
    return raw.mean(axis=1), raw[:, -1]


@pytest.mark.parametrize("name", ["linear", "ces"])
def test_pure_seasonal_series_is_predicted_almost_exactly(name):
    pytest.importorskip("statsforecast", reason="ces needs gpumesh[forecast]")
    y = seasonal(24 * 20 + 12, noise=0.001)
    got = make(name, 12).fit(y[:-12], SEASON).predict(12)
    assert np.max(np.abs(got - y[-12:])) < 0.05, got - y[-12:]       # amplitude 10; the last value misses by up to 14


def test_theta_deseasonalises_a_pure_seasonal_series():
    pytest.importorskip("statsforecast", reason="theta needs gpumesh[forecast]")
    y = seasonal(24 * 10 + 12, noise=0.001)
    got = make("theta", 12).fit(y[:-12], SEASON).predict(12)
    assert np.max(np.abs(got - y[-12:])) < 0.05


def test_ses_averages_noise_around_a_level():
    pytest.importorskip("statsforecast", reason="ses needs gpumesh[forecast]")
    y = 100 + np.random.default_rng(2).normal(0, 5, 400)
    got = make("ses", 5).fit(y, 1).predict(5)
    assert np.allclose(got, got[0]) and abs(got[0] - 100) < 2.5       # the last value is off by ~4 on average


def test_latest_is_the_freshest_raw_sample_and_the_last_bin_without_it():
    y, r = np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 9.0])
    assert list(Latest().fit(y, 1, recent=r).predict(2)) == [9.0, 9.0]
    assert list(Latest().fit(y, 1).predict(2)) == [3.0, 3.0]


def test_linear_without_evidence_forecasts_persistence():
    y = np.concatenate([np.zeros(200), np.ones(10)])      # too few usable rows for step 1: the last value
    assert DirectLinear().fit(y[-40:], 1).predict(3).tolist() == [1.0, 1.0, 1.0]


def test_freshest_sample_beats_the_last_bin_on_step_demand_and_is_chosen():
    means, last = steps()
    spec = BacktestSpec(horizon=2, season=1, models=("naive", "latest", "linear"), origins=40, ensembles=False)
    rep, _ = backtest(means, spec, recent=last)
    m = rep["models"]
    assert m["latest"]["mae"] < 0.9 * m["naive"]["mae"]
    assert m["linear"]["mae"] < m["naive"]["mae"]
    chosen = rep["chosen"].removeprefix("shrunk(").removesuffix(")")     # or either, shrunk toward the last value
    assert chosen in ("latest", "linear") and rep["beats_naive"]
    # without the raw samples `latest` is the last bin, exactly
    rep2, _ = backtest(means, spec)
    assert rep2["models"]["latest"]["mae"] == pytest.approx(rep2["models"]["naive"]["mae"])


def test_choose_passes_the_freshest_sample_to_the_refit():
    means, last = steps(n=600)
    f = choose(means, season=1, horizon=2, models=("naive", "latest"), origins=30, recent=last)
    if f.model == "latest":
        assert f.points == [last[-1]] * 2


@pytest.mark.parametrize("recent, says", [(np.ones(5), "has 5 values"), (np.full(1000, np.nan), "non-finite")])
def test_recent_that_does_not_line_up_is_refused(recent, says):
    y = seasonal(1000, noise=1.0)
    with pytest.raises(InvalidArgument, match=says) as e:
        backtest(y, BacktestSpec(horizon=2, season=SEASON, models=("naive", "latest")), recent=recent)
    assert e.value.field == "recent"


@pytest.mark.parametrize("name", ["linear", "latest"])
def test_conformal_interval_of_the_new_models_covers_about_its_level_on_noise(name):
    rng = np.random.default_rng(11)
    y = 100 + np.cumsum(rng.normal(0, 0.3, 3000)) + rng.normal(0, 2, 3000)      # a slow walk under noise
    rep, _ = backtest(y, BacktestSpec(horizon=3, season=1, models=("naive", name), origins=300, stride=3,
                                      ensembles=False))
    assert 0.82 <= rep["models"][name]["coverage"] <= 0.97, rep["models"][name]["coverage"]


def test_loader_keeps_the_last_raw_sample_per_bin_and_a_recent_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("t,v,fresh\n" + "".join(f"{60 * i},{i},{i * 10}\n" for i in range(40)))
    [s] = load(str(path), "t", "v", freq="10min")
    assert s.values[0] == pytest.approx(4.5) and s.recent[0] == 9.0 and s.recent[-1] == 39.0
    [c] = load(str(path), "t", "v", freq="10min", agg="count")
    assert c.recent is None                                   # a count has no "freshest sample"
    [g] = load(str(path), "t", "v", recent_col="fresh")
    assert g.recent[3] == 30.0 and g.recent.shape == g.values.shape
    with pytest.raises(InvalidArgument, match="no column 'nope'") as e:
        load(str(path), "t", "v", recent_col="nope")
    assert e.value.field == "recent-col"
    path.write_text("t,v,fresh\n0,1,2\n60,1,x\n")
    with pytest.raises(InvalidArgument, match="non-numeric value at row 3") as e:
        load(str(path), "t", "v", recent_col="fresh")
    assert e.value.field == "recent-col"


def test_level_at_is_the_concurrency_at_an_instant():
    starts, ends, w = [0, 10, 20], [30, 15, 25], [1.0, 2.0, 4.0]
    assert level_at(starts, ends, w, [0, 9.9, 10, 14.9, 15, 22, 29.9, 30]).tolist() == [1, 1, 3, 3, 1, 5, 1, 0]
    t, v = concurrency(starts, ends, w, 10.0)
    assert level_at(starts, ends, w, t + 10).tolist() == [3.0, 5.0, 0.0]

"""mesh.forecast: each forecaster on known series, conformal coverage, and the model choice rule."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.forecast import BacktestSpec, backtest, choose, conformal, make
from mesh.forecast.backtest import pick
from mesh.forecast.models import Forecaster

pytest.importorskip("statsforecast", reason="the statistical models need gpumesh[forecast]")

SEASON = 24


def seasonal(n: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    y = 50 + 10 * np.sin(2 * np.pi * t / SEASON) + 4 * np.cos(4 * np.pi * t / SEASON)
    return y + np.random.default_rng(seed).normal(0, noise, n) if noise else y


@pytest.mark.parametrize("name, tolerance", [("snaive", 0.001), ("mstl", 0.05), ("ets", 0.05)])
def test_pure_seasonal_series_is_predicted_almost_exactly(name, tolerance):
    y = seasonal(24 * 20 + 12, noise=0.001)
    train, truth = y[:-12], y[-12:]
    model = make(name, 12)
    assert isinstance(model, Forecaster)
    got = model.fit(train, SEASON).predict(12)
    assert got.shape == (12,)
    # within `tolerance` of the amplitude (10) at every step; the last value is off by up to 14
    assert np.max(np.abs(got - truth)) < tolerance * 10, (name, got - truth)
    assert np.max(np.abs(make("naive").fit(train, SEASON).predict(12) - truth)) > 5


def test_choose_on_a_pure_seasonal_series_forecasts_it_and_reports_a_tiny_error():
    y = seasonal(24 * 20 + 12, noise=0.01)
    f = choose(y[:-12], season=SEASON, horizon=12, models=("naive", "snaive", "mstl"), origins=8)
    assert f.model != "naive"
    assert np.max(np.abs(np.array(f.points) - y[-12:])) < 0.5
    assert f.errors[f.model] < 0.01 * f.errors["naive"]
    assert f.backtest_error < 1.5          # MASE: about the in-sample seasonal naive's error (the noise)
    assert len(f.lo) == len(f.hi) == 12
    assert all(lo <= p <= hi for lo, p, hi in zip(f.lo, f.points, f.hi))


def test_damped_trend_follows_a_trend_the_last_value_misses():
    t = np.arange(300, dtype=float)
    y = 3 * t + np.random.default_rng(1).normal(0, 2, 300)
    got = make("damped").fit(y[:-10], 1).predict(10)
    assert np.mean(np.abs(got - y[-10:])) < np.mean(np.abs(y[-11] - y[-10:])) / 2


def test_lstm_learns_a_noisy_season_better_than_the_last_value():
    pytest.importorskip("torch", reason="the lstm needs gpumesh[torch]")
    y = seasonal(24 * 30, noise=1.0, seed=3)
    rep, _ = backtest(y, BacktestSpec(horizon=6, season=SEASON, models=("naive", "snaive", "lstm"), origins=16,
                                      ensembles=False))
    assert rep["models"]["lstm"]["mae"] < 0.5 * rep["models"]["naive"]["mae"]


def test_lstm_is_deterministic_and_leaves_torch_state_alone():
    torch = pytest.importorskip("torch", reason="the lstm needs gpumesh[torch]")
    y = seasonal(24 * 10, noise=1.0, seed=4)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = make("lstm", 4).fit(y, SEASON).predict(4)
    assert torch.rand(1) == before               # fitting did not move the global generator
    b = make("lstm", 4).fit(y, SEASON).predict(4)
    assert np.array_equal(a, b)


# -- conformal intervals -------------------------------------------------------------------------------------

def test_conformal_interval_covers_its_level_on_exchangeable_noise():
    rng = np.random.default_rng(7)
    calib = rng.standard_t(df=4, size=(199, 3))         # heavy-tailed residuals, three steps
    lo_off, hi_off = conformal.residual_bounds(calib, 0.9)
    test = rng.standard_t(df=4, size=(20000, 3))
    cover = np.mean((test >= lo_off) & (test <= hi_off))
    assert 0.87 <= cover <= 0.93, cover


def test_conformal_interval_with_few_residuals_is_the_widest_they_allow():
    r = np.array([[-1.0], [2.0], [0.5]])
    lo, hi = conformal.residual_bounds(r, 0.9)
    assert lo[0] == pytest.approx(-1.0) and hi[0] == pytest.approx(2.0)
    lo, hi = conformal.interval(np.array([0.5]), r, 0.9, floor=0.0)
    assert lo[0] == 0.0 and hi[0] == pytest.approx(2.5)


def test_conformal_interval_widens_with_the_step_and_covers_each_step():
    rng = np.random.default_rng(5)
    sd = np.array([1.0, 2.0, 4.0, 8.0])               # errors grow with the horizon
    calib = rng.normal(0, 1, (30, 4)) * sd            # only 30 origins: too few per step alone
    lo_off, hi_off = conformal.residual_bounds(calib, 0.9)
    assert np.all(np.diff(hi_off) > 0) and np.all(np.diff(lo_off) < 0)
    test = rng.normal(0, 1, (20000, 4)) * sd
    cover = np.mean((test >= lo_off) & (test <= hi_off), axis=0)
    assert np.all((cover >= 0.85) & (cover <= 0.95)), cover


def test_backtest_intervals_cover_about_90_percent_of_synthetic_noise():
    y = 100 + np.random.default_rng(11).normal(0, 5, 3000)
    rep, _ = backtest(y, BacktestSpec(horizon=5, season=1, models=("naive", "snaive", "damped"), origins=400,
                                      stride=5))
    for name in ("naive", "damped"):
        assert 0.85 <= rep["models"][name]["coverage"] <= 0.95, (name, rep["models"][name]["coverage"])


# -- the choice ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maes, want", [
    ({"naive": 1.0, "a": 1.0, "b": 1.2}, "naive"),       # a tie with the last value does not beat it
    ({"naive": 1.0, "a": 0.9, "b": 0.95}, "a"),
    ({"naive": 1.0, "snaive": 0.5, "a": 0.7}, "snaive"),
    ({"naive": 0.2, "snaive": 0.5, "ensemble(a+b)": 0.3}, "naive"),
])
def test_pick_takes_the_best_model_that_beats_the_last_value(maes, want):
    assert pick(maes) == want


def test_a_model_that_beat_the_last_value_in_one_stretch_only_is_not_trusted():
    from mesh.forecast.backtest import steady_winners
    actual = np.zeros((8, 2))
    points = {"naive": np.full((8, 2), 1.0),
              "steady": np.full((8, 2), 0.8),                                   # better throughout
              "lucky": np.concatenate([np.zeros((4, 2)), np.full((4, 2), 1.2)])}  # better on average, not later
    points["late"] = np.concatenate([np.full((4, 2), 1.0), np.full((4, 2), 0.7)])   # ties, then wins
    assert steady_winners(actual, points) == {"naive", "steady", "late"}
    maes = {m: float(np.mean(np.abs(p))) for m, p in points.items()}
    assert maes["lucky"] < maes["steady"]
    assert pick(maes, steady_winners(actual, points)) == "steady"
    assert pick(maes, {"naive"}) == "naive"


@pytest.mark.parametrize("seed", range(4))
def test_choice_is_never_worse_than_the_last_value_in_its_backtest(seed):
    rng = np.random.default_rng(seed)
    # a random walk with a weak daily wave: persistence is hard to beat, as on cluster demand
    y = 200 + np.cumsum(rng.normal(0, 1, 900)) + 0.5 * np.sin(2 * np.pi * np.arange(900) / SEASON)
    rep, _ = backtest(y, BacktestSpec(horizon=6, season=SEASON, models=("naive", "snaive", "damped", "mstl"),
                                      origins=30))
    chosen = rep["chosen"]
    assert rep["models"][chosen]["selection_mae"] <= rep["models"]["naive"]["selection_mae"]
    assert chosen == "naive" or rep["models"][chosen]["selection_mae"] < rep["models"]["naive"]["selection_mae"]
    f = choose(y, season=SEASON, horizon=6, models=("naive", "snaive", "damped", "mstl"), origins=20)
    assert f.errors[f.model] <= f.errors["naive"]
    assert f.model == "naive" or f.errors[f.model] < f.errors["naive"]


def test_concurrency_is_the_time_average_of_open_intervals_per_bin():
    from mesh.forecast.events import concurrency
    # 2 GPUs over [0, 90), 1 GPU over [30, 150); 60-second bins
    t, v = concurrency([0, 30], [90, 150], [2, 1], step=60, t0=0, t1=180)
    assert t.tolist() == [0, 60, 120]
    assert v.tolist() == pytest.approx([2 + 0.5, 1 + 1, 0.5])


def test_choose_runs_in_a_process_pool_off_the_event_loop_with_the_same_answer():
    import asyncio
    from concurrent.futures import ProcessPoolExecutor
    y = seasonal(24 * 12, noise=0.5, seed=9)
    here = choose(y, SEASON, 6, ("naive", "snaive", "damped"), 0.9, 8)

    async def off_loop():
        with ProcessPoolExecutor(max_workers=1) as pool:
            return await asyncio.get_running_loop().run_in_executor(
                pool, choose, y, SEASON, 6, ("naive", "snaive", "damped"), 0.9, 8)

    there = asyncio.run(off_loop())
    assert there.model == here.model
    assert there.points == pytest.approx(here.points)
    assert there.lo == pytest.approx(here.lo) and there.hi == pytest.approx(here.hi)

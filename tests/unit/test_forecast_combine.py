"""Combinations shrunk toward the last value (mesh/forecast/combine.py) and adaptive conformal intervals
(ACI, mesh/forecast/conformal.py): known series, the weights, their out-of-sample check, and coverage on a
series whose noise drifts."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.forecast import BacktestSpec, backtest, choose
from mesh.forecast import combine
from mesh.forecast.backtest import RollingForecasts, sequential_intervals
from mesh.forecast.conformal import AdaptiveLevel


def wandering_wave(seed: int, n: int = 2400, amplitude: float = 5.0) -> np.ndarray:
    """A level that wanders (the last value wins on it) plus a daily wave (one season ago wins on it)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + np.cumsum(rng.normal(0, 1, n)) + amplitude * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.5, n)


@pytest.mark.parametrize("seed", range(3))
def test_the_combination_of_the_two_naive_forecasts_beats_both_on_a_wandering_wave(seed):
    y = wandering_wave(seed)
    rep, _ = backtest(y, BacktestSpec(horizon=6, season=24, models=("naive", "snaive"), origins=300,
                                      ensembles=False))
    m = rep["models"]
    assert rep["chosen"] == "shrunk(snaive)"
    assert rep["beats_both"]                                   # on the evaluation origins the choice never saw
    assert m["shrunk(snaive)"]["mae"] < 0.97 * min(m["naive"]["mae"], m["snaive"]["mae"])
    off, _ = backtest(y, BacktestSpec(horizon=6, season=24, models=("naive", "snaive"), origins=300,
                                      ensembles=False, shrink=False))
    assert off["chosen"] in ("naive", "snaive") and not off["beats_both"]


def test_step_weights_trust_a_model_only_at_the_steps_where_it_is_better():
    rng = np.random.default_rng(0)
    actual = rng.normal(0, 1, (200, 3))
    anchor = actual + rng.normal(0, 1, (200, 3))
    point = anchor.copy()
    point[:, 0] = actual[:, 0]                        # exact at step 1
    point[:, 2] = actual[:, 2] + 5                    # far off at step 3
    w = combine.step_weights(actual, point, anchor)
    assert w[0] == 1.0 and w[2] == 0.0
    assert w[1] == 0.0                                # the same as the anchor: a tie goes to the last value
    np.testing.assert_allclose(combine.apply(w, point, anchor)[:, 0], actual[:, 0])


def test_weights_that_only_fitted_their_own_stretch_are_not_trusted():
    actual = np.zeros((40, 2))
    naive = np.ones((40, 2))
    # a model right on the first half of the origins and far off on the second
    lucky = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 3.0)])
    steady = np.full((40, 2), 0.5)
    points = {"naive": naive, "lucky": lucky, "steady": steady}
    rows = np.arange(40)
    names = combine.add_shrunk(actual, points, rows, {})
    assert set(names) == {"shrunk(lucky)", "shrunk(steady)"}
    assert combine.validated(actual, points, rows, names) == {"shrunk(steady)"}


def test_choose_forecasts_the_shrunk_combination_with_the_weights_it_fitted():
    y = wandering_wave(0)
    f = choose(y, season=24, horizon=6, models=("naive", "snaive"), origins=200)
    assert f.model == "shrunk(snaive)"
    assert f.errors[f.model] < min(f.errors["naive"], f.errors["snaive"])
    last, season_ago = y[-1], y[-24:-18]
    # every point lies between the last value and one season ago (a convex combination of the two)
    lo, hi = np.minimum(last, season_ago), np.maximum(last, season_ago)
    assert np.all((np.array(f.points) >= lo - 1e-9) & (np.array(f.points) <= hi + 1e-9))
    assert not np.allclose(f.points, last)
    assert np.all(np.array(f.lo) <= f.points) and np.all(np.array(f.hi) >= f.points)


# -- adaptive conformal intervals --------------------------------------------------------------------------------

def drifting(sd: np.ndarray, h: int = 3, seed: int = 0) -> RollingForecasts:
    """Forecasts of 0 at every origin of a noise whose standard deviation at each origin is `sd`."""
    actual = np.random.default_rng(seed).normal(0, 1, (len(sd), h)) * np.asarray(sd)[:, None]
    return RollingForecasts(origins=np.arange(len(sd)) * h, actual=actual, points={"m": np.zeros((len(sd), h))})


def coverage(rf: RollingForecasts, ev: np.ndarray, gamma: float) -> float:
    lo, hi = sequential_intervals(rf, rf.points["m"], ev, 0.9, None, gamma=gamma)
    return float(np.mean((rf.actual[ev] >= lo) & (rf.actual[ev] <= hi)))


def test_aci_keeps_90_percent_coverage_where_the_noise_drifts_and_the_fixed_level_does_not():
    # the noise falls fourfold: calibrated on the loud stretch, the fixed level over-covers the quiet one
    rf = drifting(np.concatenate([np.full(300, 4.0), np.full(300, 1.0)]))
    ev = np.arange(300, 600)
    fixed, adaptive = coverage(rf, ev, 0.0), coverage(rf, ev, 0.02)
    assert fixed > 0.97 and 0.85 <= adaptive <= 0.95, (fixed, adaptive)
    # the noise grows steadily: the fixed level under-covers
    rf = drifting(np.linspace(1, 6, 600))
    fixed, adaptive = coverage(rf, ev, 0.0), coverage(rf, ev, 0.02)
    assert fixed < 0.85 <= adaptive <= 0.95, (fixed, adaptive)
    # exchangeable noise: both about 90%
    rf = drifting(np.ones(600))
    assert 0.85 <= coverage(rf, ev, 0.0) <= 0.95 and 0.85 <= coverage(rf, ev, 0.02) <= 0.95


def test_adaptive_level_moves_against_the_misses_and_stays_in_bounds():
    a = AdaptiveLevel(0.9, gamma=0.05)
    a.observe(1.0)                          # everything missed: wider next time
    assert a.level > 0.9
    for _ in range(1000):
        a.observe(1.0)
    assert a.level == 0.995
    for _ in range(3000):
        a.observe(0.0)                      # nothing missed for long: narrower, never below a coin flip
    assert a.level == 0.5


# -- intermittent demand (statsforecast's Croston, TSB, ADIDA, IMAPA) --------------------------------------------

def test_intermittent_models_forecast_the_demand_rate_and_tsb_follows_a_stretch_of_zeros():
    pytest.importorskip("statsforecast", reason="needs gpumesh[forecast]")
    from mesh.forecast import make
    rng = np.random.default_rng(1)
    y = np.where(rng.random(400) < 0.25, 8.0, 0.0)                 # a job a quarter of the time: rate 2.0
    for name in ("croston", "adida", "imapa"):
        got = make(name, 3).fit(y, 1).predict(3)
        assert got.shape == (3,) and 1.0 <= got[0] <= 3.0, (name, got)
    ended = np.concatenate([y, np.zeros(40)])                      # then the demand stops
    tsb, croston = (make(m, 3).fit(ended, 1).predict(3)[0] for m in ("tsb", "croston"))
    assert croston > 1.0                # Croston updates only on non-zero values: it still forecasts the old rate
    assert tsb < 0.1 * croston          # TSB lowers the probability of demand at every zero


def test_a_small_loss_on_one_half_is_tolerated_a_clear_one_is_not():
    from mesh.forecast.backtest import STEADY_TOLERANCE, steady_winners
    actual = np.zeros((40, 2))
    naive = np.ones((40, 2))
    near = np.concatenate([np.full((20, 2), 0.5), np.full((20, 2), 1 + STEADY_TOLERANCE / 2)])
    far = np.concatenate([np.full((20, 2), 0.5), np.full((20, 2), 1 + 2 * STEADY_TOLERANCE)])
    got = steady_winners(actual, {"naive": naive, "near": near, "far": far})
    assert got == {"naive", "near"}
    assert steady_winners(actual, {"naive": naive, "near": near}, tolerance=0.0) == {"naive"}

"""Forecasting without a cluster: forecasters behind one protocol, rolling-origin backtests, model
choice and conformal prediction intervals (docs/prediction.md).

    from mesh.forecast import choose
    f = choose(y, season=144, horizon=12)        # f.points, f.lo, f.hi, f.model, f.backtest_error

Everything here is pure and blocking (no global state): call it from a thread or process pool.
"""

from mesh.forecast.backtest import BacktestSpec, backtest
from mesh.forecast.models import BASELINES, DEFAULT_MODELS, REGISTRY, Forecaster, make
from mesh.forecast.select import Forecast, choose

__all__ = ["BASELINES", "BacktestSpec", "DEFAULT_MODELS", "Forecast", "Forecaster", "REGISTRY", "backtest",
           "choose", "make"]

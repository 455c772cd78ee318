"""`choose`: the forecast a caller asks for (points, interval, model, backtest error), in one call.

It runs the rolling-origin backtest on the series itself, picks the model (or ensemble, or a model shrunk
toward the last value step by step: mesh.forecast.combine) with the lowest backtest error among those that
beat the last value (and lost to it on neither half of the origins),
refits it on the whole history and forecasts; the interval comes from that model's backtest residuals per horizon step
(split conformal). Pure and blocking: run it in a thread or process (`loop.run_in_executor`) to keep
an event loop free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mesh.forecast import combine, conformal, metrics
from mesh.forecast.backtest import (BacktestSpec, check_recent, check_series, rolling_forecasts, select,
                                    sequential_intervals)
from mesh.forecast.models import DEFAULT_MODELS, fit_model, make


@dataclass(frozen=True)
class Forecast:
    points: list[float]            # horizon points, first = one step after the last observation
    lo: list[float]                # interval's low edge per step
    hi: list[float]                # high edge per step
    model: str                     # registry name, or ensemble(a+b[+c])
    backtest_error: float          # MASE of `model` over the backtest origins (vs the seasonal naive)
    level: float = 0.9             # the interval's nominal coverage
    errors: dict[str, float] = field(default_factory=dict)   # backtest MAE of every candidate

    def to_dict(self) -> dict:
        return {"points": self.points, "lo": self.lo, "hi": self.hi, "model": self.model,
                "backtest_error": self.backtest_error, "level": self.level, "errors": self.errors}


def members(model: str) -> list[str]:
    """The registry names a chosen model is the mean of (itself when not an ensemble; a `shrunk(m)`
    is m's members, shrunk toward the last value)."""
    base = combine.base_of(model)
    if base is not None:
        return members(base)
    if model.startswith("ensemble(") and model.endswith(")"):
        return model[len("ensemble("):-1].split("+")
    return [model]


def choose(y, season: int, horizon: int, models: tuple[str, ...] = DEFAULT_MODELS, level: float = 0.9,
           origins: int = 20, max_history: int = 0, recent=None) -> Forecast:
    """Backtest `models` on `y`, choose one, and forecast `horizon` steps with a `level` interval.
    `recent` (optional, aligned with `y`): the last raw sample in each bin, for `latest` and `linear`."""
    spec = BacktestSpec(horizon=horizon, season=season, models=tuple(models), origins=origins,
                        max_history=max_history, level=level)
    arr = check_series(y, spec)
    rec = check_recent(recent, arr)
    rf = rolling_forecasts(arr, spec, recent=rec)
    chosen, maes = select(rf.actual, rf, np.arange(len(rf.origins)), spec)
    hist = arr[-spec.history_cap():]
    rhist = None if rec is None else rec[-spec.history_cap():]
    point = np.mean([fit_model(make(m, horizon), hist, season, rhist).predict(horizon) for m in members(chosen)],
                    axis=0)
    if chosen in rf.weights:        # shrunk toward the last value with the weights the backtest fitted
        point = combine.apply(rf.weights[chosen], point, np.full(horizon, arr[-1]))
    floor = 0.0 if np.min(arr) >= 0 else None
    if floor is not None:
        point = np.maximum(point, floor)
    state: dict = {}            # the level adapted (ACI) over the backtest's forecasts, in time order
    sequential_intervals(rf, rf.points[chosen], np.arange(len(rf.origins)), level, floor, state=state)
    lo, hi = conformal.interval(point, rf.actual - rf.points[chosen], state["level"], floor)
    scale = metrics.mase_scale(arr[:rf.origins[0]], season) or 1.0
    return Forecast(points=point.tolist(), lo=lo.tolist(), hi=hi.tolist(), model=chosen,
                    backtest_error=maes[chosen] / scale, level=level, errors=maes)

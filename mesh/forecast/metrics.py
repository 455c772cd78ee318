"""Point and interval error measures of a backtest (arrays of actuals and forecasts, any shape).

MASE divides the mean absolute error by `scale`, the in-sample mean absolute error of the seasonal naive
forecast on the training history (Hyndman and Koehler 2006): below 1 beats what "the same as one season
ago" achieves in sample. The pinball loss is scaled the same way so series of any unit compare.
"""

from __future__ import annotations

import numpy as np


def mae(actual: np.ndarray, point: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(actual) - np.asarray(point))))


def mae_each(actual: np.ndarray, points: dict[str, np.ndarray], rows=None) -> dict[str, float]:
    """`mae(actual[rows], p[rows])` of every forecast in `points` (name -> array shaped like `actual`), in one
    array operation: the same numbers (each is the mean over one contiguous block, as mae takes it)."""
    if not points:
        return {}
    a = np.asarray(actual, dtype=float)
    pick = (lambda x: x[rows]) if rows is not None else (lambda x: x)
    # C order throughout: each forecast's errors one contiguous row, summed pairwise as np.mean sums them
    stack = np.ascontiguousarray(np.stack([pick(np.asarray(p, dtype=float)) for p in points.values()]))
    err = np.ascontiguousarray(np.abs(pick(a)[None] - stack)).reshape(len(points), -1)
    return dict(zip(points, np.mean(err, axis=1).tolist()))


def mase_scale(history: np.ndarray, season: int) -> float:
    """In-sample MAE of the seasonal naive forecast (lag `season`; lag 1 when the history is shorter
    than two seasons or the seasonal differences are all zero). 0 only for a constant history."""
    y = np.asarray(history, dtype=float)
    tiny = 1e-9 * max(1.0, float(np.max(np.abs(y)))) if y.size else 0.0    # rounding noise is no error
    for lag in ((season, 1) if 1 < season < len(y) else (1,)):
        if len(y) > lag:
            s = float(np.mean(np.abs(y[lag:] - y[:-lag])))
            if s > tiny:
                return s
    return 0.0


def smape(actual: np.ndarray, point: np.ndarray) -> float:
    """Symmetric MAPE in percent (0..200); a step where both are 0 counts as 0."""
    a, f = np.asarray(actual, dtype=float), np.asarray(point, dtype=float)
    den = np.abs(a) + np.abs(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(den > 0, 200.0 * np.abs(a - f) / den, 0.0)
    return float(np.mean(terms))


def pinball(actual: np.ndarray, forecast: np.ndarray, q: float) -> float:
    """Mean pinball (quantile) loss of `forecast` as the q-quantile."""
    d = np.asarray(actual, dtype=float) - np.asarray(forecast, dtype=float)
    return float(np.mean(np.maximum(q * d, (q - 1) * d)))


def interval_pinball(actual, point, lo, hi, level: float) -> float:
    """Mean pinball loss over the interval's two quantiles and the median (the point)."""
    a = (1 - level) / 2
    return (pinball(actual, lo, a) + pinball(actual, point, 0.5) + pinball(actual, hi, 1 - a)) / 3


def coverage(actual, lo, hi) -> float:
    """Share of actuals inside [lo, hi]."""
    a = np.asarray(actual, dtype=float)
    return float(np.mean((a >= np.asarray(lo)) & (a <= np.asarray(hi))))

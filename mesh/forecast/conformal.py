"""Split conformal prediction intervals from backtest residuals, one interval per horizon step.

For step k, the residuals `actual - point` of past forecasts k steps ahead are ranked; the interval's
edges are the residual quantiles at (1-level)/2 and (1+level)/2 with the finite-sample correction of
split conformal prediction (rank ceil((n+1)q)), added to the point forecast. Under exchangeable
residuals the interval covers at least `level` of new values; with n residuals too few for the rank
the outermost residual is used (the interval is then as wide as the data allows).
"""

from __future__ import annotations

import math

import numpy as np


def residual_bounds(residuals: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """`residuals` is (forecasts, steps); returns per-step (low, high) offsets to add to the point."""
    r = np.sort(np.asarray(residuals, dtype=float), axis=0)
    n = r.shape[0]
    if n == 0:
        raise ValueError("no residuals to calibrate on")
    alpha = (1 - level) / 2
    hi_rank = min(n, math.ceil((n + 1) * (1 - alpha)))       # 1-based
    lo_rank = max(1, math.floor((n + 1) * alpha))
    return r[lo_rank - 1], r[hi_rank - 1]


def interval(point: np.ndarray, residuals: np.ndarray, level: float,
             floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Interval (lo, hi) around `point` (one per step) from past residuals (forecasts x steps).
    `floor` clips the low edge (0 for a quantity that cannot go negative)."""
    lo_off, hi_off = residual_bounds(residuals, level)
    lo, hi = point + lo_off[: len(point)], point + hi_off[: len(point)]
    if floor is not None:
        lo = np.maximum(lo, floor)
    return lo, hi

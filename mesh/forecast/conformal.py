"""Split conformal prediction intervals from backtest residuals, one interval per horizon step.

A backtest gives few residuals per horizon step (one per origin), too few for a 90% rank: with 20 the
conformal rank is the largest residual and the interval over-covers. So the residuals of every step are
pooled after dividing each step's by its own scale (the step's mean absolute residual: errors grow with
the horizon), the pooled normalised residuals are ranked with the finite-sample correction of split
conformal prediction (rank ceil((n+1)q) at q = (1-level)/2 and (1+level)/2), and each step's edges are
those quantiles times its scale, added to the point forecast. Under exchangeable origins the interval
covers about `level` of new values at each step.
"""

from __future__ import annotations

import math

import numpy as np


def residual_bounds(residuals: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """`residuals` is (forecasts, steps) of actual - point; returns per-step (low, high) offsets."""
    r = np.asarray(residuals, dtype=float)
    if r.ndim == 1:
        r = r[:, None]
    if r.shape[0] == 0:
        raise ValueError("no residuals to calibrate on")
    scale = np.mean(np.abs(r), axis=0)
    overall = float(np.mean(np.abs(r)))
    scale = np.where(scale > 0, scale, overall if overall > 0 else 1.0)
    z = np.sort((r / scale).ravel())
    n = z.size
    alpha = (1 - level) / 2
    hi_rank = min(n, math.ceil((n + 1) * (1 - alpha)))       # 1-based ranks
    lo_rank = max(1, math.floor((n + 1) * alpha))
    return z[lo_rank - 1] * scale, z[hi_rank - 1] * scale


def interval(point: np.ndarray, residuals: np.ndarray, level: float,
             floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Interval (lo, hi) around `point` (one per step) from past residuals (forecasts x steps).
    `floor` clips the low edge (0 for a quantity that cannot go negative)."""
    lo_off, hi_off = residual_bounds(residuals, level)
    lo, hi = point + lo_off[: len(point)], point + hi_off[: len(point)]
    if floor is not None:
        lo = np.maximum(lo, floor)
    return lo, np.maximum(hi, lo)

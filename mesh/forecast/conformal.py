"""Split conformal prediction intervals from backtest residuals, one interval per horizon step.

A backtest gives few residuals per horizon step (one per origin), too few for a 90% rank: with 20 the
conformal rank is the largest residual and the interval over-covers. So the residuals of every step are
pooled after dividing each step's by its own scale (the step's mean absolute residual: errors grow with
the horizon), the pooled normalised residuals are ranked with the finite-sample correction of split
conformal prediction (rank ceil((n+1)q) at q = (1-level)/2 and (1+level)/2), and each step's edges are
those quantiles times its scale, added to the point forecast. Under exchangeable origins the interval
covers about `level` of new values at each step.

Origins are not exchangeable when the series drifts (quiet stretches after bursts, or the reverse), so the
level the quantiles are taken at adapts: adaptive conformal inference (ACI, Gibbs and Candes 2021) moves
the miscoverage target by `gamma` times the gap between the nominal miscoverage and the share of the last
forecast's values that fell outside, `alpha_{t+1} = alpha_t + gamma (alpha - err_t)`, so the long-run
coverage tends to `level` whatever the drift (`AdaptiveLevel`).
"""

from __future__ import annotations

import math

import numpy as np


ACI_GAMMA = 0.02        # the step of the adaptive level, per forecast scored (Gibbs and Candes use 0.005 over
                        # thousands of points; a backtest scores tens to hundreds of forecasts)
ACI_BOUNDS = (0.5, 0.995)   # the adapted level stays inside these: never below a coin flip, never "all of it"


class AdaptiveLevel:
    """The interval level adapted by ACI: `level` now, `observe(miss)` once a forecast's outcome is known
    (`miss`: the share of its values outside the interval it was issued with)."""

    def __init__(self, level: float, gamma: float = ACI_GAMMA) -> None:
        self.target_alpha = 1 - level
        self.alpha = 1 - level
        self.gamma = gamma

    @property
    def level(self) -> float:
        return float(min(ACI_BOUNDS[1], max(ACI_BOUNDS[0], 1 - self.alpha)))

    def observe(self, miss: float) -> None:
        # alpha is kept inside the bounds too, so a long run of misses does not wind it up past them
        self.alpha = min(1 - ACI_BOUNDS[0], max(1 - ACI_BOUNDS[1], self.alpha + self.gamma * (self.target_alpha - miss)))


def residual_bounds(residuals: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """`residuals` is (forecasts, steps) of actual - point; returns per-step (low, high) offsets."""
    r = np.asarray(residuals, dtype=float)
    if r.ndim == 1:
        r = r[:, None]
    if r.shape[0] == 0:
        raise ValueError("no residuals to calibrate on")
    scale = np.abs(r).sum(axis=0) / r.shape[0]          # (sums, not np.mean: this runs per origin in a walk)
    overall = float(scale.sum()) / scale.size
    scale = np.where(scale > 0, scale, overall if overall > 0 else 1.0)
    z = (r / scale).ravel()
    n = z.size
    alpha = (1 - level) / 2
    hi_rank = min(n, math.ceil((n + 1) * (1 - alpha)))       # 1-based ranks
    lo_rank = max(1, math.floor((n + 1) * alpha))
    part = np.partition(z, (lo_rank - 1, hi_rank - 1))
    return part[lo_rank - 1] * scale, part[hi_rank - 1] * scale


def interval(point: np.ndarray, residuals: np.ndarray, level: float,
             floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Interval (lo, hi) around `point` (one per step) from past residuals (forecasts x steps).
    `floor` clips the low edge (0 for a quantity that cannot go negative)."""
    lo_off, hi_off = residual_bounds(residuals, level)
    lo, hi = point + lo_off[: len(point)], point + hi_off[: len(point)]
    if floor is not None:
        lo = np.maximum(lo, floor)
    return lo, np.maximum(hi, lo)

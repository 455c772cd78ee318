"""From stored samples to a forecast: the request checked, the history binned into a regular series,
the model chosen and fitted (mesh.forecast.choose). Pure and blocking apart from `forecast`'s thread hop.

Every refusal names the field and the limit: a bad kind, horizon, step or level is InvalidArgument; a
history too short for a backtest at that horizon and step is FailedPrecondition saying how much is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controlplane.forecast.history import KINDS
from mesh import errors

MAX_BINS = 3000            # history bins a fit sees at most (bounds the CPU per call)
TARGET_POINTS = 30         # points per forecast when the step is not given
MAX_POINTS = 360           # forecast points at most (horizon / step): the backtest needs 8x that in bins
DAY = 86400.0
MODELS = ("naive", "snaive", "damped", "latest")        # fast enough to fit per call; mstl when seasons exist
SEASONAL_MODELS = ("naive", "snaive", "damped", "latest", "mstl")
LINEAR_MAX_STEPS = 60      # the per-step linear model joins when the horizon has at most this many steps


@dataclass(frozen=True)
class Plan:
    kind: str
    name: str
    metric: str
    horizon_s: float
    step_s: float
    level: float

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.horizon_s / self.step_s - 1e-9))


def plan(kind: str, name: str, metric: str, horizon_s: float, step_s: float, level: float) -> Plan:
    if kind not in KINDS:
        raise errors.InvalidArgument.of("kind", f"{kind!r} is not a series kind" if kind else "is required",
                                        ", ".join(KINDS))
    for field, value in (("name", name), ("metric", metric)):
        if not value or len(value) > 256 or not value.isprintable():
            raise errors.InvalidArgument.of(field, "is required" if not value else "is not valid",
                                            "printable, 1-256 characters")
    if not math.isfinite(horizon_s) or horizon_s <= 0:
        raise errors.InvalidArgument.of("horizon_seconds", f"must be > 0, got {horizon_s:g}")
    if not math.isfinite(step_s) or step_s < 0:
        raise errors.InvalidArgument.of("step_seconds", f"must be >= 0 (0: chosen from the horizon), got {step_s:g}")
    step = step_s or max(1.0, horizon_s / TARGET_POINTS)
    if horizon_s / step > MAX_POINTS:
        raise errors.InvalidArgument.of("step_seconds", f"{step:g}s makes {horizon_s / step:.0f} points over "
                                                        f"{horizon_s:g}s", f"at most {MAX_POINTS} points "
                                                        f"(step_seconds >= {horizon_s / MAX_POINTS:g})")
    level = level or 0.9
    if not 0 < level < 1:
        raise errors.InvalidArgument.of("level", f"must be between 0 and 1, got {level:g}")
    return Plan(kind, name, metric, float(horizon_s), float(step), float(level))


def finite(rows, col: int = 1) -> list:
    """The rows whose time and `col` value are finite numbers: Prometheus answers "NaN" and "+Inf" samples
    (a gauge set so, a division by zero in a recording rule), and one such sample failed every fit of the
    series (INVALID_ARGUMENT naming no request field, or no forecast at all) for as long as it was in range."""
    return [r for r in rows if math.isfinite(r[0]) and math.isfinite(r[col])]


def binned(rows, step: float) -> tuple[np.ndarray, np.ndarray]:
    """[(t, v)] oldest first -> (bin end times, bin means) on a regular grid of `step`, the last MAX_BINS;
    an empty bin takes the previous bin's value (samples may be coarser than the step as they age)."""
    t = np.asarray([r[0] for r in rows], dtype=float)
    v = np.asarray([r[1] for r in rows], dtype=float)
    idx = np.floor(t / step).astype(np.int64)
    first = max(int(idx[0]), int(idx[-1]) - MAX_BINS + 1)
    keep = idx >= first
    idx, v = idx[keep] - first, v[keep]
    n = int(idx[-1]) + 1
    sums = np.bincount(idx, weights=v, minlength=n)
    counts = np.bincount(idx, minlength=n)
    out = np.empty(n)
    last = v[0]
    for i in range(n):
        if counts[i]:
            last = sums[i] / counts[i]
        out[i] = last
    ends = (np.arange(n) + first + 1) * step
    return ends, out


def last_in_bins(rows, times: np.ndarray, step: float) -> np.ndarray:
    """The last raw sample at or before the end of each bin of `times` (bin end times from binned()): the
    freshest reading a forecast made then could have used (mesh.forecast.local)."""
    t = np.asarray([r[0] for r in rows], dtype=float)
    v = np.asarray([r[1] for r in rows], dtype=float)
    idx = np.searchsorted(t, times, side="left") - 1      # samples strictly before the bin's end
    return v[np.maximum(idx, 0)]


def needed_points(steps: int, season: int = 1) -> int:
    """Bins a rolling-origin backtest needs at this horizon (mesh.forecast.backtest.check_series)."""
    from mesh.forecast.backtest import MIN_ORIGINS, BacktestSpec
    spec = BacktestSpec(horizon=steps, season=season)
    return spec.min_train() + steps + (MIN_ORIGINS - 1) * steps


def check_history(p: Plan, rows) -> tuple[np.ndarray, np.ndarray]:
    name = f"{p.kind}/{p.name} {p.metric}"
    if not rows:
        raise errors.FailedPrecondition(f"series {name} has no samples yet")
    span = rows[-1][0] - rows[0][0]
    if p.horizon_s > span:
        raise errors.InvalidArgument.of("horizon_seconds", f"{p.horizon_s:g}s is longer than the history of "
                                                           f"{name} ({span:.1f}s)", f"at most {span:.1f}")
    times, values = binned(rows, p.step_s)
    need = needed_points(p.steps)
    if values.size < need:
        raise errors.FailedPrecondition(
            f"series {name} has {values.size} points of {p.step_s:g}s; a forecast {p.steps} steps ahead needs "
            f"at least {need} ({need * p.step_s:g}s of history): wait, or ask for a shorter horizon or a larger "
            f"step_seconds")
    return times, values


def season_for(step: float, n: int, steps: int = 1) -> int:
    """A daily season when the history holds three days of it at this step, and enough points for the seasonal
    backtest at `steps` ahead (it needs two seasons before its first origin), else none. Without the second
    condition a history of three to four days at a horizon of a quarter to half a day (step 300 s, horizon
    100 steps: 900 points, 976 needed) failed the fit with INVALID_ARGUMENT naming `series`, a field no request
    has, where check_history had let it through: the same history forecasts without the season."""
    season = DAY / step
    if (season.is_integer() and 2 <= season <= MAX_BINS // 3 and n >= 3 * season
            and n >= needed_points(steps, int(season))):
        return int(season)
    return 1


def fit(p: Plan, times: np.ndarray, values: np.ndarray, recent: np.ndarray | None = None) -> dict:
    """Blocking: the chosen model's forecast as {"points", "lo", "hi", "model", "mase", "times"}.
    `recent`: the last raw sample in each bin (last_in_bins), for the models `latest` and `linear`."""
    out_times = times[-1] + p.step_s * np.arange(1, p.steps + 1)
    if np.ptp(values) == 0:       # nothing varies: the forecast is the value, exactly
        flat = [float(values[-1])] * p.steps
        return {"points": flat, "lo": flat, "hi": flat, "model": "constant", "mase": 0.0, "times": out_times}
    from mesh.forecast import choose
    season = season_for(p.step_s, values.size, p.steps)
    models = SEASONAL_MODELS if season > 1 else MODELS
    if p.steps <= LINEAR_MAX_STEPS:
        models += ("linear",)
    f = choose(values, season=season, horizon=p.steps, models=models, level=p.level, recent=recent)
    return {"points": f.points, "lo": f.lo, "hi": f.hi, "model": f.model, "mase": float(f.backtest_error),
            "times": out_times}

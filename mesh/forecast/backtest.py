"""Rolling-origin backtest of forecasters on one series, and the honest choice of a model.

Protocol (docs/prediction.md): origins step back from the end of the series `stride` steps apart (the
horizon by default, so forecasts do not overlap). At each origin every model is fitted on the history
before it (at most `max_history` points) and forecasts `horizon` steps; nothing after the origin is seen.
The earlier half of the origins *selects*: the model (or the mean of the best two or three, an ensemble)
with the lowest mean absolute error, among those that beat the last value there and did no worse than it
on either half of those origins; the naive forecast when none does. The later half *evaluates*: every figure reported
(MASE, sMAPE, pinball loss, interval coverage) comes from origins the choice never saw, and each of
their intervals is calibrated only on the residuals of origins whose outcome was already known
(sequential split conformal).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mesh.errors import InvalidArgument
from mesh.forecast import combine, conformal, metrics, walk
from mesh.forecast.models import BASELINES, DEFAULT_MODELS, REGISTRY, fit_model, make, rolling_points

MIN_ORIGINS = 4     # two to select on, two to evaluate on
STEADY_TOLERANCE = 0.05   # a candidate may lose this much to the last value on either half of the selection


@dataclass(frozen=True)
class BacktestSpec:
    horizon: int
    season: int = 1
    models: tuple[str, ...] = DEFAULT_MODELS
    origins: int = 40
    stride: int = 0            # steps between origins; 0 = the horizon
    max_history: int = 0       # points each fit sees; 0 = max(10 seasons, 50 horizons, 500)
    level: float = 0.9         # interval level
    ensembles: bool = True
    shrink: bool = True        # candidates shrunk toward the last value, step by step (mesh.forecast.combine)
    calibration: int = 0       # intervals calibrate on the latest N observed origins; 0 = all of them
    aci_gamma: float = conformal.ACI_GAMMA   # the interval level adapts by this step (ACI); 0 = fixed level
    steady_tolerance: float = STEADY_TOLERANCE   # see steady_winners

    def history_cap(self) -> int:
        return self.max_history or max(10 * self.season, 50 * self.horizon, 500)

    def min_train(self) -> int:
        return max(2 * self.season, 4 * self.horizon, 30)


@dataclass
class RollingForecasts:
    origins: np.ndarray                     # index of the first forecast step, per origin
    actual: np.ndarray                      # (origins, horizon)
    points: dict[str, np.ndarray]           # model -> (origins, horizon)
    fit_seconds: dict[str, float] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)   # shrunk(m) -> per-step weight of m


def check_series(y, spec: BacktestSpec, what: str = "series") -> np.ndarray:
    """The series as floats, or InvalidArgument naming what is wrong with it."""
    try:
        arr = np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        raise InvalidArgument.of(what, "has non-numeric values") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidArgument.of(what, "is empty")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidArgument.of(what, f"has a missing or non-finite value at position {bad}")
    if np.ptp(arr) == 0:
        raise InvalidArgument.of(what, f"is constant ({arr[0]:g} at all {arr.size} points): nothing to forecast")
    if spec.horizon < 1:
        raise InvalidArgument.of("horizon", f"must be >= 1, got {spec.horizon}")
    if spec.season < 1:
        raise InvalidArgument.of("season", f"must be >= 1, got {spec.season}")
    if not 0 < spec.level < 1:
        raise InvalidArgument.of("level", f"must be between 0 and 1, got {spec.level}")
    for m in spec.models:
        if m not in REGISTRY:
            raise InvalidArgument.of("models", f"unknown model {m!r}", ", ".join(REGISTRY))
    need = spec.min_train() + spec.horizon + (MIN_ORIGINS - 1) * (spec.stride or spec.horizon)
    if arr.size < need:
        raise InvalidArgument.of(
            what, f"has {arr.size} points, too short for horizon {spec.horizon} with season {spec.season}: "
                  f"a rolling-origin backtest needs at least {need} ({MIN_ORIGINS} origins)")
    return arr


def plan_origins(n: int, spec: BacktestSpec) -> np.ndarray:
    stride = spec.stride or spec.horizon
    last = n - spec.horizon
    starts = [last - i * stride for i in range(spec.origins) if last - i * stride >= spec.min_train()]
    return np.array(sorted(starts), dtype=int)


def rolling_forecasts(y: np.ndarray, spec: BacktestSpec,
                      progress: Callable[[str], None] | None = None,
                      recent: np.ndarray | None = None) -> RollingForecasts:
    """Every model's forecasts from every origin (fitted on the history before it only). `recent`, when
    given, is the last raw sample inside each bin of `y` (the models with `uses_recent` see it, up to the
    origin only)."""
    origins = plan_origins(len(y), spec)
    h, cap = spec.horizon, spec.history_cap()
    actual = np.stack([y[o:o + h] for o in origins])
    floor = 0.0 if np.min(y[:origins[0]]) >= 0 else None     # never negative before the first origin
    points: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in dict.fromkeys(("naive", "snaive") + tuple(spec.models)):
        t0 = time.perf_counter()
        out = rolling_points(name, y, origins, h, spec.season, cap, recent)
        if out is None:
            out = _fit_every_origin(name, y, origins, spec, recent)
        if floor is not None:
            out = np.maximum(out, floor)
        points[name], seconds[name] = out, round(time.perf_counter() - t0, 3)
        if progress:
            progress(f"{name}: {len(origins)} origins in {seconds[name]:.1f}s")
    return RollingForecasts(origins, actual, points, seconds)


def _fit_every_origin(name: str, y: np.ndarray, origins: np.ndarray, spec: BacktestSpec,
                      recent: np.ndarray | None) -> np.ndarray:
    """A model's forecasts from every origin, fitted on the history before each one."""
    h, cap = spec.horizon, spec.history_cap()
    model = make(name, h)
    out = np.empty((len(origins), h))
    # a model with update() (the LSTM) is retrained every refit_every steps and otherwise given the new
    # history only; the others are refitted at every origin.
    refit_every = getattr(model, "refit_every", None)
    refit_every = (refit_every or 10 * h) if hasattr(model, "update") else 0
    fitted_at = None
    for i, o in enumerate(origins):
        hist = y[max(0, o - cap):o]
        if fitted_at is None or not refit_every or o - fitted_at >= refit_every:
            fit_model(model, hist, spec.season, None if recent is None else recent[max(0, o - cap):o])
            fitted_at = o
        else:
            model.update(hist)
        out[i] = model.predict(h)
    return out


def add_ensembles(rf: RollingForecasts, rank: list[str]) -> list[str]:
    """Means of the best two and three models of `rank` (best first), added to rf.points."""
    names = []
    for k in (2, 3):
        if len(rank) >= k:
            name = "ensemble(" + "+".join(rank[:k]) + ")"
            rf.points[name] = np.mean([rf.points[m] for m in rank[:k]], axis=0)
            names.append(name)
    return names


def pick(maes: dict[str, float], steady: set[str] | None = None) -> str:
    """The lowest error among the models that beat the last value (and are in `steady`, when given);
    when none does, the better of the two naive forecasts (the last value on a tie)."""
    bar = maes["naive"]
    better = {m: e for m, e in maes.items() if e < bar and (steady is None or m in steady)}
    if better:
        return min(better, key=better.get)
    return "snaive" if maes.get("snaive", bar) < bar else "naive"


def select(actual: np.ndarray, rf: RollingForecasts, rows: np.ndarray, spec: BacktestSpec) -> tuple[str, dict]:
    """The choice on origins `rows`: ensembles of the best two and three models and every model shrunk
    toward the last value (weights fitted on `rows`) join the candidates in `rf.points`; the pick is the
    lowest error among those that beat the last value, did no worse than it on either half of `rows`, and
    (a shrunk one) whose weights fitted on the earlier half beat it on the later half. Returns (chosen,
    MAE on `rows` of every candidate)."""
    a = actual[rows]
    maes = metrics.mae_each(actual, rf.points, rows)
    if spec.ensembles:
        for name in add_ensembles(rf, sorted(maes, key=maes.get)):
            maes[name] = metrics.mae(a, rf.points[name][rows])
    shrunk: list[str] = []
    if spec.shrink:
        shrunk = combine.add_shrunk(actual, rf.points, rows, rf.weights)
        maes.update(metrics.mae_each(actual, {name: rf.points[name] for name in shrunk}, rows))
    steady = steady_winners(a, {m: p[rows] for m, p in rf.points.items()}, spec.steady_tolerance)
    steady -= set(shrunk) - combine.validated(actual, rf.points, rows, shrunk)
    return pick(maes, steady), maes


def steady_winners(actual: np.ndarray, points: dict[str, np.ndarray],
                   tolerance: float = STEADY_TOLERANCE) -> set[str]:
    """Models within `tolerance` of the last value's error on the earlier and on the later half of these
    origins alike: a model that won one stretch and clearly lost the other (a regime that ended) is not
    trusted over persistence; a small loss on one half (noise in a few tens of origins) is tolerated, since
    the pick also requires beating the last value over all of them. A tie is allowed (the LSTM forecasts
    persistence until it has history enough to train on)."""
    n = len(actual)
    halves = (slice(0, n // 2), slice(n // 2, n)) if n >= 2 else (slice(0, n),)
    errors = [metrics.mae_each(actual, points, h) for h in halves]
    return {m for m in points if all(e[m] <= (1 + tolerance) * e["naive"] for e in errors)}


def evaluate(y: np.ndarray, rf: RollingForecasts, spec: BacktestSpec, intervals: dict | None = None) -> dict:
    """Select on the earlier origins, score every model and the choice on the later ones. `intervals`,
    when given, receives model -> (evaluation origin rows, lo, hi)."""
    n_o, h = len(rf.origins), spec.horizon
    split = n_o // 2
    sel = np.arange(split)
    ev = np.array([j for j in range(split, n_o) if rf.origins[j] >= rf.origins[split - 1] + h])
    chosen, sel_mae = select(rf.actual, rf, sel, spec)
    scale = metrics.mase_scale(y[:rf.origins[ev[0]]], spec.season)
    floor = 0.0 if np.min(y[:rf.origins[0]]) >= 0 else None
    a = rf.actual[ev]
    maes = metrics.mae_each(rf.actual, rf.points, ev)
    report = {}
    for m, p in rf.points.items():
        lo, hi = sequential_intervals(rf, p, ev, spec.level, floor, spec.calibration, spec.aci_gamma)
        if intervals is not None:
            intervals[m] = (ev, lo, hi)
        report[m] = {
            "mae": maes[m], "mase": maes[m] / scale,
            "rel_mae_naive": maes[m] / maes["naive"] if maes["naive"] else None,
            "rel_mae_snaive": maes[m] / maes["snaive"] if maes["snaive"] else None,
            "smape": metrics.smape(a, p[ev]),
            "pinball": metrics.interval_pinball(a, p[ev], lo, hi, spec.level) / scale,
            "coverage": metrics.coverage(a, lo, hi),
            "width": float(np.mean(hi - lo)) / scale,
            "selection_mae": sel_mae[m],
        }
        if m in rf.fit_seconds:
            report[m]["fit_seconds"] = rf.fit_seconds[m]
    best_naive = min(maes["naive"], maes["snaive"])
    return {
        "points": int(len(y)), "origins": {"selection": int(len(sel)), "evaluation": int(len(ev))},
        "scale": scale, "models": report, "chosen": chosen,
        "beats_naive": maes[chosen] < maes["naive"], "beats_snaive": maes[chosen] < maes["snaive"],
        "beats_both": maes[chosen] < best_naive,
        "gain_vs_best_naive": 1 - maes[chosen] / best_naive if best_naive else None,
        "evaluation_origins": [int(rf.origins[j]) for j in ev],
    }


def sequential_intervals(rf: RollingForecasts, p: np.ndarray, ev: np.ndarray, level: float,
                         floor: float | None, window: int = 0,
                         gamma: float = conformal.ACI_GAMMA,
                         state: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of the forecasts at origins `ev`, each calibrated on the residuals of the origins whose
    whole horizon had been observed by then (the latest `window` of them, when > 0). With `gamma` > 0 the
    level adapts (ACI): intervals are issued from the first origin with a known residual on, and each one's
    misses, once its horizon is observed, move the level of the later ones. `state`, when given, receives
    "level": the adapted level once every origin's outcome is in (what the next forecast is issued at).
    The same numbers as `conformal.interval` at every origin in time order, computed at once
    (mesh.forecast.walk)."""
    return walk.sequential(rf.origins, rf.actual, p, ev, level, floor, window, gamma, state)


def check_recent(recent, y: np.ndarray) -> np.ndarray | None:
    """`recent` as floats aligned with `y`, or None; InvalidArgument when it does not line up."""
    if recent is None:
        return None
    r = np.asarray(recent, dtype=float)
    if r.shape != y.shape:
        raise InvalidArgument.of("recent", f"has {r.size} values for a series of {y.size}")
    if not np.all(np.isfinite(r)):
        raise InvalidArgument.of("recent", "has a missing or non-finite value")
    return r


def backtest(y, spec: BacktestSpec, progress: Callable[[str], None] | None = None,
             intervals: dict | None = None, recent=None) -> tuple[dict, RollingForecasts]:
    """Check, forecast from every origin, evaluate. Returns (report, forecasts); see evaluate().
    `recent`: the last raw sample in each bin of `y`, for the models that use it (mesh.forecast.local)."""
    arr = check_series(y, spec)
    rf = rolling_forecasts(arr, spec, progress, check_recent(recent, arr))
    return evaluate(arr, rf, spec, intervals), rf


__all__ = ["BASELINES", "BacktestSpec", "RollingForecasts", "backtest", "check_recent", "check_series", "evaluate",
           "pick", "plan_origins", "rolling_forecasts", "select", "sequential_intervals"]

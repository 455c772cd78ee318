"""The per-origin forecasting code as it was before the speed-up (git 78a1951), kept as the slow reference
that tests/unit/test_forecast_speed.py checks the fast paths against, bit for bit.

Only the functions the speed-up replaced are here, verbatim but for their names: the sequential conformal
walk (one `conformal.interval` per origin), the per-step shrinkage weights (one grid point at a time), the
rolling forecasts of the cheap models (a fit and a predict per origin), and the selection and evaluation
(one `metrics.mae` per model). `reference()` switches mesh.forecast to them; `python -m
tests.unit._forecast_reference` times choose() both ways in one process and prints JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import time

import numpy as np

from mesh.forecast import combine, conformal, metrics
from mesh.forecast.backtest import (STEADY_TOLERANCE, BacktestSpec, RollingForecasts, add_ensembles, pick,
                                    plan_origins)
from mesh.forecast.combine import GRID
from mesh.forecast.models import fit_model, make


def sequential_intervals_ref(rf: RollingForecasts, p: np.ndarray, ev: np.ndarray, level: float,
                         floor: float | None, window: int = 0,
                         gamma: float = conformal.ACI_GAMMA,
                         state: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of the forecasts at origins `ev`, each calibrated on the residuals of the origins whose
    whole horizon had been observed by then (the latest `window` of them, when > 0). With `gamma` > 0 the
    level adapts (ACI): intervals are issued from the first origin with a known residual on, and each one's
    misses, once its horizon is observed, move the level of the later ones. `state`, when given, receives
    "level": the adapted level once every origin's outcome is in (what the next forecast is issued at)."""
    h = p.shape[1]
    lo, hi = np.empty((len(ev), h)), np.empty((len(ev), h))
    resid = rf.actual - p
    adaptive = conformal.AdaptiveLevel(level, gamma) if gamma > 0 else None
    issued: list[tuple[int, float]] = []       # (origin index, miss share) not yet observed by the level
    want = {int(j): k for k, j in enumerate(ev)}
    first = int(ev[0]) if not adaptive else 0
    ends = rf.origins + h              # sorted, as the origins are
    for j in range(first, int(ev[-1]) + 1):
        m = int(np.searchsorted(ends, rf.origins[j], side="right"))     # origins 0..m-1 observed by now
        if not m or (j not in want and not adaptive):
            continue
        known = np.arange(m)
        if adaptive:
            while issued and rf.origins[issued[0][0]] + h <= rf.origins[j]:
                adaptive.observe(issued.pop(0)[1])
        if window:
            known = known[-window:]
        a, b = conformal.interval(p[j], resid[known], adaptive.level if adaptive else level, floor)
        if adaptive:
            issued.append((j, float(np.count_nonzero((rf.actual[j] < a) | (rf.actual[j] > b))) / h))
        if j in want:
            lo[want[j]], hi[want[j]] = a, b
    if state is not None:
        for _, miss in issued if adaptive else ():
            adaptive.observe(miss)
        state["level"] = adaptive.level if adaptive else level
    return lo, hi



def step_weights_ref(actual: np.ndarray, point: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    a, p, n = (np.asarray(x, dtype=float) for x in (actual, point, anchor))
    errs = np.stack([np.mean(np.abs(a - (n + w * (p - n))), axis=0) for w in GRID])    # (grid, steps)
    return GRID[np.argmin(errs, axis=0)]


def rolling_forecasts_ref(y: np.ndarray, spec, progress=None, recent=None) -> RollingForecasts:
    origins = plan_origins(len(y), spec)
    h, cap = spec.horizon, spec.history_cap()
    actual = np.stack([y[o:o + h] for o in origins])
    floor = 0.0 if np.min(y[:origins[0]]) >= 0 else None     # never negative before the first origin
    points: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in dict.fromkeys(("naive", "snaive") + tuple(spec.models)):
        model = make(name, h)
        out = np.empty((len(origins), h))
        t0 = time.perf_counter()
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
        if floor is not None:
            out = np.maximum(out, floor)
        points[name], seconds[name] = out, round(time.perf_counter() - t0, 3)
        if progress:
            progress(f"{name}: {len(origins)} origins in {seconds[name]:.1f}s")
    return RollingForecasts(origins, actual, points, seconds)



def select_ref(actual: np.ndarray, rf: RollingForecasts, rows: np.ndarray, spec: BacktestSpec) -> tuple[str, dict]:
    """The choice on origins `rows`: ensembles of the best two and three models and every model shrunk
    toward the last value (weights fitted on `rows`) join the candidates in `rf.points`; the pick is the
    lowest error among those that beat the last value, did no worse than it on either half of `rows`, and
    (a shrunk one) whose weights fitted on the earlier half beat it on the later half. Returns (chosen,
    MAE on `rows` of every candidate)."""
    a = actual[rows]
    maes = {m: metrics.mae(a, p[rows]) for m, p in rf.points.items()}
    if spec.ensembles:
        for name in add_ensembles(rf, sorted(maes, key=maes.get)):
            maes[name] = metrics.mae(a, rf.points[name][rows])
    shrunk: list[str] = []
    if spec.shrink:
        shrunk = combine.add_shrunk(actual, rf.points, rows, rf.weights)
        for name in shrunk:
            maes[name] = metrics.mae(a, rf.points[name][rows])
    steady = steady_winners_ref(a, {m: p[rows] for m, p in rf.points.items()}, spec.steady_tolerance)
    steady -= set(shrunk) - combine.validated(actual, rf.points, rows, shrunk)
    return pick(maes, steady), maes


def steady_winners_ref(actual: np.ndarray, points: dict[str, np.ndarray],
                   tolerance: float = STEADY_TOLERANCE) -> set[str]:
    """Models within `tolerance` of the last value's error on the earlier and on the later half of these
    origins alike: a model that won one stretch and clearly lost the other (a regime that ended) is not
    trusted over persistence; a small loss on one half (noise in a few tens of origins) is tolerated, since
    the pick also requires beating the last value over all of them. A tie is allowed (the LSTM forecasts
    persistence until it has history enough to train on)."""
    n = len(actual)
    halves = (slice(0, n // 2), slice(n // 2, n)) if n >= 2 else (slice(0, n),)
    out = set()
    for m, p in points.items():
        if all(metrics.mae(actual[h], p[h]) <= (1 + tolerance) * metrics.mae(actual[h], points["naive"][h])
               for h in halves):
            out.add(m)
    return out


def evaluate_ref(y: np.ndarray, rf: RollingForecasts, spec: BacktestSpec, intervals: dict | None = None) -> dict:
    """Select on the earlier origins, score every model and the choice on the later ones. `intervals`,
    when given, receives model -> (evaluation origin rows, lo, hi)."""
    n_o, h = len(rf.origins), spec.horizon
    split = n_o // 2
    sel = np.arange(split)
    ev = np.array([j for j in range(split, n_o) if rf.origins[j] >= rf.origins[split - 1] + h])
    chosen, sel_mae = select_ref(rf.actual, rf, sel, spec)
    scale = metrics.mase_scale(y[:rf.origins[ev[0]]], spec.season)
    floor = 0.0 if np.min(y[:rf.origins[0]]) >= 0 else None
    a = rf.actual[ev]
    maes = {m: metrics.mae(a, p[ev]) for m, p in rf.points.items()}
    report = {}
    for m, p in rf.points.items():
        lo, hi = sequential_intervals_ref(rf, p, ev, spec.level, floor, spec.calibration, spec.aci_gamma)
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

@contextlib.contextmanager
def reference():
    """mesh.forecast runs the reference code paths inside this context."""
    bt = importlib.import_module("mesh.forecast.backtest")     # (the package exports a function of that name)
    select = importlib.import_module("mesh.forecast.select")
    patches = [(select, "rolling_forecasts", rolling_forecasts_ref), (select, "sequential_intervals", sequential_intervals_ref),
               (select, "select", select_ref), (bt, "rolling_forecasts", rolling_forecasts_ref),
               (bt, "sequential_intervals", sequential_intervals_ref), (bt, "select", select_ref),
               (bt, "evaluate", evaluate_ref), (combine, "step_weights", step_weights_ref)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _bench() -> dict:
    """choose() per call, the reference code paths against the current ones, in one process: the replay's
    demand call (a week of 10-minute buckets, 144 origins, naive+snaive, level 0.99) and pressure call
    (8 origins), and the backtest CLI's shape (40 origins, naive, snaive, ses, latest, linear), on the
    Helios VC vc8Sj (10-minute means, the last 1,008 and 2,000 bins)."""
    import os
    from mesh.forecast.series import load
    select = importlib.import_module("mesh.forecast.select")
    traces = os.environ.get("MESH_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces"))
    s = load(os.path.join(traces, "helios-earth-2020", "vc8Sj_cluster_sequence_vc.csv"), "time", "running_gpu_num",
             freq="10min")[0]

    calls = {"replay_demand": (s.values[-1008:], None, dict(season=144, horizon=2, models=("naive", "snaive"),
                                                            level=0.99, origins=144)),
             "replay_pressure": (s.values[-300:], None, dict(season=60, horizon=2, models=("naive", "snaive"),
                                                             level=0.9, origins=8)),
             "backtest_shape": (s.values[-2000:], s.recent[-2000:],
                                dict(season=144, horizon=3, models=("naive", "snaive", "ses", "latest", "linear"),
                                     origins=40))}
    out = {}
    for name, (y, recent, kw) in calls.items():
        n = 3 if "ses" in kw["models"] else 200
        row = {}
        for label, ctx in (("reference_ms", reference), ("fast_ms", contextlib.nullcontext)):
            with ctx():
                best = float("inf")
                for _ in range(3):
                    t0 = time.process_time()
                    for _ in range(n):
                        f = select.choose(y, recent=recent, **kw)
                    best = min(best, (time.process_time() - t0) / n)
                row[label], row[label.replace("_ms", "_model")] = round(best * 1e3, 3), f.model
        row["speedup"] = round(row["reference_ms"] / row["fast_ms"], 2)
        out[name] = row
    return {"choose_cpu_ms_per_call": out}


if __name__ == "__main__":
    import json
    print(json.dumps(_bench(), indent=2))

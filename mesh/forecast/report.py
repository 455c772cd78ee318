"""Backtests of many series (one CSV's groups) and their summary: what `meshctl forecast backtest` prints.

Each series is backtested on its own (`backtest.backtest`), in worker processes when asked; the summary
counts how often the chosen model beat the last value, the seasonal naive and both, its error relative
to the better naive forecast, and the pooled coverage of its intervals on the evaluation origins.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np

from mesh.errors import InvalidArgument
from mesh.forecast.backtest import BacktestSpec, backtest
from mesh.forecast.series import Series

PREDICTION_COLUMNS = ("series", "origin", "step", "time", "actual", "point", "lo", "hi", "model")


def _iso(t) -> str:
    return str(np.datetime_as_string(t, unit="s"))


def one(series: Series, spec: BacktestSpec, predictions: bool = False) -> dict:
    """The backtest report of one series (`{"series", ..., "error"}` when the series is unusable)."""
    intervals: dict | None = {} if predictions else None
    try:
        rep, rf = backtest(series.values, spec, intervals=intervals, recent=series.recent)
    except InvalidArgument as exc:
        return {"series": series.name, "error": exc.message.replace("series: ", f"series {series.name!r}: ", 1)}
    rep = {"series": series.name, **rep}
    rep.pop("evaluation_origins")
    if predictions:
        rows = []
        for model, (ev, lo, hi) in intervals.items():
            for k, j in enumerate(ev):
                o = int(rf.origins[j])
                for step in range(spec.horizon):
                    rows.append((series.name, _iso(series.times[o - 1]), step + 1, _iso(series.times[o + step]),
                                 float(rf.actual[j, step]), float(rf.points[model][j, step]),
                                 float(lo[k, step]), float(hi[k, step]), model))
        rep["predictions"] = rows
    return rep


def _one_task(task: tuple) -> dict:
    return one(*task)


def run(series: list[Series], spec: BacktestSpec, jobs: int = 1, predictions: bool = False,
        progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Reports in the order of `series`."""
    tasks = [(s, spec, predictions) for s in series]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            results = []
            for r in pool.map(_one_task, tasks):
                results.append(r)
                if progress:
                    progress(r)
            return results
    results = []
    for t in tasks:
        results.append(_one_task(t))
        if progress:
            progress(results[-1])
    return results


def summarize(reports: list[dict]) -> dict:
    """Across series: shares beating each naive forecast, the chosen model's error relative to the
    better naive (median and mean), MASE per model (median), and the chosen intervals' pooled coverage."""
    ok = [r for r in reports if "error" not in r]
    if not ok:
        return {"series": 0, "skipped": len(reports)}
    chosen = [r["models"][r["chosen"]] for r in ok]
    rel = [1 - r["gain_vs_best_naive"] for r in ok if r["gain_vs_best_naive"] is not None]
    counts: dict[str, int] = {}
    for r in ok:
        counts[r["chosen"]] = counts.get(r["chosen"], 0) + 1
    base = sorted({m for r in ok for m in r["models"] if not m.startswith("ensemble(")})
    # series on which a naive forecast made no error at all (flat through the evaluation): nothing to beat
    contested = [r for r in ok if min(r["models"]["naive"]["mae"], r["models"]["snaive"]["mae"]) > 0]
    weights = [r["origins"]["evaluation"] for r in ok]
    return {
        "series": len(ok), "skipped": len(reports) - len(ok),
        "chosen": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "beats_naive_share": sum(r["beats_naive"] for r in ok) / len(ok),
        "beats_snaive_share": sum(r["beats_snaive"] for r in ok) / len(ok),
        "beats_both_share": sum(r["beats_both"] for r in ok) / len(ok),
        "naive_exact_series": len(ok) - len(contested),
        "beats_both_share_contested": (sum(r["beats_both"] for r in contested) / len(contested)) if contested else None,
        "rel_mae_best_naive_median": statistics.median(rel) if rel else None,
        "rel_mae_best_naive_mean": statistics.fmean(rel) if rel else None,
        "coverage": float(np.average([c["coverage"] for c in chosen], weights=weights)),
        "coverage_contested": float(np.average([r["models"][r["chosen"]]["coverage"] for r in contested],
                                               weights=[r["origins"]["evaluation"] for r in contested]))
        if contested else None,
        "mase_median": {m: statistics.median([r["models"][m]["mase"] for r in ok if m in r["models"]]) for m in base}
        | {"chosen": statistics.median([c["mase"] for c in chosen])},
    }

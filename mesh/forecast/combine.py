"""Combinations fitted on the selection origins: a model shrunk toward the last value, step by step.

Cluster demand is persistent: at most horizons the last value is hard to beat, and a model that beats it
on average often does so only at some steps ahead (the freshest sample helps at the first steps; a season
helps far ahead). `shrunk(m)` forecasts, at step k ahead,

    naive_k + w_k * (m_k - naive_k),        w_k in {0, 0.1, ..., 1}

with each step's weight the one of least absolute error on the selection origins (w_k = 0 is the last
value, w_k = 1 the model). This is forecast combination with the last value as the anchor (Bates and
Granger 1969; shrinkage toward a benchmark), and horizon-specific at once: a model trusted only where it
earned it. `shrunk(snaive)` is the combination of the two naive forecasts. A weight is fitted on the
origins it is scored on only in `select.choose` (on all the backtest, for the forecast it returns); the
backtest's evaluation half never sees its own outcomes.
"""

from __future__ import annotations

import numpy as np

GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
ANCHOR = "naive"


def shrunk_name(model: str) -> str:
    return f"shrunk({model})"


def base_of(name: str) -> str | None:
    """The model a `shrunk(...)` name shrinks (None when `name` is not one)."""
    if name.startswith("shrunk(") and name.endswith(")"):
        return name[len("shrunk("):-1]
    return None


def step_weights(actual: np.ndarray, point: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Per step (columns), the weight in GRID of least mean absolute error of anchor + w (point - anchor)
    over the rows (origins); ties go to the smaller weight (closer to the last value)."""
    a, p, n = (np.asarray(x, dtype=float) for x in (actual, point, anchor))
    errs = np.mean(np.abs(a[None] - (n[None] + GRID[:, None, None] * (p - n)[None])), axis=1)   # (grid, steps)
    return GRID[np.argmin(errs, axis=0)]


def apply(weights: np.ndarray, point: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """anchor + w (point - anchor), per step (the last axis)."""
    w = np.asarray(weights, dtype=float)[: np.shape(point)[-1]]
    return np.asarray(anchor, dtype=float) + w * (np.asarray(point, dtype=float) - np.asarray(anchor, dtype=float))


def add_shrunk(actual: np.ndarray, points: dict[str, np.ndarray], rows: np.ndarray,
               weights: dict[str, np.ndarray]) -> list[str]:
    """For every model in `points` but the anchor, `shrunk(model)` with weights fitted on `rows` (the
    selection origins), added to `points` (all origins) and `weights`. Returns the new names."""
    names = []
    anchor = points[ANCHOR]
    for m in [m for m in points if m != ANCHOR and base_of(m) is None]:
        w = step_weights(actual[rows], points[m][rows], anchor[rows])
        name = shrunk_name(m)
        points[name], weights[name] = apply(w, points[m], anchor), w
        names.append(name)
    return names


def validated(actual: np.ndarray, points: dict[str, np.ndarray], rows: np.ndarray, names: list[str]) -> set[str]:
    """The `shrunk(...)` names in `names` whose weights, fitted on the earlier half of `rows` only, beat the
    last value on the later half: weights are fitted numbers, so they must earn their place out of the
    sample they were fitted on (a season that held through one stretch and then ended is caught here)."""
    if len(rows) < 4:
        return set()
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2:]
    bar = float(np.mean(np.abs(actual[second] - points[ANCHOR][second])))
    out = set()
    for name in names:
        base = base_of(name)
        w = step_weights(actual[first], points[base][first], points[ANCHOR][first])
        if float(np.mean(np.abs(actual[second] - apply(w, points[base][second], points[ANCHOR][second])))) < bar:
            out.add(name)
    return out

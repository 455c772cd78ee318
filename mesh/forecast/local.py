"""Local models for persistent, bursty demand: the freshest sample, and a direct robust linear model of
the change from the last value. numpy only; each fit is a few small least-squares solves.

Both can use `recent`, the last raw sample inside each bin (mesh.forecast.series keeps it when it averages
raw samples into bins): a bin's mean lags the present by half a bin, and on step-like demand (jobs that
start and end) the freshest sample is often a better guess of the next bins than the last bin's mean.
This is information the forecaster has at the origin (nothing after it is used); without `recent` both
models still work on the series alone.

- `latest`: the freshest sample repeated (the last value of the raw samples, not of the bins).
- `linear`: for each step k ahead, y[t+k] - y[t] regressed on features known at t: the freshest sample
  minus the last bin, the last bin's distance to the means of the last 3, 12 and 48 bins (mean
  reversion), the last change, and, with a season, the change over the same k steps one season ago.
  Fitted by least absolute deviations (iteratively reweighted least squares) with a ridge penalty that
  pulls every coefficient to zero, which is the last value: with weak evidence it forecasts persistence.
"""

from __future__ import annotations

import numpy as np

LONG = 48          # the longest mean-reversion window, in bins


class Latest:
    """The freshest raw sample, repeated (the last bin's value when no raw samples are given)."""

    name = "latest"
    uses_recent = True

    def fit(self, y: np.ndarray, season: int, recent: np.ndarray | None = None) -> "Latest":
        self._last = float(recent[-1]) if recent is not None and len(recent) else float(y[-1])
        return self

    def predict(self, h: int) -> np.ndarray:
        return np.full(h, self._last)


def _trailing_mean(y: np.ndarray, w: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo = np.maximum(0, idx - w + 1)
    return (c[idx + 1] - c[lo]) / (idx + 1 - lo)


def design(y: np.ndarray, recent: np.ndarray | None, season: int, k: int) -> tuple[np.ndarray, int]:
    """Features (one row per index t, for a forecast k steps after t) and the first usable row."""
    n = len(y)
    cols = [] if recent is None else [recent - y]
    cols += [_trailing_mean(y, 3) - y, _trailing_mean(y, 12) - y, np.concatenate([[0.0], np.diff(y)]),
             _trailing_mean(y, LONG) - y]
    first = LONG
    if season > 1:
        t = np.arange(n)
        a = t + k - season
        ok = (t >= season) & (a < n)
        seasonal = np.zeros(n)
        seasonal[ok] = y[a[ok]] - y[t[ok] - season]
        cols.append(seasonal)
        first = max(first, season)
    return np.stack(cols, axis=1), first


class DirectLinear:
    """Per-step robust linear model of the change from the last value (see the module docstring)."""

    name = "linear"
    uses_recent = True

    def __init__(self, ridge: float = 3.0, train: int = 1000, iterations: int = 6) -> None:
        self.ridge, self.train, self.iterations = ridge, train, iterations

    def fit(self, y: np.ndarray, season: int, recent: np.ndarray | None = None) -> "DirectLinear":
        self._y = np.asarray(y, dtype=float)
        self._r = None if recent is None else np.asarray(recent, dtype=float)
        self._season = season
        self._cache: dict[int, float] = {}
        return self

    def _step(self, k: int) -> float:
        y, r, n = self._y, self._r, len(self._y)
        season = self._season if self._season > 1 and n > 2 * self._season + k else 1
        scale = float(np.mean(np.abs(np.diff(y[-self.train:])))) if n > 1 else 0.0
        if scale == 0:
            return float(y[-1])
        feats, first = design(y, r, season, k)
        rows = np.arange(max(first, n - k - self.train), n - k)
        if len(rows) < 30:
            return float(y[-1])
        x = feats[rows] / scale
        d = (y[rows + k] - y[rows]) / scale
        p = x.shape[1]
        w = np.ones(len(rows))
        beta = np.zeros(p)
        for _ in range(self.iterations):          # IRLS for least absolute deviations
            xw = x * w[:, None]
            beta = np.linalg.solve(x.T @ xw + self.ridge * np.eye(p), xw.T @ d)
            w = 1.0 / np.maximum(np.abs(d - x @ beta), 0.05)
        return float(y[-1] + scale * (feats[n - 1] / scale) @ beta)

    def predict(self, h: int) -> np.ndarray:
        return np.array([self._step(k) for k in range(1, h + 1)])

"""A request-rate series from any CSV, and the arrivals it stands for (`meshctl bench autoscale`).

    s = read_series("qps.csv", time_col="timestamp_anon", value_col="value")   # rows at one time are summed
    times = arrivals(s, rate_scale=0.05, speedup=10, seed=0)                    # Poisson, in bench seconds

The time column is seconds (any number) or a date-time ISO 8601 understands (``2020-05-01 00:00:00``);
rows with the same time are summed (per-container rows of a trace), rows whose value is empty, ``None`` or
``NULL`` are skipped. Each point's value times ``rate_scale`` is the request rate (per second) until the next
point; ``speedup`` compresses time (a 60 s point lasts 60/speedup bench seconds at the same request rate).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

MISSING = {"", "none", "null", "nan"}


class SeriesError(ValueError):
    """The series cannot be used; the message names the column, row or problem."""


@dataclass(frozen=True)
class Series:
    t: np.ndarray            # seconds from the first point, ascending
    value: np.ndarray        # the series' value at each point (summed over rows at that time)
    step_s: float            # the median step between points
    path: str = ""

    @property
    def duration_s(self) -> float:
        return float(self.t[-1] - self.t[0] + self.step_s)


def _time(text: str, row: int, col: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()[:26]).timestamp()
    except ValueError:
        raise SeriesError(f"row {row}: time column {col!r} has {text!r}, neither seconds nor an ISO date-time") \
            from None


def read_series(path: str, time_col: str, value_col: str, limit: int = 0) -> Series:
    """The series in ``path``; SeriesError naming the column or row that is wrong.

    ``limit`` > 0 keeps the first ``limit`` distinct times."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise SeriesError(f"--series {path}: {e.strerror or e}") from None
    sums: dict[float, float] = {}
    with f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for col, flag in ((time_col, "--time-col"), (value_col, "--value-col")):
            if col not in cols:
                raise SeriesError(f"{flag} {col!r}: no such column in {path} (columns: {', '.join(cols) or 'none'})")
        for i, row in enumerate(reader, start=2):
            raw = (row.get(value_col) or "").strip()
            if raw.lower() in MISSING:
                continue
            try:
                v = float(raw)
            except ValueError:
                raise SeriesError(f"row {i}: value column {value_col!r} has {raw!r}, not a number") from None
            if not math.isfinite(v) or v < 0:
                raise SeriesError(f"row {i}: value column {value_col!r} has {raw!r}; a rate must be finite and >= 0")
            t = _time(row.get(time_col) or "", i, time_col)
            if t not in sums and limit and len(sums) >= limit:
                continue
            sums[t] = sums.get(t, 0.0) + v
    if len(sums) < 2:
        raise SeriesError(f"--series {path}: {len(sums)} usable point(s) in {value_col!r}; at least 2 are needed")
    times = np.array(sorted(sums), dtype=float)
    values = np.array([sums[t] for t in times], dtype=float)
    if values.max() <= 0:
        raise SeriesError(f"--series {path}: every value of {value_col!r} is 0: no demand to serve")
    step = float(np.median(np.diff(times)))
    return Series(t=times - times[0], value=values, step_s=step, path=str(path))


def rates(series: Series, rate_scale: float, speedup: float) -> tuple[np.ndarray, np.ndarray]:
    """Per point: its start in bench seconds and its request rate (per bench second)."""
    return series.t / speedup, series.value * rate_scale


def arrivals(series: Series, rate_scale: float, speedup: float, seed: int = 0) -> np.ndarray:
    """Poisson arrival times (bench seconds) with the series' piecewise-constant rate."""
    rng = np.random.default_rng(seed)
    starts, lam = rates(series, rate_scale, speedup)
    ends = np.append(starts[1:], starts[-1] + series.step_s / speedup)
    out = []
    for a, b, r in zip(starts, ends, lam):
        n = rng.poisson(r * (b - a))
        if n:
            out.append(np.sort(rng.uniform(a, b, n)))
    return np.concatenate(out) if out else np.zeros(0)

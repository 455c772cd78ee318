"""A pooled forecaster per application type, learned from the interaction log (seed 000).

A new workload has no history of its own, but the workloads of its application type before it do:
`AppTypeProfile.fit(runs)` aligns every past run of a type on its age (seconds since it started),
averages its use into age bins of `step` seconds, and keeps, per type and age bin, what the runs did.
`forecast(app_type, age, horizon)` is then, for each future age bin, the median of those runs (the
type's typical use at that age) with the interval between their `(1-level)/2` and `(1+level)/2`
quantiles; given the workload's `current` value, the forecast is that value plus the runs' median change
from the same age (each run's own level taken out), which follows the type's shape from where this one is.

    runs = [Run("training", [(age_s, memory_used), ...]), ...]       # e.g. from ListInteractions
    prof = AppTypeProfile(step=30).fit(runs)
    f = prof.forecast("training", age=60, horizon=300, current=12e9)   # f.points, f.lo, f.hi, f.runs
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mesh.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class Run:
    app_type: str
    samples: list[tuple[float, float]]      # (age in seconds since the workload started, value)


@dataclass(frozen=True)
class AppForecast:
    app_type: str
    ages: list[float]         # the end of each forecast age bin, seconds since start
    points: list[float]
    lo: list[float]
    hi: list[float]
    runs: int                 # past runs the forecast pools


class AppTypeProfile:
    def __init__(self, step: float = 30.0, level: float = 0.9, min_runs: int = 2) -> None:
        if step <= 0:
            raise InvalidArgument.of("step", f"must be > 0, got {step}")
        if not 0 < level < 1:
            raise InvalidArgument.of("level", f"must be between 0 and 1, got {level}")
        self.step, self.level, self.min_runs = step, level, min_runs
        self.table: dict[str, np.ndarray] = {}       # app type -> (runs, age bins), NaN where a run had ended

    def _bins(self, samples) -> np.ndarray:
        a = np.asarray([s[0] for s in samples], dtype=float)
        v = np.asarray([s[1] for s in samples], dtype=float)
        ok = np.isfinite(a) & np.isfinite(v) & (a >= 0)
        a, v = a[ok], v[ok]
        if a.size == 0:
            return np.empty(0)
        idx = (a // self.step).astype(int)
        n = int(idx.max()) + 1
        sums, counts = np.bincount(idx, v, n), np.bincount(idx, minlength=n)
        out = np.full(n, np.nan)
        out[counts > 0] = sums[counts > 0] / counts[counts > 0]
        for i in range(1, n):                 # a bin with no sample between two samples: the previous value
            if np.isnan(out[i]) and not np.isnan(out[i - 1]):
                out[i] = out[i - 1]
        return out

    def fit(self, runs: list[Run]) -> "AppTypeProfile":
        per: dict[str, list[np.ndarray]] = {}
        for r in runs:
            b = self._bins(r.samples)
            if b.size:
                per.setdefault(r.app_type, []).append(b)
        self.table = {}
        for app, rows in per.items():
            width = max(len(b) for b in rows)
            m = np.full((len(rows), width), np.nan)
            for i, b in enumerate(rows):
                m[i, :len(b)] = b
            self.table[app] = m
        return self

    def forecast(self, app_type: str, age: float, horizon: float, current: float | None = None) -> AppForecast:
        m = self.table.get(app_type)
        if m is None:
            raise FailedPrecondition(f"no runs of app type {app_type!r} in the log (known: "
                                     f"{', '.join(sorted(self.table)) or 'none'})")
        if horizon <= 0:
            raise InvalidArgument.of("horizon", f"must be > 0, got {horizon}")
        now = int(max(age, 0) // self.step)
        steps = max(1, int(np.ceil(horizon / self.step)))
        cols = np.arange(now + 1, now + 1 + steps)
        cols = np.minimum(cols, m.shape[1] - 1)           # past the longest run: its last age bin
        future = m[:, cols]
        if current is not None and now < m.shape[1]:
            future = current + (future - m[:, [now]])     # each run's change from this age
        q = ((1 - self.level) / 2, 0.5, (1 + self.level) / 2)
        usable = np.sum(np.all(np.isfinite(future), axis=1))
        if usable < self.min_runs:
            raise FailedPrecondition(f"app type {app_type!r} has {usable} run(s) that lasted past age {age:g}s; "
                                     f"a pooled forecast needs at least {self.min_runs}")
        lo, mid, hi = np.nanquantile(future, q, axis=0)
        ages = (np.arange(now + 1, now + 1 + steps) + 1) * self.step
        return AppForecast(app_type, ages.tolist(), mid.tolist(), lo.tolist(), hi.tolist(), int(usable))


def runs_from_interactions(entries, metric: str = "memory_used") -> list[Run]:
    """Runs from interaction-log entries (controlplane Interaction objects or the SDK's dicts): the
    workload's use samples with their age since it started."""
    out = []
    for e in entries:
        if isinstance(e, dict):
            app, started = e["app_type"], e["started"]
            usage = [(u["at"], u["utilization_pct"] if metric == "utilization" else u["memory_used_bytes"])
                     for u in e["usage"]]
        else:
            app, started = e.app_type, e.started
            usage = [(t, u if metric == "utilization" else mem) for t, u, mem in e.usage]
        if not app:
            continue
        if isinstance(started, str):
            started = np.datetime64(started.rstrip("Z")).astype("datetime64[ns]").astype(float) / 1e9
            usage = [(np.datetime64(t.rstrip("Z")).astype("datetime64[ns]").astype(float) / 1e9, v)
                     for t, v in usage]
        out.append(Run(app, [(t - started, v) for t, v in usage if v is not None]))
    return out

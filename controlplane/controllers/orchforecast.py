"""What the live orchestrator forecasts from, and where the fits run.

- `Windows`: the recent samples the leader sees, in memory and bounded: every GPU reading (memory
  used as a fraction of the GPU, temperature), every slice reading (memory used), and the Allocate
  request stream (arrival times per warm key). The history store (controlplane/forecast/) keeps
  the long record for ForecastService; these windows hold only what the next fits need.
- `jobs_for_*`: the series binned on the rule's step (`forecasting.binned`; request arrivals are
  counted per step, zeros included).
- `fit_jobs`: the fits, with the same code ForecastService uses (`forecasting.plan` and `fit`: model
  chosen per series by rolling-origin backtest, conformal intervals). A series too short for a
  backtest at that horizon gets no forecast (the rules then do nothing for it).
- `ProcessFitter`: `fit_jobs` in worker processes (spawned, niced), so fitting never takes the
  event loop's CPU or GIL; `InlineFitter` runs them in a thread (tests).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import concurrent.futures.process
import math
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np

from controlplane.forecast import forecasting

MAX_SAMPLES = 20_000         # per window


@dataclass(frozen=True)
class Job:
    kind: str                 # gpu | slice | fleet
    name: str                 # node/index | slice id | warm key
    metric: str               # memory_fraction | temperature | memory_used | requests
    step_s: float
    horizon_s: float
    level: float
    times: tuple              # bin end times
    values: tuple


@dataclass(frozen=True)
class Forecast:
    kind: str
    name: str
    metric: str
    model: str
    step_s: float
    last: float
    points: tuple
    lo: tuple
    hi: tuple
    mase: float

    @property
    def peak_hi(self) -> float:
        return max(self.hi) if self.hi else self.last


class Windows:
    def __init__(self, keep_s: float, clock=time.time) -> None:
        self.keep_s = keep_s
        self.clock = clock
        self.gpu: dict[str, collections.deque] = {}        # node/index -> (t, memory fraction, temperature)
        self.slice: dict[str, collections.deque] = {}      # slice id -> (t, memory used bytes)
        self.arrivals: dict[str, collections.deque] = {}   # warm key -> arrival times
        self.first_arrival: dict[str, float] = {}

    def _push(self, table: dict, key: str, row: tuple) -> None:
        q = table.get(key)
        if q is None:
            q = table[key] = collections.deque(maxlen=MAX_SAMPLES)
        q.append(row)
        while q and q[0][0] < row[0] - self.keep_s:
            q.popleft()

    def on_gpu(self, g, r) -> None:
        at = r.at.ToNanoseconds() / 1e9 if r.HasField("at") else self.clock()
        total = r.memory_total_bytes or g.memory_bytes
        self._push(self.gpu, f"{g.node}/{g.index}", (at, r.memory_used_bytes / total if total else 0.0,
                                                     r.temperature_c))

    def on_slices(self, node: str, readings) -> None:
        now = self.clock()
        for r in readings:
            self._push(self.slice, r.slice_id, (now, float(r.memory_used_bytes)))

    def on_request(self, key: str, count: int = 1) -> None:
        now = self.clock()
        self.first_arrival.setdefault(key, now)
        q = self.arrivals.setdefault(key, collections.deque(maxlen=MAX_SAMPLES))
        for _ in range(count):
            q.append((now,))
        while q and q[0][0] < now - self.keep_s:
            q.popleft()

    def track(self, key: str) -> None:
        """Count `key`'s arrivals from now on (no request of it seen yet): its demand is then forecast once its
        window holds enough steps, zeros included."""
        if key not in self.arrivals:
            self.arrivals[key] = collections.deque(maxlen=MAX_SAMPLES)
            self.first_arrival.setdefault(key, self.clock())

    def seed_gpu(self, name: str, temperature, used, total) -> int:
        """Earlier readings of a GPU from the history store ([(t, v)] per metric), before any live one."""
        if self.gpu.get(name):
            return 0
        used_at, total_at = dict(used), dict(total)
        rows = [(t, used_at[t] / total_at[t] if total_at.get(t) else 0.0, v) for t, v in temperature if t in used_at]
        for row in rows:
            self._push(self.gpu, name, row)
        return len(rows)

    def seed_requests(self, key: str, per_minute) -> int:
        """Earlier Allocate counts per minute ([(minute start, count)]) as arrivals spread over each minute."""
        if key in self.arrivals or not per_minute:
            return 0
        q = self.arrivals[key] = collections.deque(maxlen=MAX_SAMPLES)
        n = 0
        for t0, count in per_minute:
            k = int(round(count))
            for i in range(k):
                q.append((t0 + 60.0 * (i + 0.5) / k,))
            n += k
        self.first_arrival[key] = per_minute[0][0]
        return n

    def forget_gpu(self, name: str) -> None:
        self.gpu.pop(name, None)

    def keep_only(self, gpus, slices) -> None:
        """Drop the windows of GPUs and slices the fleet no longer has (a released slice's readings stop, but
        its window would stay for ever: slices come and go all day)."""
        for table, live in ((self.gpu, gpus), (self.slice, slices)):
            for name in [n for n in table if n not in live]:
                del table[name]


def _binned(rows, col: int, step: float) -> tuple[tuple, tuple]:
    rows = forecasting.finite(rows, col)      # an agent's NaN reading would fail the series' fits for hours
    if not rows:
        return (), ()
    t, v = forecasting.binned([(r[0], r[col]) for r in rows], step)
    return tuple(t.tolist()), tuple(v.tolist())


def jobs_for_gpus(w: Windows, step: float, horizon: float, level: float, names=None) -> list[Job]:
    out = []
    for name, rows in w.gpu.items():
        if names is not None and name not in names or not rows:
            continue
        for col, metric in ((1, "memory_fraction"), (2, "temperature")):
            t, v = _binned(list(rows), col, step)
            out.append(Job("gpu", name, metric, step, horizon, level, t, v))
    return out


def jobs_for_slices(w: Windows, ids, step: float, horizon: float, level: float) -> list[Job]:
    out = []
    for sid in ids:
        rows = list(w.slice.get(sid, ()))
        if rows:
            t, v = _binned(rows, 1, step)
            out.append(Job("slice", sid, "memory_used", step, horizon, level, t, v))
    return out


def jobs_for_demand(w: Windows, step: float, horizon: float, level: float, now: float) -> list[Job]:
    """Requests per step per key, over whole steps from the first arrival seen to the last complete step."""
    out = []
    end = math.floor(now / step)                      # the current, incomplete bin is left out
    for key, q in w.arrivals.items():
        start = max(math.floor(w.first_arrival[key] / step), end - forecasting.MAX_BINS,
                    math.floor((now - w.keep_s) / step))
        n = end - start
        if n <= 0:
            continue
        idx = np.floor(np.asarray([a[0] for a in q], dtype=float) / step).astype(np.int64) - start
        idx = idx[(idx >= 0) & (idx < n)]
        counts = np.bincount(idx, minlength=n).astype(float)
        times = (np.arange(n) + start + 1) * step
        out.append(Job("fleet", key, "requests", step, horizon, level, tuple(times.tolist()), tuple(counts.tolist())))
    return out


def fit_jobs(jobs: list[Job]) -> list[Forecast | None]:
    """Blocking: each job's forecast, or None when its history is too short (or a fit fails)."""
    out = []
    for j in jobs:
        try:
            p = forecasting.plan(j.kind, j.name, j.metric, j.horizon_s, j.step_s, j.level)
            if len(j.values) < forecasting.needed_points(p.steps):
                out.append(None)
                continue
            f = forecasting.fit(p, np.asarray(j.times), np.asarray(j.values))
            out.append(Forecast(j.kind, j.name, j.metric, f["model"], j.step_s, float(j.values[-1]),
                                tuple(map(float, f["points"])), tuple(map(float, f["lo"])),
                                tuple(map(float, f["hi"])), float(f["mase"])))
        except Exception:   # noqa: BLE001 - one series that cannot be fitted never stops the others
            out.append(None)
    return out


def _worker_init() -> None:
    try:
        os.nice(10)
    except OSError:
        pass


class ProcessFitter:
    """`fit_jobs` in `workers` spawned processes (a fork of a gRPC process is unsafe)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.pool = self._new()

    def _new(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)

    async def __call__(self, jobs: list[Job]) -> list[Forecast | None]:
        if not jobs:
            return []
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fit_jobs, jobs)
        except concurrent.futures.process.BrokenProcessPool:
            self.pool = self._new()           # a worker died (killed, out of memory): a fresh one next pass
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class InlineFitter:
    async def __call__(self, jobs: list[Job]) -> list[Forecast | None]:
        return await asyncio.to_thread(fit_jobs, jobs) if jobs else []

    def close(self) -> None:
        pass

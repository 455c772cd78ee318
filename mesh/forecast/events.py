"""Demand series from a list of intervals: how much was present, on average, in each time bin.

A slice request (or a trace's pod) holds `weight` (GPUs, say) from its start to its end; the
concurrency C(t) is the sum of the weights of the intervals open at t, and a bin's value is C's time
average over the bin (so a one-hour bin half covered by a 2-GPU request counts 1 GPU). Exact: the
integral of the step function C is piecewise linear between interval edges.
"""

from __future__ import annotations

import numpy as np


def concurrency(starts, ends, weights, step: float, t0: float | None = None,
                t1: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, time-averaged concurrency per bin) over [t0, t1) in bins of `step` seconds.
    Intervals with end <= start are ignored."""
    s, e, w = (np.asarray(x, dtype=float) for x in (starts, ends, weights))
    keep = e > s
    s, e, w = s[keep], e[keep], w[keep]
    if step <= 0:
        raise ValueError("step must be > 0")
    if s.size == 0:
        raise ValueError("no interval with end > start")
    t0 = float(np.min(s)) if t0 is None else t0
    t1 = float(np.max(e)) if t1 is None else t1
    edges = t0 + step * np.arange(int(np.ceil((t1 - t0) / step)) + 1)
    times = np.concatenate([s, e])
    deltas = np.concatenate([w, -w])
    order = np.argsort(times, kind="stable")
    times, deltas = times[order], deltas[order]
    level = np.cumsum(deltas)                       # C just after each event
    area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])   # integral of C up to each event
    a = np.interp(edges, times, area, left=0.0, right=area[-1])
    return edges[:-1], np.diff(a) / step


def level_at(starts, ends, weights, at) -> np.ndarray:
    """The concurrency C at each time of `at` (the intervals open at that instant: start <= t < end)."""
    s, e, w = (np.asarray(x, dtype=float) for x in (starts, ends, weights))
    keep = e > s
    s, e, w = s[keep], e[keep], w[keep]
    at = np.asarray(at, dtype=float)
    ss, es = np.argsort(s), np.argsort(e)
    started = np.concatenate([[0.0], np.cumsum(w[ss])])[np.searchsorted(s[ss], at, side="right")]
    ended = np.concatenate([[0.0], np.cumsum(w[es])])[np.searchsorted(e[es], at, side="right")]
    return started - ended

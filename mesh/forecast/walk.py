"""The sequential conformal walk of a backtest, vectorised: every origin's interval, calibrated on the
residuals of the origins observed before it, with the level adapted by ACI (mesh.forecast.conformal).

`backtest.sequential_intervals` is the contract (docs/prediction.md, "The backtest protocol", step 4);
this module computes exactly the same numbers, bit for bit, as calling `conformal.interval` at every
origin in time order, without a numpy round trip per origin:

1. Origins that see the same observed rows share their calibration, so each distinct set of rows is
   scaled (per step, by its mean absolute residual) and its pooled normalised residuals sorted once.
2. ACI's recursion is sequential (an origin's level depends on the misses of the ones observed before
   it), but a miss only depends on two ranks. For every origin and step, the edges `point + z_k * scale`
   grow with the rank k, so two binary searches (vectorised over all origins) give the ranks from which
   the actual value lies below an edge, or above it (on small blocks they are counted instead). The
   recursion then runs on integers and bisects.
3. The edges of the origins asked for are gathered at once.

Very short walks (under SHORT_WALK origins) and very large ones (over VECTOR_LIMIT padded values) go one
origin at a time (`_per_origin`, the per-origin loop itself), where that is the cheaper way.

Every float is computed by the same operations as in `conformal.interval` (the per-step scale as the
same sequential sum: a cumulative sum down the rows equals numpy's column sum of a C-ordered block when
there are two steps or more; one step, or a calibration window, sums each block as conformal does).
tests/unit/test_forecast_speed.py pins the equality against the per-origin reference on real traces and
on random ones (it would catch a numpy whose column sums were summed in another order).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque

import numpy as np

from mesh.forecast import conformal
from mesh.forecast.conformal import ACI_BOUNDS, AdaptiveLevel


VECTOR_LIMIT = 2_000_000  # padded calibration values (blocks x rows x steps) up to which the walk is vectorised;
                          # beyond, memory grows with the square of the origins: one origin at a time
SHORT_WALK = 6            # with fewer origins to issue, one at a time is quicker (the vectorised walk's fixed cost)
COUNT_LIMIT = 20_000      # edges (origins x steps x block values) up to which the ranks are counted, not searched


def _block_size(ms: np.ndarray, window: int, h: int) -> int:
    distinct = int(np.count_nonzero(np.diff(ms))) + 1
    return distinct * min(int(ms.max()), window or int(ms.max())) * h


def _scales(resid: np.ndarray, ms: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per distinct calibration block (rows starts[u]..ms[u]-1), the per-step scale of
    conformal.residual_bounds: the mean absolute residual, a zero replaced by the mean over steps (or 1)."""
    h = resid.shape[1]
    if h > 1 and not np.any(starts):
        sc = np.cumsum(np.abs(resid[: int(ms[-1])]), axis=0)[ms - 1] / ms[:, None]
    else:
        sc = np.stack([np.abs(resid[np.arange(s, m)]).sum(axis=0) / (m - s) for s, m in zip(starts, ms)])
    for u in np.flatnonzero(np.any(sc <= 0, axis=1)):
        overall = float(sc[u].sum()) / h
        sc[u] = np.where(sc[u] > 0, sc[u], overall if overall > 0 else 1.0)
    return sc


def _sorted_blocks(resid: np.ndarray, sc: np.ndarray, ms: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(blocks, rows x steps): each block's residuals divided by its scale, sorted, padded with +inf."""
    h = resid.shape[1]
    counts = ms - starts
    width = int(counts.max())
    k = np.arange(width)
    if np.any(starts):
        rows = np.minimum(starts[:, None] + k[None, :], len(resid) - 1)
        z = resid[rows] / sc[:, None, :]
    else:                                   # every block starts at the first row
        z = resid[None, :width, :] / sc[:, None, :]
    z = np.where((k[None, :] < counts[:, None])[:, :, None], z, np.inf).reshape(len(ms), width * h)
    z.sort(axis=1)
    return z


def _first_ranks(z: np.ndarray, u: np.ndarray, point: np.ndarray, sc: np.ndarray,
                 actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (origin, step), the smallest rank k with `point + z[u, k] * sc` greater than the actual, and the
    smallest with it at least the actual, by binary searches on all of them at once (the edge grows with k)."""
    shape = (2,) + point.shape
    lo = np.zeros(shape, dtype=np.int64)
    hi = np.full(shape, z.shape[1], dtype=np.int64)
    uu = u[None, :, None]
    for _ in range(int(z.shape[1]).bit_length() + 1):
        active = lo < hi
        if not active.any():
            break
        mid = np.minimum((lo + hi) >> 1, z.shape[1] - 1)
        edge = point + z[uu, mid] * sc
        right = np.stack((edge[0] <= actual, edge[1] < actual))
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo[0], lo[1]


def _first_ranks_counted(z: np.ndarray, u: np.ndarray, point: np.ndarray, sc: np.ndarray,
                         actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_first_ranks by counting the edges at or below (and below) the actual: fewer numpy calls when the
    blocks are small."""
    edge = point[:, :, None] + z[u][:, None, :] * sc[:, :, None]
    a = actual[:, :, None]
    return np.count_nonzero(edge <= a, axis=2), np.count_nonzero(edge < a, axis=2)


def sequential(origins: np.ndarray, actual: np.ndarray, p: np.ndarray, ev: np.ndarray, level: float,
               floor: float | None, window: int, gamma: float,
               state: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """See backtest.sequential_intervals (the same arguments, with the backtest's origins and actuals)."""
    h = p.shape[1]
    ev = np.asarray(ev, dtype=np.int64)
    lo_out, hi_out = np.empty((len(ev), h)), np.empty((len(ev), h))
    adaptive = AdaptiveLevel(level, gamma) if gamma > 0 else None
    first = 0 if adaptive else int(ev[0])
    js = np.arange(first, int(ev[-1]) + 1)
    ms = np.searchsorted(origins + h, origins[js], side="right")     # origins 0..m-1 observed by then
    keep = ms > 0
    if not adaptive:
        wanted = np.zeros(len(js), dtype=bool)
        wanted[ev - first] = True
        keep &= wanted
    js, ms = js[keep], ms[keep]
    if len(js) and (len(js) < SHORT_WALK or _block_size(ms, window, h) > VECTOR_LIMIT):
        return _per_origin(origins, actual, p, ev, level, floor, window, gamma, state)
    if len(js):
        resid = actual - p
        new_block = np.empty(len(ms), dtype=bool)             # ms never decreases (origins are sorted)
        new_block[0], new_block[1:] = True, ms[1:] != ms[:-1]
        um, inv = ms[new_block], np.cumsum(new_block) - 1
        starts = np.maximum(0, um - window) if window else np.zeros_like(um)
        sc = _scales(resid, um, starts)
        z = _sorted_blocks(resid, sc, um, starts)
        n = ((um - starts) * h)[inv]
        ranks = _ranks(adaptive, level, origins, js, n, h, floor, z, inv, p, sc, actual)
        slot = {int(j): k for k, j in enumerate(ev)}
        rows = np.array([k for k, j in enumerate(js) if int(j) in slot], dtype=np.int64)
        if len(rows):
            lr, hr = ranks[0][rows], ranks[1][rows]
            uj, pj = inv[rows], p[js[rows]]
            a = pj + z[uj, lr - 1][:, None] * sc[uj]
            b = pj + z[uj, hr - 1][:, None] * sc[uj]
            if floor is not None:
                a = np.maximum(a, floor)
            b = np.maximum(b, a)
            at = np.array([slot[int(j)] for j in js[rows]])
            lo_out[at], hi_out[at] = a, b
    if state is not None:
        state["level"] = adaptive.level if adaptive else level
    return lo_out, hi_out


def _ranks(adaptive: AdaptiveLevel | None, level: float, origins: np.ndarray, js: np.ndarray, n: np.ndarray,
           h: int, floor: float | None, z: np.ndarray, inv: np.ndarray, p: np.ndarray, sc: np.ndarray,
           actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) 1-based ranks of every issued interval, walking the ACI recursion in time order;
    at the end, `adaptive` has observed every issued interval (the level the next forecast is issued at)."""
    lr, hr = [], []
    nl = n.tolist()
    if adaptive is None:
        alpha = (1 - level) / 2
        for nk in nl:
            hr.append(min(nk, math.ceil((nk + 1) * (1 - alpha))))
            lr.append(max(1, math.floor((nk + 1) * alpha)))
        return np.array(lr, dtype=np.int64), np.array(hr, dtype=np.int64)
    pj, aj, sj = p[js], actual[js], sc[inv]
    search = _first_ranks_counted if pj.size * z.shape[1] <= COUNT_LIMIT else _first_ranks
    below, above = search(z, inv, pj, sj, aj)                # actual < edge(k) iff k >= below; > iff k < above
    if floor is not None:                                    # under the floor: outside whatever the ranks
        under, over = aj < floor, aj > floor
        below[under] = -1                                    # counted once, as a miss below
        above[under | ~over] = -1                            # never a miss above (at or under the floor)
    low_keys, high_keys = np.sort(below, axis=1).tolist(), np.sort(above, axis=1).tolist()
    ends, starts = (origins[js] + h).tolist(), origins[js].tolist()
    # AdaptiveLevel's observe() and level, inlined (the same arithmetic, in the same order)
    a_lo, a_hi = 1 - ACI_BOUNDS[0], 1 - ACI_BOUNDS[1]
    l_lo, l_hi = ACI_BOUNDS
    gamma, target, alpha_t = adaptive.gamma, adaptive.target_alpha, adaptive.alpha
    issued: deque = deque()
    for k, nk in enumerate(nl):
        while issued and issued[0][0] <= starts[k]:
            x = alpha_t + gamma * (target - issued.popleft()[1])
            x = x if x > a_hi else a_hi                     # min(a_lo, max(a_hi, x)), as observe() does
            alpha_t = a_lo if a_lo < x else x
        x = 1 - alpha_t
        x = x if x > l_lo else l_lo                         # min(l_hi, max(l_lo, 1 - alpha)), as .level does
        alpha = (1 - (l_hi if l_hi < x else x)) / 2
        hi_rank = math.ceil((nk + 1) * (1 - alpha))
        hi_rank = hi_rank if hi_rank < nk else nk
        lo_rank = math.floor((nk + 1) * alpha)
        lo_rank = lo_rank if lo_rank > 1 else 1
        lr.append(lo_rank)
        hr.append(hi_rank)
        miss = bisect_right(low_keys[k], lo_rank - 1) + h - bisect_left(high_keys[k], hi_rank)
        issued.append((ends[k], miss / h))
    while issued:
        alpha_t = min(a_lo, max(a_hi, alpha_t + gamma * (target - issued.popleft()[1])))
    adaptive.alpha = alpha_t
    return np.array(lr, dtype=np.int64), np.array(hr, dtype=np.int64)


def _per_origin(origins: np.ndarray, actual: np.ndarray, p: np.ndarray, ev: np.ndarray, level: float,
                floor: float | None, window: int, gamma: float,
                state: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """The walk one origin at a time (`conformal.interval` at each): for long backtests with long horizons,
    where one partition per origin is cheaper than sorting every calibration block."""
    h = p.shape[1]
    lo, hi = np.empty((len(ev), h)), np.empty((len(ev), h))
    resid = actual - p
    adaptive = AdaptiveLevel(level, gamma) if gamma > 0 else None
    issued: deque = deque()       # (origin index, miss share) not yet observed by the level
    want = {int(j): k for k, j in enumerate(ev)}
    first = int(ev[0]) if not adaptive else 0
    ends = origins + h
    for j in range(first, int(ev[-1]) + 1):
        m = int(np.searchsorted(ends, origins[j], side="right"))      # origins 0..m-1 observed by now
        if not m or (j not in want and not adaptive):
            continue
        if adaptive:
            while issued and origins[issued[0][0]] + h <= origins[j]:
                adaptive.observe(issued.popleft()[1])
        known = resid[max(0, m - window) if window else 0:m]
        a, b = conformal.interval(p[j], known, adaptive.level if adaptive else level, floor)
        if adaptive:
            issued.append((j, float(np.count_nonzero((actual[j] < a) | (actual[j] > b))) / h))
        if j in want:
            lo[want[j]], hi[want[j]] = a, b
    if state is not None:
        for _, miss in issued if adaptive else ():
            adaptive.observe(miss)
        state["level"] = adaptive.level if adaptive else level
    return lo, hi

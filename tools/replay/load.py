"""Per-workload memory load for `meshctl replay`: what fraction of its allocation a workload uses
at time t, and the GPU memory pressure that follows.

The openb pod lists say what each pod asked for, not what it used. Without `--load`, each workload
follows a documented synthetic pattern: `u(t) = base + amp * sin(2 pi t / period + phase) + noise`
with base ~ U(0.60, 0.85), amp ~ U(0.10, 0.35), period one hour (a training or evaluation cycle),
phase ~ U(0, 2 pi), noise ~ N(0, 0.02), all drawn per workload (and second) from the seed, so
every controller sees the same load. GPU-sharing (MPS)
workloads are not hard-capped, so several on one GPU whose peaks align push its memory pressure
(sum of share x u) past critical; a workload's use is capped at 0.9 of the GPU (alone it never is
critical: a workload past its GPU's memory fails by itself, and no move helps; whole-GPU workloads are
not modelled).
With `--load FILE` (a CSV `time_s,value`, value = fraction of the allocation used, e.g. one container
of the GenAI trace divided by its limit), every workload replays that series from its own seeded
offset, scaled by its own factor ~ U(0.8, 1.2).
"""

from __future__ import annotations

import csv
import math
import random

from mesh.errors import InvalidArgument

PERIOD_S = 3600.0


class LoadModel:
    def __init__(self, seed: int, series: list[tuple[float, float]] | None = None) -> None:
        self._seed = seed
        self._params: dict[str, tuple] = {}
        self._series = series
        if series:
            self._dt = (series[-1][0] - series[0][0]) / max(1, len(series) - 1) or 1.0
            self._values = [v for _, v in series]

    def _p(self, wid: str) -> tuple:
        p = self._params.get(wid)
        if p is None:
            r = random.Random(f"load-{self._seed}-{wid}")     # the same workload draws alike in every controller
            if self._series:
                p = (r.uniform(0, len(self._values) * self._dt), r.uniform(0.8, 1.2))
            else:
                p = (r.uniform(0.60, 0.85), r.uniform(0.10, 0.35), r.uniform(0, 2 * math.pi))
            self._params[wid] = p
        return p

    def forget(self, wid: str) -> None:
        self._params.pop(wid, None)

    def use(self, wid: str, t: float) -> float:
        """Fraction of its allocation workload `wid` uses at `t` (>= 0)."""
        p = self._p(wid)
        if self._series:
            off, scale = p
            i = int((t + off) / self._dt) % len(self._values)
            return max(0.0, self._values[i] * scale)
        base, amp, phase = p
        noise = random.Random(f"{self._seed}-{wid}-{int(t)}").gauss(0, 0.02)
        return max(0.0, base + amp * math.sin(2 * math.pi * t / PERIOD_S + phase) + noise)


def read_series(path: str) -> list[tuple[float, float]]:
    """A `time_s,value` CSV (header required), sorted by time."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InvalidArgument.of("--load", f"cannot read {path}: {e.strerror}") from None
    if not rows or not {"time_s", "value"} <= set(rows[0]):
        raise InvalidArgument.of("--load", f"{path} needs the columns time_s,value")
    out = []
    for i, r in enumerate(rows):
        try:
            out.append((float(r["time_s"]), float(r["value"])))
        except ValueError:
            raise InvalidArgument.of("--load", f"{path} row {i + 2}: non-numeric time_s or value") from None
    if len(out) < 2:
        raise InvalidArgument.of("--load", f"{path} has fewer than 2 rows")
    return sorted(out)

"""Figures of the embedded history store and the forecast service's fitting (docs/prediction.md).

    python -m tools.bench_history        # prints JSON

Writes 8 GPUs x 7 metrics at 1 Hz for 2 hours in 5-second batches (as the recorder flushes), compacts
with the default tiers, reads one series back, and times one forecast fit at a few horizons and steps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np

from controlplane.forecast import forecasting
from controlplane.forecast.history import DEFAULT_TIERS, HistoryStore, parse_tiers


def store_figures(d: str) -> dict:
    s = HistoryStore(os.path.join(d, "h.db"), parse_tiers(DEFAULT_TIERS))
    batch, n, t0 = [], 0, time.perf_counter()
    for sec in range(7200):
        batch += [("gpu", f"n/{g}", f"m{m}", "", 1e6 + sec, math.sin(sec / 60) + g) for g in range(8) for m in range(7)]
        if sec % 5 == 4:
            n += s.write(batch)
            batch = []
    write = time.perf_counter() - t0
    t1 = time.perf_counter()
    s.compact(1e6 + 7200)
    compact = time.perf_counter() - t1
    t2 = time.perf_counter()
    rows = s.read("gpu", "n/0", "m0")
    read = time.perf_counter() - t2
    s.close()
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    return {"samples": n, "write_s": round(write, 2), "samples_per_s": int(n / write), "compact_s": round(compact, 2),
            "rows_per_tier_after_compaction": s_tiers(d), "read_rows": len(rows), "read_ms": round(read * 1000, 1),
            "db_mib": round(size / 2**20, 1)}


def s_tiers(d: str) -> dict:
    s = HistoryStore(os.path.join(d, "h.db"), parse_tiers(DEFAULT_TIERS))
    try:
        return s.tier_counts()
    finally:
        s.close()


def fit_figures() -> dict:
    rng = np.random.default_rng(0)
    rows = [(1e6 + i, 50 + 20 * math.sin(i / 30) + rng.normal()) for i in range(3600)]   # an hour at 1 Hz
    out = {}
    for horizon, step in ((60, 1), (60, 5), (300, 10)):
        p = forecasting.plan("gpu", "n/0", "memory_used", horizon, step, 0.9)
        times, values = forecasting.check_history(p, rows)
        t0 = time.perf_counter()
        f = forecasting.fit(p, times, values)
        out[f"horizon_{horizon}s_step_{step}s"] = {"fit_s": round(time.perf_counter() - t0, 2), "model": f["model"],
                                                   "history_points": int(values.size), "points": len(f["points"])}
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps({"store": store_figures(d), "fit": fit_figures()}, indent=1))


if __name__ == "__main__":
    main()

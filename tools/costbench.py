"""How long one cost accounting takes as the fleet grows (`python -m tools.costbench --slices 1000,10000 -o json`).

Builds an in-memory fleet of MIG slices (no cluster), runs the accountant's tick (in memory, on the control
plane's event loop in production) and the ledger write (on its worker thread) a few times, and checks the
dollars against the arithmetic (slices × price × share × time). Prints the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from types import SimpleNamespace


def run(n: int, ticks: int = 5) -> dict:
    from controlplane.cost.accountant import CostAccountant
    from controlplane.cost.ledger import CostLedger
    from controlplane.state.fleet import Fleet
    from gpumesh.v1 import types_pb2
    from mesh.cost import PriceTable
    fleet = Fleet()
    start = 1_700_000_000.0
    for i in range(n):
        s = types_pb2.Slice(id=f"s-{i:08d}", tenant=f"t{i % 20}", node=f"n{i // 8}", gpu_model="H100-80GB",
                            isolation=types_pb2.ISOLATION_MIG, profile="1g.10gb", memory_bytes=10 * 2**30)
        s.created_at.FromSeconds(int(start))
        fleet.slices[s.id] = s
    with tempfile.TemporaryDirectory() as d:
        led = CostLedger(os.path.join(d, "history.db"))
        prices = PriceTable.parse(["H100-80GB=2.49"])
        acc = CostAccountant(SimpleNamespace(fleet=fleet), None, led, prices, interval=10)
        tick_ms, write_ms = [], []
        for k in range(1, ticks + 1):
            t0 = time.perf_counter()
            charges, live, gone = acc.tick(start + 10 * k)
            t1 = time.perf_counter()
            led.write(charges, live, gone)
            tick_ms.append((t1 - t0) * 1000)
            write_ms.append((time.perf_counter() - t1) * 1000)
        t0 = time.perf_counter()
        lines = led.query("tenant", start - 1)
        query_ms = (time.perf_counter() - t0) * 1000
        led.close()
    dollars = sum(ln.dollars for ln in lines)
    expected = n * 2.49 * (1 / 8) * 10 * ticks / 3600
    return {"slices": n, "tick_ms_median": round(statistics.median(tick_ms[1:] or tick_ms), 1),
            "first_tick_ms": round(tick_ms[0], 1), "write_ms_median": round(statistics.median(write_ms), 1),
            "query_by_tenant_ms": round(query_ms, 1), "dollars": round(dollars, 6),
            "expected_dollars": round(expected, 6),
            "exact": abs(dollars - expected) < 1e-6 * max(1.0, expected)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.costbench", description=__doc__.splitlines()[0])
    p.add_argument("--slices", default="1000,10000", help="comma-separated fleet sizes")
    p.add_argument("--ticks", type=int, default=5)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = p.parse_args(argv)
    rows = [run(int(x), a.ticks) for x in a.slices.split(",")]
    if a.output == "json":
        print(json.dumps({"results": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['slices']:>7} slices: tick {r['tick_ms_median']} ms (first {r['first_tick_ms']}), "
                  f"ledger write {r['write_ms_median']} ms, query {r['query_by_tenant_ms']} ms, exact={r['exact']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

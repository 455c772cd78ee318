"""A short soak (issue 10, section 4): allocate/run/stop/release cycles through the real API against a real
local cluster, with a 2 s retention. After warm-up the control plane's memory and etcd's key count stay flat,
and once the last records have expired etcd holds exactly the keys it held before the first cycle. The full
run is `meshctl bench soak --cycles 10000 -o json` (docs/operations.md)."""

from __future__ import annotations

import pytest

from tools.meshctl.bench_soak import soak

pytestmark = pytest.mark.integration

CYCLES, EVERY, WARMUP, SECONDS = 300, 25, 100, 30.0


def test_soak_state_stays_flat(tmp_path):
    r = soak(tmp_path / "soak", CYCLES, clients=4, every=EVERY, warmup=WARMUP, retention=2.0, say=print,
             min_seconds=SECONDS)
    print({k: v for k, v in r.items() if k != "samples"})
    assert r["cycles"] >= CYCLES and not r["errors"], r["errors"]
    a, base, final = r["after_warmup"], r["base"], r["final"]
    # the warm-up ends after the longest retention window (request ids, ~14 s), however fast the machine cycles
    assert a["samples"] >= 2, r["samples"]
    # memory: no growth with the number of cycles once warm (a few MiB of allocator noise allowed)
    assert a["rss_mb_max"] - a["rss_mb_first"] <= max(8.0, 0.15 * a["rss_mb_first"]), r["samples"]
    # etcd: bounded by what lives within the retention windows, not by the cycles run. What lives there is the
    # cycle rate times the window, and request ids expire a shared lease at a time: a sawtooth whose peaks
    # jitter with the rate (a busy machine: +37 % once, then back). So the later half's peak is compared with
    # the earlier half's: a leak of a key every few cycles lifts it, a sawtooth does not
    post = [s for s in r["samples"] if s["cycle"] > r["warmup_cycles"] and s["seconds"] >= r["warmup_seconds"]]
    early, late = post[:max(1, len(post) // 2)], post[max(1, len(post) // 2):] or post[-1:]
    peak = max(s["etcd_keys"] for s in early)
    assert max(s["etcd_keys"] for s in late) <= peak + max(40, 0.3 * peak), r["samples"]
    # everything finished expired: no more keys than before the first cycle, nothing held in memory
    # (at most: the node's own events of before the first cycle expire too, with the soak's retention)
    assert final["etcd_keys"] <= base["etcd_keys"], (base, final)
    rec = final["records"]
    assert rec["workloads"] == 0 and rec["slices"] == 0 and rec["ready_waiters"] == 0 and rec["gone_waiters"] == 0
    assert rec["workload_waiters"] == 0 and rec["log_streams"] == 0
    assert final["workloads_listed"] == 0 and final["slices_listed"] == 0

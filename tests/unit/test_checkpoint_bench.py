"""`meshctl bench migrate` end to end on a small state: the fields it promises, the channel it
used and the raw speed of that channel (no timing asserts: the figures depend on the host)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from tools.meshctl import bench_migrate  # noqa: E402


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_migrate.add_arguments(p)
    ns = p.parse_args(["--state-mb", "16", "--dirty-pct", "2", "--step-ms", "50", "--tensor-mb", "1"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_bench_reports_downtime_totals_and_the_channel():
    transport = "auto"            # same host: the mesh (shm); the raw gRPC stream is measured too
    out = bench_migrate.measure(args(transport=transport))
    assert set(out["link_runs_mb_per_s"]) == {"grpc", "shm"}
    for k in ("downtime_ms", "total_ms", "bytes_sent", "stop_and_copy_downtime_ms", "link_mb_per_s",
              "downtime_ratio", "total_vs_link", "transport", "link_runs_mb_per_s", "final_ms"):
        assert k in out, k
    assert out["state_bytes"] == 16 << 20 and out["bytes_sent"] >= out["state_bytes"]
    assert out["transport"] == ("grpc" if transport == "grpc" else "shm")
    runs = out["link_runs_mb_per_s"][out["transport"]]
    assert len(runs) == 2 and out["link_mb_per_s"] == max(runs)       # the faster run counts
    assert out["downtime_ms"] > 0 and out["total_ms"] >= out["downtime_ms"] and out["total_vs_link"] > 0

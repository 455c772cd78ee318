"""`meshctl replay`'s simulation (tools/replay/controlled.py) on tiny synthetic traces."""

import argparse

import pytest

from tools.meshctl.common import CliError
from tools.replay.controlled import Params, simulate
from tools.replay.trace import TraceNode, TracePod

HOUR = 3600
NODES = [TraceNode(f"n{i}", 64000, 262144, 4, "V100M16") for i in range(3)]


def periodic_pods(days: int = 4, burst: int = 3) -> list[TracePod]:
    """A burst of `burst` half-GPU pods 30 s past every hour, each living 20 minutes."""
    pods = []
    for h in range(days * 24):
        for j in range(burst):
            t = h * HOUR + 30 + j
            pods.append(TracePod(f"p{h}-{j}", 4000, 8192, 1, 500, (), t, t + 1200))
    return pods


def test_predictive_waits_less_than_none_on_a_periodic_pattern():
    pods = periodic_pods()
    start, end = 3 * 86400, 4 * 86400                      # three days of history, one day replayed
    p = Params(create_s=30.0, destroy_s=5.0)
    none = simulate(NODES, pods, "none", 0, start, end, p)
    pred = simulate(NODES, pods, "predictive", 0, start, end, p)
    assert none["allocations"] == pred["allocations"] == 72
    assert none["alloc_wait_p50_s"] == 30.0 and none["warm_idle_gpu_hours"] == 0
    # the forecast (a daily season of hourly bursts) has warm slices ready before each burst
    assert pred["alloc_wait_p99_s"] < none["alloc_wait_p99_s"]
    assert pred["alloc_wait_mean_s"] < 0.2 * none["alloc_wait_mean_s"]
    assert 0 < pred["warm_idle_gpu_hours"] < pred["fleet_gpu_hours"]
    assert pred["demand_forecast_mae"] is not None


def test_reactive_lags_the_forecast_on_bursts():
    pods = periodic_pods()
    p = Params(create_s=30.0)
    react = simulate(NODES, pods, "reactive", 0, 3 * 86400, 4 * 86400, p)
    pred = simulate(NODES, pods, "predictive", 0, 3 * 86400, 4 * 86400, p)
    # reactive keeps what the last bucket saw: nothing arrived in the 10 minutes before a burst
    assert pred["alloc_wait_mean_s"] < react["alloc_wait_mean_s"]


def test_moves_take_workloads_off_gpus_at_critical_pressure():
    # eight long-lived half-GPU shares, packed in pairs: a pair whose peaks align exceeds the GPU's memory
    pods = [TracePod(f"s{i}", 1000, 1024, 1, 500, (), 0, 0) for i in range(8)]
    p = Params()
    none = simulate(NODES, pods, "none", 1, 86400, 2 * 86400, p)
    react = simulate(NODES, pods, "reactive", 1, 86400, 2 * 86400, p)
    pred = simulate(NODES, pods, "predictive", 1, 86400, 2 * 86400, p)
    assert none["migrations"] == 0 and none["critical_memory_gpu_minutes"] > 60
    for r in (react, pred):
        assert 0 < r["migrations"] <= 8          # the budget: at most one move per workload per hour
        assert r["critical_memory_gpu_minutes"] < 0.1 * none["critical_memory_gpu_minutes"]


def test_cli_rejects_unknown_controller():
    from tools.meshctl.replay import replay
    args = argparse.Namespace(controller="none,psychic", mig_create_s=1.0, mig_destroy_s=1.0, nodes="x",
                              arrivals="y", trace_dir="", load=None, days=1.0, end=None, tick_s=60.0, seeds=1)
    with pytest.raises(CliError, match="--controller: unknown controller 'psychic'"):
        replay(args)
    args.controller, args.mig_create_s = "none", -1.0
    with pytest.raises(CliError, match="--mig-create-s: must be >= 0"):
        replay(args)


def test_load_series_file(tmp_path):
    from mesh.errors import InvalidArgument
    from tools.replay.load import LoadModel, read_series
    good = tmp_path / "load.csv"
    good.write_text("time_s,value\n0,0.5\n60,1.0\n120,0.25\n")
    series = read_series(str(good))
    m = LoadModel(0, series)
    vals = {round(m.use("w", t), 6) for t in range(0, 180, 60)}
    assert len(vals) == 3                                  # the workload walks through the series
    bad = tmp_path / "bad.csv"
    bad.write_text("t,v\n0,1\n")
    with pytest.raises(InvalidArgument, match="--load: .* needs the columns time_s,value"):
        read_series(str(bad))
    bad.write_text("time_s,value\n0,x\n1,2\n")
    with pytest.raises(InvalidArgument, match="row 2: non-numeric"):
        read_series(str(bad))

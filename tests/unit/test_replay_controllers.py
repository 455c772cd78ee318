"""`meshctl replay`'s simulation (tools/replay/controlled.py) on tiny synthetic traces."""

import argparse
import json
import random

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
                              arrivals="y", trace_dir="", load=None, days=1.0, end=None, tick_s=60.0, seeds=1,
                              first_seed=0, plot=None)
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


# -- the burst floor and young workloads ------------------------------------------------------------


def random_bursts(days: int = 8, size: int = 4, every_h: float = 6.0, seed: int = 7) -> list[TracePod]:
    """Bursts of `size` identical quarter-GPU pods in the same second, at random times (about one per
    `every_h` hours: no daily season to forecast), each pod living 30 minutes."""
    r, pods, t = random.Random(seed), [], 0.0
    while t < days * 86400:
        t += r.expovariate(1 / (every_h * HOUR))
        for j in range(size):
            pods.append(TracePod(f"b{int(t)}-{j}", 2000, 4096, 1, 250, (), int(t), int(t) + 1800))
    return pods


def test_burst_floor_has_a_pool_ready_for_bursts_the_bucket_forecast_cannot_time():
    pods = random_bursts()
    start, end = 6 * 86400, 8 * 86400
    p = Params(create_s=30.0)
    react = simulate(NODES, pods, "reactive", 0, start, end, p)
    pred = simulate(NODES, pods, "predictive", 0, start, end, p)
    assert pred["allocations"] == react["allocations"] > 8
    # reactive keeps what the last bucket saw (nothing, hours after the last burst): every burst waits
    assert react["waited_allocations"] >= react["allocations"] // 2
    # predictive keeps the week's bursts' size (4) warm whatever the bucket forecast says
    assert pred["waited_allocations"] == 0 and pred["warm_claimed"] == pred["allocations"]
    # ... at a cost: four quarter-GPU slices held for the window, about 1 of the 12 GPUs
    assert 0 < pred["warm_idle_gpu_hours"] < 2 * 48


def test_a_placement_that_will_go_critical_is_moved_before_it_does():
    # half-GPU shares arriving through the window (the scheduler packs them in pairs) on a fleet with
    # room to move to: a pair whose loads rise together goes critical; predictive bounds each newcomer's
    # next minutes (it is younger than its GPU's series), reactive waits for critical
    pods = [TracePod(f"s{i}", 1000, 1024, 1, 500, (), 86400 + 900 * i, 86400 + 900 * i + 4 * HOUR)
            for i in range(40)]
    nodes = [TraceNode(f"n{i}", 64000, 262144, 4, "V100M16") for i in range(6)]
    p = Params()
    none = simulate(nodes, pods, "none", 3, 86400, 2 * 86400, p)
    react = simulate(nodes, pods, "reactive", 3, 86400, 2 * 86400, p)
    pred = simulate(nodes, pods, "predictive", 3, 86400, 2 * 86400, p)
    assert none["critical_memory_gpu_minutes"] > 60 and none["migrations"] == 0
    assert 0 < react["critical_memory_gpu_minutes"] < none["critical_memory_gpu_minutes"]
    assert pred["critical_memory_gpu_minutes"] < react["critical_memory_gpu_minutes"]
    assert react["migrations"] > 0 and pred["migrations"] > 0
    assert pred["pressure_forecast_mae"] is not None or pred["critical_memory_gpu_minutes"] == 0
    # the timeline holds one row per tick, with what --plot draws
    rows = pred["timeline"]
    assert len(rows) == 1440 and {"t", "allocations", "waited", "critical", "warm", "migrations"} <= set(rows[0])
    assert rows[-1]["migrations"] == pred["migrations"]
    assert sum(r["critical"] for r in rows) == pred["critical_memory_gpu_minutes"]


# -- the command, end to end ---------------------------------------------------------------------------

NODES_CSV = "sn,cpu_milli,memory_mib,gpu,model\n" + "".join(f"n{i},64000,262144,4,V100M16\n" for i in range(3))
KEYS = {"alloc_wait_p50_s", "alloc_wait_p99_s", "critical_memory_gpu_minutes", "critical_thermal_gpu_minutes",
        "migrations", "migrations_per_workload_day", "warm_idle_gpu_hours", "fleet_gpu_hours",
        "demand_forecast_mae", "pressure_forecast_mae", "warm_claimed"}


def write_trace(tmp_path, pods) -> None:
    (tmp_path / "openb_node_list_small.csv").write_text(NODES_CSV)
    rows = "".join(f"{p.name},{p.cpu_milli},{p.memory_mib},{p.num_gpu},{p.gpu_milli},,LS,Running,"
                   f"{p.creation_time},{p.deletion_time},{p.creation_time}\n" for p in pods)
    (tmp_path / "openb_pod_list_small.csv").write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,"
        "scheduled_time\n" + rows)


def test_cli_json_keys_warm_claimed_and_plot(tmp_path, capsys):
    from tools.meshctl.main import main
    write_trace(tmp_path, periodic_pods())
    png = tmp_path / "replay.png"
    rc = main(["replay", "--trace-dir", str(tmp_path), "--nodes", "small", "--arrivals", "small", "--days", "1",
               "--mig-create-s", "30", "-o", "json", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert list(doc["controllers"]) == ["none", "reactive", "predictive"]
    for name, c in doc["controllers"].items():
        assert KEYS <= set(c), KEYS - set(c)
    none, pred = doc["controllers"]["none"], doc["controllers"]["predictive"]
    assert none["warm_claimed"] == 0 and none["alloc_wait_p99_s"] == 30.0
    assert pred["warm_claimed"] > 0 and pred["alloc_wait_p99_s"] < none["alloc_wait_p99_s"]
    assert "timelines" not in doc and doc["seeds"] == [0]
    assert "predictive seed 0: done (72 allocations)" in err      # progress on stderr
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("change,args,message", [
    (None, ["--arrivals", "nothere"], "--arrivals: no trace file"),
    (None, ["--controller", "none,psychic"], "--controller: unknown controller 'psychic'"),
    (None, ["--plot", "x.jpg"], "--plot: x.jpg must end in .png"),
    (None, ["--mig-create-s", "-1"], "--mig-create-s: must be >= 0"),
    ("name,num_gpu,gpu_milli\np0,1,500\n", [], "lacks the column(s) creation_time"),
    ("name,num_gpu,gpu_milli,creation_time\np0,one,500,0\n", [], "row 2: column num_gpu is not a number: 'one'"),
])
def test_cli_bad_input_exits_2_naming_the_problem(tmp_path, capsys, change, args, message):
    from tools.meshctl.main import main
    write_trace(tmp_path, periodic_pods(days=1))
    if change:
        (tmp_path / "openb_pod_list_small.csv").write_text(change)
    rc = main(["replay", "--trace-dir", str(tmp_path), "--nodes", "small", "--arrivals", "small", "--days", "0.5",
               "-o", "json"] + args)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_the_burst_floor_counts_bursts_over_two_create_times():
    # the history: two pods, then two more 40 s later, every few hours. Within one create time (30 s) a
    # burst is 2; within two, 4: the pool kept is the larger, a margin for a burst larger than the week's.
    from tools.replay.controlled import LoadModel, Sim
    r, pods, t = random.Random(3), [], 0.0
    while t < 8 * 86400:
        t += r.expovariate(1 / (6 * HOUR))
        for j, dt in enumerate((0, 0, 40, 40)):
            pods.append(TracePod(f"b{int(t)}-{j}", 2000, 4096, 1, 250, (), int(t) + dt, int(t) + dt + 1800))
    floors = {}
    for windows in (1.0, 2.0):
        sim = Sim(NODES, pods, "predictive", 0, 6 * 86400, 7 * 86400, Params(create_s=30.0, burst_windows=windows),
                  LoadModel(0, None))
        sim.progress = None
        res = sim.run()
        floors[windows] = set(sim.floor.values())
        assert res["allocations"] > 4
    assert floors == {1.0: {2}, 2.0: {4}}

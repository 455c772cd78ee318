"""The trace replay (`meshctl sim`) and `meshctl bench schedule` on small inputs."""

from __future__ import annotations

import json

import pytest

from controlplane.state.fleet import MIB
from tools.meshctl.main import main
from tools.replay import benchsched, sim, trace

NODES = """sn,cpu_milli,memory_mib,gpu,model
n0,32000,131072,2,T4
n1,64000,262144,4,V100M16
n2,96000,262144,8,G2
n3,16000,65536,0,
"""
PODS = """name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
p0,4000,8192,1,500,,LS,Running,0,100,0
p1,8000,16384,1,1000,,LS,Running,10,200,10
p2,16000,65536,4,1000,V100M16|V100M32,LS,Running,20,300,20
p3,2000,4096,0,0,,BE,Running,30,40,30
p4,4000,8192,1,250,,LS,Running,40,0,40
p5,12000,32768,2,1000,,LS,Running,50,500,50
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "openb_node_list_small.csv").write_text(NODES)
    (tmp_path / "openb_pod_list_small.csv").write_text(PODS)
    return tmp_path


@pytest.mark.parametrize("row,isolation,count,share,cpu,models", [
    ("p0", "mps", 1, 0.5, 4000, ()),
    ("p1", "exclusive", 1, 0.0, 8000, ()),
    ("p2", "exclusive", 4, 0.0, 4000, ("V100M16", "V100M32")),
    ("p3", "host", 1, 0.0, 2000, ()),
])
def test_pods_become_slice_requests(files, row, isolation, count, share, cpu, models):
    pods = {p.name: p for p in trace.load_pods(str(files / "openb_pod_list_small.csv"))}
    r = trace.request_of(pods[row])
    assert (r.isolation, r.count, r.compute_share, r.cpu_milli, r.gpu_models) == (isolation, count, share, cpu, models)
    assert r.topology == ("same-node" if count > 1 else "any")
    assert r.host_memory_bytes * count == pods[row].memory_mib * MIB


def test_fleet_from_node_list_uses_trace_models_unregistered(files):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    fleet = trace.build_fleet(nodes)
    assert [len(n.gpus) for n in fleet.nodes.values()] == [2, 4, 8, 0]
    assert fleet.nodes["n2"].gpus[0].model.name == "G2" and not fleet.nodes["n2"].gpus[0].mig_enabled
    from mesh import gpumodels
    assert "G2" not in gpumodels.MODELS


@pytest.mark.parametrize("load_max", [0.5, 1.3, 3.0])
def test_arrivals_top_up_and_cut_at_load_max(files, load_max):
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    seq = sim.arrivals(pods, 14, seed=1, load_max=load_max)
    asked = sum(p.gpu_request for p in seq)
    assert asked >= load_max * 14 - 1e-9
    assert asked - seq[-1].gpu_request < load_max * 14   # cut at the pod that reaches it
    assert sim.arrivals(pods, 14, 1, load_max) == seq     # the seed decides


def test_replay_curve_and_gang_and_constraints(files):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    run = sim.run_arrivals(nodes, pods, "default", seed=0, load_max=1.3, step=0.05)
    loads = [p["load"] for p in run.curve]
    assert loads[0] == 0 and loads == sorted(loads) and loads[-1] >= 1.25
    assert all(b - a <= 0.05 + 0.6 for a, b in zip(loads, loads[1:]))   # a pod may jump past a mark
    assert run.placed + run.skipped == run.decisions
    rp = sim.Replay(nodes, "bestfit", sim.typical_mix(pods))
    assert rp.arrive(next(p for p in pods if p.name == "p2"))     # 4 V100M16 on n1, all or nothing
    assert {s.node.split("-", 1)[1] for s in rp.fleet.slices.values()} == {"n1"}   # names carry the order
    assert not rp.arrive(next(p for p in pods if p.name == "p2"))  # no other node has 4 V100s
    assert len(rp.fleet.slices) == 4
    assert rp.arrive(next(p for p in pods if p.name == "p3"))     # CPU-only
    assert rp.point(0.5)["unallocated_gpus"] == 14 - 4


def test_timeline_mode_releases_departed_pods(files):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    run = sim.run_timeline(nodes, pods, "default", points=20)
    assert run.curve[-1]["unallocated_gpus"] == pytest.approx(14 - 0.25)   # only p4 never leaves


def test_fragmentation_metric_counts_unusable_free_gpus(files):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    rp = sim.Replay(nodes, "packing", sim.typical_mix(pods))
    assert rp.point(0)["fragmented_gpus"] > 0   # a 4-GPU type cannot use the T4 or G2 nodes (gpu_spec)


def test_meshctl_sim_json_and_plot(files, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    rc = main(["sim", "--trace-dir", str(files), "--nodes", "small", "--pods", "small", "--seeds", "2",
               "--policy", "random,fgd", "--jobs", "1", "--step", "0.05", "-o", "json", "--plot", str(plot)])
    assert rc == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["policy"] for d in docs] == ["random", "fgd"]
    for d in docs:
        assert set(d) >= {"policy", "seeds", "capacity_gpus", "curve"} and d["capacity_gpus"] == 14
        assert {"load", "unallocated_gpus", "fragmented_gpus"} == set(d["curve"][0])
        marks = [p["load"] for p in d["curve"]]
        assert marks[:3] == [0.0, 0.05, 0.1]
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 1000


def test_meshctl_sim_refuses_unknown_policy(files, capsys):
    assert main(["sim", "--trace-dir", str(files), "--nodes", "small", "--pods", "small",
                 "--policy", "nope", "--seeds", "1"]) == 1
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_bench_schedule_small(capsys):
    r = benchsched.run(64, requests=50)
    assert r["gpus"] == 64 and r["placed"] + r["refused"] == 50 and r["p99_ms"] >= r["p50_ms"] > 0
    assert main(["bench", "schedule", "--gpus", "16", "--requests", "5", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gpus"] == 16


def test_node_order_is_a_seeded_shuffle_or_the_files(files):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))[::-1]
    kept = sim.node_order(nodes, 0, "file")
    assert [n.name.split("-", 1)[1] for n in sorted(kept, key=lambda n: n.name)] == [n.name for n in nodes]
    a, b = sim.node_order(nodes, 1), sim.node_order(nodes, 1)
    assert a == b and sorted(n.name.split("-", 1)[1] for n in a) == sorted(n.name for n in nodes)
    assert [n.name for n in a] == sorted(n.name for n in a)   # name order is the shuffled order
    orders = {tuple(n.name.split("-", 1)[1] for n in sim.node_order(nodes, s)) for s in range(10)}
    assert len(orders) > 1   # seeds differ
    with pytest.raises(ValueError, match="node order"):
        sim.node_order(nodes, 0, "sideways")


def test_type_counts_keep_cpu_pods_apart_and_the_metric_ignores_them(files):
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    counts = sim.type_counts(pods)
    assert counts[(0, 0, 2000, frozenset())] == 1
    assert all(m.gpus for m in sim.typical_mix(pods, coverage=1.0))


def test_timeline_curve_is_averaged_over_seeds(files, capsys):
    nodes = trace.load_nodes(str(files / "openb_node_list_small.csv"))
    pods = trace.load_pods(str(files / "openb_pod_list_small.csv"))
    runs = [sim.run_timeline(nodes, pods, "random", seed=s, points=20) for s in range(3)]
    avg = sim.average_timeline(runs)
    assert len(avg) == min(len(r.curve) for r in runs)
    for i, p in enumerate(avg):
        assert p["load"] == runs[0].curve[i]["load"]
        assert p["fragmented_gpus"] == pytest.approx(sum(r.curve[i]["fragmented_gpus"] for r in runs) / 3, abs=0.01)
    assert main(["sim", "--trace-dir", str(files), "--nodes", "small", "--pods", "small", "--seeds", "3",
                 "--policy", "random", "--jobs", "1", "--mode", "timeline", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["seeds"] == 3 and doc["curve"] == avg


def test_baselines_are_the_artifacts(files):
    """The replay's baselines score as the FGD artifact does (whole numbers, ties to node order)."""
    from controlplane.scheduler import profiles
    assert profiles.build("packing").plugin("Packing").integer
    assert profiles.build("bestfit").plugin("BestFit").integer
    f = profiles.build("fgd").plugin("FragmentationGradient")
    assert (f.integer, f.cpu_types, f.normalize) == (True, True, True)

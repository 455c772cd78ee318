"""ForecastService on a real local cluster: the simulated GPU's telemetry accumulates in the leader's
history (SQLite under its state dir), `meshctl forecast get` answers with points and an interval once the
history is long enough (and says how much it needs before), and a control-plane crash keeps what was flushed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration
HOST = {"node": "fc-1", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}


@pytest.fixture(scope="module")
def fcluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("fc"), [HOST], lease_ttl=3,
                     controlplane_args=["--history-flush-seconds", "0.5"],
                     agent_args=["--telemetry-interval-seconds", "0.25"])
    c.start(timeout=90)
    yield c
    c.stop()


def meshctl(cluster, *args, check=True):
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                       capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def simctl(cluster, *args):
    state = next((cluster.state_dir / "agents").glob("*/sim/fc-1.state.json"))
    host = cluster.state_dir / "hosts" / "fc-1.yaml"
    subprocess.run([sys.executable, "-m", "nodeagent.nvml.simctl", "--state", str(state), "--host-file", str(host),
                    *args], check=True, capture_output=True, timeout=30)


def memory_series(cluster):
    items = json.loads(meshctl(cluster, "forecast", "series", "--kind", "gpu", "-o", "json").stdout)["items"]
    return next((s for s in items if s["name"] == "fc-1/0" and s["metric"] == "memory_used"), None)


def test_telemetry_accumulates_and_meshctl_forecasts_it(fcluster):
    wait_for(lambda: memory_series(fcluster), 60, "the GPU's memory_used series in the history")
    # Too little history for a minute ahead: FAILED_PRECONDITION saying how much is needed.
    p = meshctl(fcluster, "forecast", "get", "gpu/fc-1/0", "memory_used", "--horizon", "60s", check=False)
    assert p.returncode != 0 and ("needs at least" in p.stderr or "longer than the history" in p.stderr), p.stderr
    p = meshctl(fcluster, "forecast", "get", "gpu/fc-9/0", "memory_used", "--horizon", "60s", check=False)
    assert p.returncode != 0 and "no series gpu/fc-9/0 memory_used" in p.stderr, p.stderr

    # A load that climbs, driven from outside as a test harness would, while the history fills.
    stop = threading.Event()

    def climb():
        gib = 10
        while not stop.is_set() and gib < 70:
            simctl(fcluster, "load", "--gpu", "0", "--util", "50", "--memory-used", f"{gib}GiB")
            gib += 1
            stop.wait(1.0)
    t = threading.Thread(target=climb, daemon=True)
    t.start()
    try:
        def forecast():
            p = meshctl(fcluster, "forecast", "get", "gpu/fc-1/0", "memory_used", "--horizon", "5s", "--step",
                        "0.5s", "-o", "json", check=False)
            if p.returncode != 0:
                assert "needs at least" in p.stderr or "longer than the history" in p.stderr, p.stderr
                return None
            return json.loads(p.stdout)
        f = wait_for(forecast, 240, "a forecast of GPU 0's memory used", interval=3)
    finally:
        stop.set()
        t.join(timeout=60)
    assert len(f["points"]) == 10 and f["step_seconds"] == 0.5 and f["level"] == pytest.approx(0.9)
    for pt in f["points"]:
        # an interval around the point (conformal on the backtest residuals: it may sit off-centre, even
        # wholly above the point when the model ran low on the backtest, as on a climb)
        assert pt["at"] and pt["lo"] <= pt["hi"] and pt["hi"] > pt["lo"]
    assert f["model"] and f["history"]["points"] >= 80 and f["source"] == "embedded"
    assert f["history"]["last_value"] >= 10 << 30          # the climbing load reached the history
    table = meshctl(fcluster, "forecast", "get", "gpu/fc-1/0", "memory_used", "--horizon", "5s",
                    "--step", "0.5s").stdout
    assert "forecast " in table and any(ch in table for ch in "▁▂▃▄▅▆▇█") and "HIGH" in table


def test_allocate_requests_are_counted_per_minute(fcluster):
    with fcluster.client() as mesh:
        alloc = mesh.allocate(tenant="fc-team", mig_profile="1g.10gb", count=2)
        for s in alloc.slices:
            mesh.release(s.id)

    def counted():
        items = json.loads(meshctl(fcluster, "forecast", "series", "-o", "json").stdout)["items"]
        names = {(s["kind"], s["name"], s["metric"]) for s in items}
        want = {("fleet", "allocate", "requests"), ("tenant", "fc-team", "requests"),
                ("fleet", "profile/1g.10gb", "requests"), ("fleet", "gpu_model/any", "requests")}
        return want <= names
    # the minute's count is written when the minute ends
    wait_for(counted, 150, "the Allocate request counts in the history", interval=2)


def test_a_crash_keeps_what_was_flushed(fcluster):
    wait_for(lambda: memory_series(fcluster), 60, "the GPU's memory_used series in the history")
    before = memory_series(fcluster)        # what ListSeries counts is in history.db: flushed
    fcluster.restart_controlplane(kill=True)     # SIGKILL: no clean stop, no last flush
    after = wait_for(lambda: memory_series(fcluster), 60, "the history after the restart")
    assert after["first"] == before["first"] and after["samples"] >= before["samples"]


def test_a_workload_enters_the_interaction_log_with_its_fingerprint(fcluster):
    """Seed 000's interaction log on a real cluster: a labelled workload on a MIG slice appears with its
    application context, the agent's hardware fingerprint and its use over time; slice and node series
    fill in the history; the entry says when it stopped."""
    with fcluster.client() as mesh:
        alloc = mesh.allocate(tenant="fc-team", mig_profile="1g.10gb")
        sid = alloc.slices[0].id
        w = mesh.run_workload(sid, ["sleep", "600"], labels={"app-type": "fc-training", "phase": "warmup"})
        simctl(fcluster, "load", "--gpu", "0", "--util", "40", "--memory-used", "12GiB")

        def entry(want_usage=True):
            items = json.loads(meshctl(fcluster, "forecast", "interactions", "--app-type", "fc-training",
                                       "-o", "json").stdout)["items"]
            e = next((i for i in items if i["workload_id"] == w.id), None)
            return e if e is not None and (not want_usage or len(e["usage"]) >= 3) else None
        e = wait_for(entry, 90, "the workload's interaction-log entry with use samples", interval=2)
        assert (e["app_type"], e["phase"], e["state"], e["tenant"]) == ("fc-training", "warmup", "running", "fc-team")
        hw = e["hardware"]
        assert hw["gpu_model"] == "H100-80GB" and hw["mig_profile"] == "1g.10gb" and hw["isolation"] == "mig"
        assert hw["driver_version"] and hw["cuda_version"] and hw["gpu_memory_bytes"] > 0 and hw["node"] == "fc-1"
        assert all(u["at"] for u in e["usage"])

        def series_filled():     # ListSeries reads the history as flushed (every 0.5 s here), after the samples came
            kinds = {(s["kind"], s["name"], s["metric"])
                     for s in json.loads(meshctl(fcluster, "forecast", "series", "-o", "json").stdout)["items"]}
            wanted = {("slice", sid, "memory_used"), ("node", "fc-1", "power"), ("workload", w.id, "utilization")}
            return wanted <= kinds
        wait_for(series_filled, 60, "the slice's, node's and workload's series in the history", interval=1.0)
        table = meshctl(fcluster, "forecast", "interactions").stdout
        assert w.id in table and "1g.10gb" in table and "H100-80GB" in table
        mesh.stop_workload(w.id)
        stopped = wait_for(lambda: (lambda x: x if x and x["state"] == "stopped" else None)(entry(False)), 60,
                           "the entry's stopped state")
        assert stopped["ended"]
        mesh.release(sid)

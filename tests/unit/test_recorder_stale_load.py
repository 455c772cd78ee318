"""The recorder's deployment-load series (controlplane/forecast/recorder.py `sample_deployments`) take the autoscaler's
age rule for a replica's reading (controlplane/controllers/autoscale_freshness.py, `autoscaler_load_max_age_seconds`).
They summed every replica's last reading with no age check: a replica whose readings stopped (its agent cut off) kept
adding its last value to the history the forecasts fit, for as long as the replica stayed. Now, while a READY
replica's load is unknown (a stale reading, or a scrape that failed) no load sample is written for the deployment:
a gap, not a stale value nor a false zero; a replica not read yet (just READY) counts none, as in the autoscaler."""

from __future__ import annotations

import types

from controlplane.forecast.history import HistoryStore, parse_tiers
from controlplane.forecast.recorder import HistoryRecorder
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as T

READY = D.REPLICA_STATE_READY


def world(tmp_path, clock, max_age=15.0):
    d = D.Deployment(spec=D.DeploymentSpec(name="chat", tenant="acme"))
    reps = {f"r{i}": D.Replica(id=f"r{i}", deployment="chat", state=READY, workload_id=f"w{i}") for i in (1, 2)}
    store = types.SimpleNamespace(deployments={"chat": d}, replicas={"chat": reps}, loads={}, load_seen={})
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:1h"])), clock=lambda: clock[0],
                          load_max_age=max_age)
    rec.deployments = types.SimpleNamespace(store=store)
    return store, rec


def read(store, clock, i: int, running: float, scraped: bool = True) -> None:
    """Replica r<i>'s reading arrives now."""
    store.loads[f"r{i}"] = T.BackendLoad(workload_id=f"w{i}", scraped=scraped, requests_running=running)
    store.load_seen[f"r{i}"] = clock[0]


def written(rec) -> dict:
    got = {m: v for k, n, m, tn, t, v in rec.pending}
    rec.pending.clear()
    return got


def test_a_replica_whose_readings_stopped_adds_no_stale_value_to_the_history(tmp_path):
    clock = [1000.0]
    store, rec = world(tmp_path, clock)
    read(store, clock, 1, 3)
    read(store, clock, 2, 5)                     # r2's last reading: then its agent is cut off
    rec.sample_deployments()
    assert written(rec)["requests_running"] == 8
    clock[0] += 60
    read(store, clock, 1, 1)
    rec.sample_deployments()
    got = written(rec)
    assert got["replicas"] == 2
    assert "requests_running" not in got and "requests_waiting" not in got   # unknown: skipped, not 6 nor 1
    clock[0] += 5
    read(store, clock, 1, 1)
    read(store, clock, 2, 2)                     # it reports again
    rec.sample_deployments()
    assert written(rec)["requests_running"] == 3


def test_a_failed_scrape_writes_no_false_zero_and_a_replica_not_read_yet_counts_none(tmp_path):
    clock = [1000.0]
    store, rec = world(tmp_path, clock)
    read(store, clock, 1, 3)
    read(store, clock, 2, 0, scraped=False)      # its /metrics did not answer: its load is unknown
    rec.sample_deployments()
    assert "requests_running" not in written(rec)
    del store.loads["r2"], store.load_seen["r2"]  # just READY, not read yet: counts none
    rec.sample_deployments()
    assert written(rec)["requests_running"] == 3


def test_no_age_bound_with_a_max_age_of_zero(tmp_path):
    clock = [1000.0]
    store, rec = world(tmp_path, clock, max_age=0)
    read(store, clock, 1, 3)
    read(store, clock, 2, 5)
    clock[0] += 3600
    rec.sample_deployments()
    assert written(rec)["requests_running"] == 8

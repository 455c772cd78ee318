"""Slice, node and workload series and seed 000's interaction log (controlplane/forecast/fleet_series.py,
interactions.py), on a real SQLite history: attribution of a GPU's reading to its slices, the node's
sums, each workload's entry with its labels and hardware fingerprint, bounded retention, a restart, the
ListInteractions RPC (scoping, bad input), and a per-app-type pooled forecast learned from the log."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest

from controlplane.api import auth
from controlplane.forecast import fleet_series
from controlplane.forecast.history import HistoryStore, parse_tiers
from controlplane.forecast.interactions import InteractionLog, Query, thin
from controlplane.forecast.recorder import HistoryRecorder
from controlplane.forecast.service import ForecastService
from gpumesh.v1 import forecast_service_pb2 as F
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.forecast.apptype import AppTypeProfile, Run, runs_from_interactions

T0 = 1_700_000_000.0
GiB = 2**30


def _ts(s: float):
    from google.protobuf import timestamp_pb2
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(s * 1e9))
    return t


def fleet():
    """One node, two GPUs: GPU 0 with a MIG slice (own telemetry) and an MPS slice, GPU 1 with none."""
    mig = types_pb2.Slice(id="s-mig", tenant="acme", node="n1", gpu_index=0, gpu_model="A100-80GB",
                          isolation=types_pb2.ISOLATION_MIG, profile="3g.40gb", memory_bytes=40 * GiB,
                          compute_share=0.5, labels={"app-type": "training"})
    mps = types_pb2.Slice(id="s-mps", tenant="beta", node="n1", gpu_index=0, gpu_model="A100-80GB",
                          isolation=types_pb2.ISOLATION_MPS, memory_bytes=20 * GiB, compute_share=0.25)
    inv = types_pb2.NodeInventory(driver_version="550.54.15", cuda_version="12.4", gpu_backend="sim", gpus=[
        types_pb2.Gpu(index=0, model="A100-80GB", product_name="NVIDIA A100-SXM4-80GB", memory_bytes=80 * GiB),
        types_pb2.Gpu(index=1, model="A100-80GB", product_name="NVIDIA A100-SXM4-80GB", memory_bytes=80 * GiB)])
    g0 = types.SimpleNamespace(index=0, memory_bytes=80 * GiB, slices={"s-mig": mig, "s-mps": mps})
    g1 = types.SimpleNamespace(index=1, memory_bytes=80 * GiB, slices={})
    entry = types.SimpleNamespace(record=types_pb2.Node(name="n1", inventory=inv), gpus=[g0, g1])
    return types.SimpleNamespace(nodes={"n1": entry}, slices={"s-mig": mig, "s-mps": mps}), entry


def reading(at: float, util0=60.0, used0=30 * GiB, mig_used=10 * GiB):
    return types_pb2.NodeTelemetry(at=_ts(at), gpus=[
        types_pb2.GpuTelemetry(index=0, utilization_pct=util0, memory_used_bytes=used0, memory_total_bytes=80 * GiB,
                               temperature_c=61, power_w=300),
        types_pb2.GpuTelemetry(index=1, utilization_pct=20, memory_used_bytes=GiB, memory_total_bytes=80 * GiB,
                               temperature_c=45, power_w=100)],
        slices=[types_pb2.SliceTelemetry(slice_id="s-mig", memory_used_bytes=mig_used)])


def workload(wid, slice_id, tenant, state=types_pb2.WORKLOAD_STATE_RUNNING, labels=None, started=T0, finished=0.0):
    w = types_pb2.Workload(id=wid, slice_id=slice_id, node="n1", tenant=tenant, state=state, labels=labels or {},
                           started_at=_ts(started))
    if finished:
        w.finished_at.CopyFrom(_ts(finished))
    return w


def test_slice_and_node_samples_attribute_the_gpu_reading():
    _, entry = fleet()
    rows, uses = fleet_series.node_samples(entry, reading(T0), T0)
    got = {(k, n, m): (tn, v) for k, n, m, tn, t, v in rows}
    # the MIG slice reports its own device's memory; the MPS slice gets the GPU's memory by its share of
    # the GPU's slice memory (20 of 60 GiB), utilization by compute share (0.25 of 0.75)
    assert got[("slice", "s-mig", "memory_used")] == ("acme", 10 * GiB)
    assert got[("slice", "s-mps", "memory_used")] == ("beta", pytest.approx(30 * GiB / 3))
    assert got[("slice", "s-mps", "utilization")][1] == pytest.approx(60 / 3)
    assert got[("slice", "s-mps", "power")][1] == pytest.approx(100)
    assert got[("slice", "s-mig", "memory_bytes")][1] == 40 * GiB          # the slice's demand
    assert got[("node", "n1", "utilization")] == ("", 40.0)                # mean of the two GPUs
    assert got[("node", "n1", "memory_used")][1] == 31 * GiB
    assert got[("node", "n1", "power")][1] == 400 and got[("node", "n1", "temperature")][1] == 61
    assert got[("node", "n1", "slices")][1] == 2 and got[("node", "n1", "allocated_memory")][1] == 60 * GiB
    ws = [workload("w1", "s-mps", "beta"), workload("w2", "s-mps", "beta"),
          workload("w3", "s-mig", "acme", state=types_pb2.WORKLOAD_STATE_SUCCEEDED)]
    wrows = {(n, m): v for _, n, m, _, _, v in fleet_series.workload_samples(uses, ws, T0)}
    assert wrows[("w1", "memory_used")] == pytest.approx(30 * GiB / 6)     # two workloads split their slice
    assert ("w3", "memory_used") not in wrows                             # not running: no use


def test_fingerprint_has_the_gpu_driver_cuda_and_share():
    fl, entry = fleet()
    e = fleet_series.interaction(workload("w1", "s-mps", "beta", labels={"app-type": "inference", "phase": "serve"}),
                                 fl.slices["s-mps"], entry, T0 + 5)
    assert (e.app_type, e.phase, e.state) == ("inference", "serve", "running")
    fp = e.fingerprint
    assert fp["gpu_model"] == "A100-80GB" and fp["gpu_memory_bytes"] == 80 * GiB
    assert fp["driver_version"] == "550.54.15" and fp["cuda_version"] == "12.4"
    assert fp["isolation"] == "mps" and fp["mps_share"] == 0.25 and fp["mig_profile"] == ""
    m = fleet_series.interaction(workload("w2", "s-mig", "acme"), fl.slices["s-mig"], entry, T0)
    assert m.app_type == "training"                      # the slice's label, the workload gave none
    assert m.fingerprint["mig_profile"] == "3g.40gb" and "mps_share" not in m.fingerprint


def run_recorder(tmp_path, fn):
    async def go():
        tmp_path.mkdir(parents=True, exist_ok=True)
        store = HistoryStore(str(tmp_path / "h.db"), parse_tiers(["raw:1d", "1m:30d"]))
        clock = [T0]
        rec = HistoryRecorder(store, clock=lambda: clock[0])
        fl, entry = fleet()
        wm = types.SimpleNamespace(workloads={})
        wm.list = lambda node="": [w for w in wm.workloads.values() if not node or w.node == node]
        rec.attach(types.SimpleNamespace(reading_listeners=[], node_listeners=[]),
                   types.SimpleNamespace(request_listeners=[], fleet=fl), workloads=wm)
        try:
            return await fn(rec, wm, clock)
        finally:
            await rec.stop()
    return asyncio.run(go())


def test_recorder_stores_slice_node_workload_series_and_the_interaction_log(tmp_path):
    async def scenario(rec, wm, clock):
        wm.workloads["w1"] = workload("w1", "s-mig", "acme", labels={"app-type": "training", "phase": "warmup"})
        for i in range(10):
            clock[0] = T0 + i
            rec.on_node("n1", reading(T0 + i, mig_used=(10 + i) * GiB))
        await rec.flush()
        kinds = {(s.kind, s.name, s.metric) for s in rec.store.list()}
        assert {("slice", "s-mig", "memory_used"), ("node", "n1", "power"), ("workload", "w1", "memory_used")} <= kinds
        [e] = rec.interactions.list(Query())
        assert (e.workload, e.app_type, e.phase, e.state) == ("w1", "training", "warmup", "running")
        assert e.fingerprint["cuda_version"] == "12.4" and e.fingerprint["mig_profile"] == "3g.40gb"
        assert [round(m / GiB) for _, _, m in e.usage] == list(range(10, 20))
        # it ends; its slice is gone by then: the entry keeps the fingerprint it had
        wm.workloads["w1"] = workload("w1", "s-mig", "acme", state=types_pb2.WORKLOAD_STATE_SUCCEEDED,
                                      labels={"app-type": "training", "phase": "warmup"}, finished=T0 + 10)
        rec.fleet.slices.clear()
        rec.note_workloads([wm.workloads["w1"]])
        await rec.flush()
        [e] = rec.interactions.list(Query(app_type="training"))
        assert e.state == "succeeded" and e.ended == T0 + 10 and e.fingerprint["gpu_model"] == "A100-80GB"
        assert rec.interactions.list(Query(app_type="inference")) == []
    run_recorder(tmp_path, scenario)
    # a restart reads back what was flushed
    store = HistoryStore(str(tmp_path / "h.db"))
    [e] = InteractionLog(store).list(Query())
    assert e.workload == "w1" and len(e.usage) == 10
    store.close()


def test_interaction_log_retention_is_bounded(tmp_path):
    store = HistoryStore(str(tmp_path / "h.db"))
    log = InteractionLog(store)
    fl, entry = fleet()
    entries = [fleet_series.interaction(workload(f"w{i}", "s-mps", "beta", started=T0 + i,
                                                 state=types_pb2.WORKLOAD_STATE_STOPPED, finished=T0 + i + 1),
                                        fl.slices["s-mps"], entry, T0 + i + 1) for i in range(20)]
    log.upsert(entries)
    assert log.expire(now=T0 + 1000, keep=990.5) == 9           # ended before T0 + 9.5 (w0..w8): gone
    assert log.expire(now=T0 + 1000, keep=10_000, max_entries=4) == 7
    assert [e.workload for e in log.list(Query(max_samples=0))] == ["w19", "w18", "w17", "w16"]
    assert thin(list(range(100)), 5) == [0, 25, 50, 74, 99] and thin([1, 2], 5) == [1, 2]
    store.close()


def rpc(tmp_path, fn, principal):
    async def scenario(rec, wm, clock):
        wm.workloads["w1"] = workload("w1", "s-mig", "acme", labels={"app-type": "training"})
        wm.workloads["w2"] = workload("w2", "s-mps", "beta", labels={"app-type": "inference"})
        for i in range(200):
            clock[0] = T0 + i
            rec.on_node("n1", reading(T0 + i, mig_used=(10 + (i % 7)) * GiB))
        await rec.flush()
        token = auth._current.set(principal)
        try:
            return await fn(ForecastService(rec))
        finally:
            auth._current.reset(token)
    return run_recorder(tmp_path, scenario)


def test_list_interactions_rpc_filters_and_scopes_to_the_tenant(tmp_path):
    async def calls(svc):
        every = await svc.ListInteractions(F.ListInteractionsRequest(max_samples=5), None)
        training = await svc.ListInteractions(F.ListInteractionsRequest(app_type="training"), None)
        return every, training
    every, training = rpc(tmp_path, calls, auth.UNRESTRICTED)
    assert {e.workload_id for e in every.interactions} == {"w1", "w2"}
    assert all(len(e.usage) == 5 for e in every.interactions)
    [t] = training.interactions
    assert t.hardware.mig_profile == "3g.40gb" and t.hardware.driver_version == "550.54.15"
    assert t.hardware.gpu_memory_bytes == 80 * GiB and len(t.usage) == 120 and not t.HasField("ended")
    beta = auth.Principal(kind="client", name="b", tenant="beta", role="tenant")
    mine, _ = rpc(tmp_path / "b", calls, beta)
    assert [e.workload_id for e in mine.interactions] == ["w2"]


@pytest.mark.parametrize("req, field", [(F.ListInteractionsRequest(limit=-1), "limit"),
                                        (F.ListInteractionsRequest(limit=5000), "limit"),
                                        (F.ListInteractionsRequest(max_samples=-3), "max_samples"),
                                        (F.ListInteractionsRequest(limit=1000, max_samples=10_000), "max_samples"),
                                        (F.ListInteractionsRequest(app_type="a\x00b"), "app_type")])
def test_list_interactions_bad_input_names_the_field(tmp_path, req, field):
    from controlplane.forecast.service import interaction_query
    with pytest.raises(errors.InvalidArgument) as e:
        interaction_query(req)
    assert e.value.field == field


def test_slice_and_node_series_are_forecast_through_the_service(tmp_path):
    async def calls(svc):
        s = await svc.forecast("slice", "s-mig", "memory_used", 14, 1)
        n = await svc.forecast("node", "n1", "power", 10, 1)
        w = await svc.forecast("workload", "w1", "memory_used", 14, 1)
        return s, n, w
    s, n, w = rpc(tmp_path, calls, auth.UNRESTRICTED)
    assert len(s.points) == 14 and s.model != "" and len(n.points) == 10 and n.model == "constant"
    # memory cycles 10..16 GiB with period 7: the seasonal naive (season 1 here) is not available, but a
    # good model stays inside the cycle's range
    assert all(9 * GiB <= p.value <= 17 * GiB for p in w.points)


def test_per_app_type_forecast_learned_from_the_log(tmp_path):
    """Training runs ramp memory up for 10 minutes then hold; inference runs hold 8 GiB: a new training
    run 2 minutes in is forecast along the ramp (the last value would stay flat)."""
    store = HistoryStore(str(tmp_path / "h.db"))
    log = InteractionLog(store)
    fl, entry = fleet()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        app = "training" if i % 2 == 0 else "inference"
        start = T0 + 1000 * i
        e = fleet_series.interaction(workload(f"w{i}", "s-mig", "acme", labels={"app-type": app}, started=start),
                                     fl.slices["s-mig"], entry, start)
        log.upsert([e])
        for a in range(0, 900, 10):
            v = (4 + 0.04 * min(a, 600)) * GiB if app == "training" else 8 * GiB
            samples.append(("workload", e.workload, "memory_used", "acme", start + a, v + rng.normal(0, 0.1 * GiB)))
            samples.append(("workload", e.workload, "utilization", "acme", start + a, 50.0))
    store.write(samples)
    runs = runs_from_interactions(log.list(Query(limit=1000, max_samples=100_000)))
    assert {r.app_type for r in runs} == {"training", "inference"} and len(runs) == 12
    prof = AppTypeProfile(step=30).fit(runs)
    truth = np.array([(4 + 0.04 * min(a, 600)) for a in range(150, 450, 30)]) * GiB
    f = prof.forecast("training", age=120, horizon=300, current=(4 + 0.04 * 120) * GiB)
    assert f.runs == 6 and len(f.points) == 10
    naive_err = np.mean(np.abs((4 + 0.04 * 120) * GiB - truth))
    assert np.mean(np.abs(np.array(f.points) - truth)) < 0.1 * naive_err
    assert all(lo <= p <= hi for lo, p, hi in zip(f.lo, f.points, f.hi))
    flat = prof.forecast("inference", age=120, horizon=120)
    assert all(abs(p - 8 * GiB) < 0.3 * GiB for p in flat.points)
    with pytest.raises(errors.FailedPrecondition, match="no runs of app type 'batch'"):
        prof.forecast("batch", age=0, horizon=60)
    assert Run("x", []).app_type == "x"
    store.close()

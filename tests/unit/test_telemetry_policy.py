"""Pressure bands, XIDs reaching the health controller, and health across a restart, against a
real etcd (the health policy itself: test_health_policy.py, test_health_controller.py)."""

from __future__ import annotations

import pytest

from controlplane.controllers.slices import Controller
from controlplane.state.store import EtcdStore
from controlplane.controllers.telemetry import Policy, TelemetryManager
from gpumesh.v1 import types_pb2 as t
from tests.unit.test_placement import make_fleet

GiB = 1 << 30


@pytest.mark.parametrize("pct, want", [(0, "low"), (49.9, "low"), (50, "normal"), (70, "normal"), (70.1, "high"),
                                       (85, "high"), (85.1, "critical"), (100, "critical")])
def test_memory_pressure_bands(pct, want):
    assert Policy().memory_pressure(int(pct * 10), 1000) == want


@pytest.mark.parametrize("celsius, want", [(30, "normal"), (64.9, "normal"), (65, "warning"), (80, "warning"),
                                           (80.5, "throttling"), (85, "throttling"), (86, "critical")])
def test_thermal_bands(celsius, want):
    assert Policy().thermal_state(celsius) == want


def test_thresholds_are_configurable():
    p = Policy(pressure_pct=(10, 20, 30), thermal_c=(40, 50, 60))
    assert p.memory_pressure(25, 100) == "high" and p.thermal_state(55) == "throttling"


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def manager(etcd_server, etcd_client):
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await store.become_leader("telemetry-test", ttl=30)
    ctl = Controller(store)
    ctl.writer.start()
    fleet = make_fleet(("n1", [("H100-80GB", True), ("H100-80GB", True)]))
    ctl.fleet.nodes = fleet.nodes
    ctl.fleet.index = fleet.index
    s = t.Slice(id="s-1", node="n1", gpu_index=0, isolation=t.ISOLATION_MIG, profile="1g.10gb",
                state=t.SLICE_STATE_READY)
    ctl.fleet.put_slice(s)
    await ctl.save([s], created=True)
    clock = Clock()
    mgr = TelemetryManager(ctl, Policy(), clock=clock)
    yield mgr, ctl, clock
    await ctl.writer.stop()
    await store.revoke_lease(store.session_lease)
    await store.close()


def reading(index, used=0, temp=40.0, xids=()):
    return t.GpuTelemetry(index=index, memory_used_bytes=used, memory_total_bytes=80 * GiB, temperature_c=temp,
                          xid_events=list(xids))


async def test_pressure_and_thermal_move_with_readings(manager):
    mgr, ctl, clock = manager
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0, used=70 * GiB, temp=82), reading(1)]))
    g0, g1 = ctl.fleet.gpu("n1", 0), ctl.fleet.gpu("n1", 1)
    assert (g0.memory_pressure, g0.thermal_state) == ("critical", "throttling")
    assert (g1.memory_pressure, g1.thermal_state) == ("low", "normal")
    assert g0.telemetry.memory_pressure == t.MEMORY_PRESSURE_CRITICAL
    assert {e.reason for e in mgr.events_of("n1")} == {"MemoryPressure", "ThermalState"}
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0, used=10 * GiB), reading(1)]))
    assert (g0.memory_pressure, g0.thermal_state) == ("low", "normal")


async def test_xid_policy_marks_unhealthy_reports_slices_and_no_timer_recovers(manager, etcd_client):
    mgr, ctl, clock = manager
    g0 = ctl.fleet.gpu("n1", 0)
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0, xids=[13, 43]), reading(1)]))
    assert g0.health == "healthy"                                     # application class by default
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0, xids=[48]), reading(1)]))
    assert g0.health == "unhealthy" and g0.telemetry.health_reason == "XID 48"
    warn = [e for e in mgr.events_of("n1") if e.reason == "GpuUnhealthy"]
    assert warn and "s-1" in warn[0].message and "reset once idle" in warn[0].message
    assert ctl.fleet.slices["s-1"].message == "GPU unhealthy: XID 48"
    assert await etcd_client.get(b"/gpumesh/v1/gpuhealth/n1/0") is not None
    clock.now += 86400                                                # time alone does not heal a GPU
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0), reading(1)]))
    assert g0.health == "unhealthy"


async def test_lost_gpu_and_health_survives_a_restart(manager):
    mgr, ctl, clock = manager
    await mgr.on_event("n1", t.NodeEvent(type="Warning", reason="GpuLost", message="fell off the bus", gpu_index=1))
    assert ctl.fleet.gpu("n1", 1).health == "lost"
    # a new control plane process: fresh fleet, health read back from etcd
    ctl.fleet.gpu("n1", 1).health = "healthy"
    again = TelemetryManager(ctl, Policy(), clock=clock)
    await again.load()
    assert ctl.fleet.gpu("n1", 1).health == "lost"
    await again.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0), reading(1)]))   # back on the bus, clean
    assert ctl.fleet.gpu("n1", 1).health == "healthy"


async def test_a_gpu_missing_from_telemetry_is_lost(manager):
    mgr, ctl, clock = manager
    await mgr.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0)]))
    assert ctl.fleet.gpu("n1", 1).health == "lost"
    assert ctl.fleet.gpu("n1", 0).health == "healthy"

"""The GPU health controller (controlplane/controllers/health.py) against a real etcd: XIDs by class, the
migration of a marked GPU's workloads, the reset asked of the agent only when the GPU is idle,
the return to service on clean readings only, recurrence quarantine and the operator's clear,
and a control-plane restart in between."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.controllers.slices import Controller
from controlplane.controllers.healthpolicy import HealthPolicy
from controlplane.state.store import EtcdStore
from controlplane.controllers.telemetry import Policy, TelemetryManager
from gpumesh.v1 import types_pb2 as t
from tests.unit.test_placement import make_fleet
from tests.unit.test_telemetry_policy import Clock, reading


class Session:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)

    def resets(self):
        return [m.gpu_reset.gpu_index for m in self.sent if m.WhichOneof("kind") == "gpu_reset"]


class Migrations:
    """The migration manager's surface the health controller uses (migrate, active_for, wm)."""

    def __init__(self):
        self.wm = SimpleNamespace(workloads={})
        self.migrations = {}
        self.asked = []

    def active_for(self, wid):
        return None

    async def migrate(self, wid, to_node="", to_slice="", mode=0, reason="migrate"):
        self.asked.append((wid, reason))
        return SimpleNamespace(id=f"m-{wid}")


@pytest.fixture
async def hc(etcd_server, etcd_client):
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await store.become_leader("health-test", ttl=30)
    ctl = Controller(store)
    ctl.writer.start()
    fleet = make_fleet(("n1", [("H100-80GB", True), ("H100-80GB", True)]))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    s = t.Slice(id="s-1", node="n1", gpu_index=0, isolation=t.ISOLATION_MIG, profile="1g.10gb",
                state=t.SLICE_STATE_READY)
    ctl.fleet.put_slice(s)
    await ctl.save([s], created=True)
    session = Session()
    ctl.sessions.get = lambda node: session if node == "n1" else None
    ctl.migrations = Migrations()
    clock = Clock()
    policy = HealthPolicy(window_seconds=3600.0, max_recurrences=1, reset_retry_seconds=5.0)
    mgr = TelemetryManager(ctl, Policy(health=policy), clock=clock)
    yield SimpleNamespace(mgr=mgr, ctl=ctl, clock=clock, session=session, mm=ctl.migrations, store=store,
                          policy=policy)
    await ctl.writer.stop()
    await store.revoke_lease(store.session_lease)
    await store.close()


def tick(h, *readings):
    return h.mgr.on_telemetry("n1", t.NodeTelemetry(gpus=list(readings) or [reading(0), reading(1)]))


def reasons(h):
    return [e.reason for e in h.mgr.events_of("n1")]


async def settle():
    await asyncio.sleep(0.05)       # the migration tasks the controller spawned


@pytest.mark.parametrize("code", [13, 31, 43, 45, 68, 109])
async def test_application_xids_mark_nothing(hc, code):
    await tick(hc, reading(0, xids=[code]), reading(1))
    g = hc.ctl.fleet.gpu("n1", 0)
    assert g.health == "healthy" and hc.session.resets() == [] and hc.mm.asked == []
    ev = hc.mgr.events_of("n1")[-1]
    assert ev.reason == "XidError" and ev.type == "Normal" and "application class" in ev.message


@pytest.mark.parametrize("code", [48, 63, 74, 92, 94, 95])
async def test_reset_class_marks_migrates_resets_when_idle_and_returns_on_clean_readings(hc, code):
    h = hc
    h.mm.wm.workloads["w-1"] = t.Workload(id="w-1", slice_id="s-1", node="n1", state=t.WORKLOAD_STATE_RUNNING)
    await tick(h, reading(0, xids=[code]), reading(1))
    await settle()
    g = h.ctl.fleet.gpu("n1", 0)
    assert g.health == "unhealthy" and g.telemetry.health_reason == f"XID {code}"
    assert h.mm.asked and h.mm.asked[0][0] == "w-1" and f"XID {code}" in h.mm.asked[0][1]
    assert "GpuUnhealthy" in reasons(h) and "GpuWorkloadMigrating" in reasons(h)
    assert h.ctl.fleet.slices["s-1"].message == f"GPU unhealthy: XID {code}"
    assert h.session.resets() == []                    # the workload still runs there: no reset
    h.mm.wm.workloads["w-1"].state = t.WORKLOAD_STATE_STOPPED    # it moved (or ended)
    h.clock.now += 1
    await tick(h)
    assert h.session.resets() == [0] and "GpuResetRequested" in reasons(h)
    h.clock.now += 1
    await tick(h)
    assert h.session.resets() == [0]                   # not asked again before reset_retry_seconds
    assert g.health == "unhealthy"                     # no timer brings it back
    await h.mgr.on_event("n1", t.NodeEvent(type="Normal", reason="GpuReset", message="GPU 0 reset", gpu_index=0))
    await tick(h, reading(0), reading(1))
    assert g.health == "healthy" and h.ctl.fleet.slices["s-1"].message == ""
    assert reasons(h)[-1] == "GpuRecovered"


async def test_a_reset_that_leaves_pending_repairs_does_not_return_the_gpu(hc):
    h = hc
    await tick(h, reading(0, xids=[48]), reading(1))
    g = h.ctl.fleet.gpu("n1", 0)
    await tick(h)
    assert h.session.resets() == [0]
    await h.mgr.on_event("n1", t.NodeEvent(type="Normal", reason="GpuReset", gpu_index=0))
    pending = reading(0)
    pending.remap_pending = True
    await tick(h, pending, reading(1))
    assert g.health == "unhealthy"                     # still a row pending remap: asked again later
    h.clock.now += 6
    await tick(h)
    assert h.session.resets() == [0, 0]


async def test_a_failed_remap_quarantines(hc):
    await tick(hc, reading(0, xids=[64]), reading(1))
    g = hc.ctl.fleet.gpu("n1", 0)
    assert g.health == "unhealthy"
    failed = reading(0)
    failed.remap_failed = True
    await tick(hc, failed, reading(1))
    assert g.health == "quarantined" and "needs service" in g.telemetry.health_reason


async def test_an_in_use_refusal_is_retried(hc):
    h = hc
    await tick(h, reading(0, xids=[95]), reading(1))
    await tick(h)
    await h.mgr.on_event("n1", t.NodeEvent(type="Warning", reason="GpuResetFailed", gpu_index=0,
                                           message="GPU 0 reset failed: in use by process(es) 42"))
    h.clock.now += 6
    await tick(h)
    assert h.session.resets() == [0, 0] and h.ctl.fleet.gpu("n1", 0).health == "unhealthy"


async def test_burst_is_one_incident_and_recurrence_quarantines_until_cleared(hc, etcd_client):
    h = hc
    g = h.ctl.fleet.gpu("n1", 0)

    async def incident(*codes):
        await tick(h, reading(0, xids=list(codes)), reading(1))
        await tick(h)
        await h.mgr.on_event("n1", t.NodeEvent(type="Normal", reason="GpuReset", gpu_index=0))
        await tick(h)
        h.clock.now += 60

    await incident(48, 63, 94)                 # one burst: one incident
    assert g.health == "healthy"
    await incident(95)                         # the first recurrence: allowed (max_recurrences=1)
    assert g.health == "healthy"
    await tick(h, reading(0, xids=[74]), reading(1))      # the second recurrence within the hour
    assert g.health == "quarantined" and "3 fatal incidents" in g.telemetry.health_reason
    assert "GpuQuarantined" in reasons(h)
    resets = len(h.session.resets())
    h.clock.now += 10
    await tick(h)
    assert len(h.session.resets()) == resets   # quarantined: no automatic recovery
    # a restarted control plane keeps the quarantine and the window
    g.health = "healthy"
    again = TelemetryManager(h.ctl, Policy(health=h.policy), clock=h.clock)
    await again.load()
    assert g.health == "quarantined" and len(again.health.rec(g).incidents) == 3
    await again.health.clear(g)                # `meshctl gpu clear`
    assert g.health == "unhealthy" and again.health.rec(g).incidents == []
    await again.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0), reading(1)]))
    assert h.session.resets()[-1] == 0
    await again.on_event("n1", t.NodeEvent(type="Normal", reason="GpuReset", gpu_index=0))
    await again.on_telemetry("n1", t.NodeTelemetry(gpus=[reading(0), reading(1)]))
    assert g.health == "healthy"


async def test_recurrences_outside_the_window_do_not_quarantine(hc):
    h = hc
    g = h.ctl.fleet.gpu("n1", 0)
    for _ in range(5):
        await tick(h, reading(0, xids=[48]), reading(1))
        await tick(h)
        await h.mgr.on_event("n1", t.NodeEvent(type="Normal", reason="GpuReset", gpu_index=0))
        await tick(h)
        assert g.health == "healthy"
        h.clock.now += 3601


async def test_quarantine_action_and_recovery_off(hc):
    h = hc
    h.mgr.policy = Policy(health=HealthPolicy(xids={74: "quarantine"}, recovery=False))
    h.mgr.health.policy = h.mgr.policy.health
    await tick(h, reading(0, xids=[74]), reading(1, xids=[48]))
    assert h.ctl.fleet.gpu("n1", 0).health == "quarantined"
    assert h.ctl.fleet.gpu("n1", 1).health == "unhealthy"
    h.clock.now += 100
    await tick(h)
    assert h.session.resets() == []            # recovery off: never reset automatically
    await h.mgr.health.clear(h.ctl.fleet.gpu("n1", 0))
    assert h.ctl.fleet.gpu("n1", 0).health == "healthy"


async def test_a_quarantine_xid_within_an_incident_quarantines(hc):
    h = hc
    h.mgr.health.policy = HealthPolicy(xids={74: "quarantine"})
    await tick(h, reading(0, xids=[48]), reading(1))
    assert h.ctl.fleet.gpu("n1", 0).health == "unhealthy"
    await tick(h, reading(0, xids=[74]), reading(1))
    assert h.ctl.fleet.gpu("n1", 0).health == "quarantined"


async def test_lost_gpu_returns_only_when_back_on_the_bus(hc):
    h = hc
    g = h.ctl.fleet.gpu("n1", 1)
    await tick(h, reading(0), reading(1, xids=[79]))
    assert g.health == "unhealthy"
    await tick(h)                                # still read (not off the bus yet): no return
    assert g.health == "unhealthy" and h.session.resets() == []
    await h.mgr.on_event("n1", t.NodeEvent(type="Warning", reason="GpuLost", message="fell off the bus",
                                           gpu_index=1))
    assert g.health == "lost"
    await tick(h, reading(0))                    # missing from the readings
    assert g.health == "lost"
    await tick(h)                                # back (the node rebooted), clean
    assert g.health == "healthy" and h.session.resets() == []


def test_only_an_admin_clears_a_quarantine():
    from controlplane.api import auth
    assert auth.rule_for("/gpumesh.v1.AdminService/ClearGpuQuarantine") == auth.ADMIN


async def test_a_health_record_etcd_refused_once_is_stored_at_the_next_reading(hc):
    """The write of a GPU's new health fails (an etcd member restarting): the GPU is marked in memory, and the
    record is written at its next reading; before, it never was (the same health again writes nothing), so a
    restarted control plane put a quarantined or unhealthy GPU back in service."""
    from controlplane.state import keys
    from mesh import errors
    h = hc
    write, fail = h.ctl.writer.write, [1]

    async def flaky(ops, conds=()):
        if fail[0] and any(o.key == keys.gpu_health("n1", 0) for o in ops):
            fail[0] -= 1
            raise errors.Unavailable("etcd: no leader")
        return await write(ops, conds)
    h.ctl.writer.write = flaky
    g = h.ctl.fleet.gpu("n1", 0)
    with pytest.raises(errors.Unavailable):
        await tick(h, reading(0, xids=[79]), reading(1))
    assert g.health != "healthy"
    was = g.health
    await tick(h)                              # the next reading stores it
    g.health = "healthy"                       # a restarted control plane reads etcd
    again = TelemetryManager(h.ctl, Policy(health=h.policy), clock=h.clock)
    await again.load()
    assert g.health == was and again.health.rec(g).recovery == "reboot"

"""The leader's side of the load signals (controlplane/serving/deployments.py on_loads, deploystore.py): a
reading lands on the replica whose current workload it came from, with its GPU's judged pressure and
thermal state, wakes the deployment's watchers, and is shown by Get (full) only while the workload is the
replica's; the telemetry manager hands each reading's loads to its listeners."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.serving.deployments import DeploymentManager
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2


class Fleet:
    def __init__(self, gpus):
        self.gpus = gpus

    def gpu(self, node, index):
        return self.gpus.get((node, index))


def manager():
    telemetry = SimpleNamespace(backend_listeners=[])
    ctl = SimpleNamespace(telemetry=telemetry, fleet=Fleet({
        ("gpu-a", 0): SimpleNamespace(memory_pressure="high", thermal_state="throttling")}))
    m = DeploymentManager(ctl, workloads=None, registry=None)
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat"))
    m.store.replicas["chat"] = {
        "r-1": D.Replica(id="r-1", deployment="chat", node="gpu-a", gpu_index=0, workload_id="w-1"),
        "r-2": D.Replica(id="r-2", deployment="chat", node="gpu-b", gpu_index=0, workload_id="w-2")}
    return m, telemetry


def test_loads_land_on_their_replicas():
    m, telemetry = manager()
    assert telemetry.backend_listeners == [m.on_loads]          # registered with the telemetry manager
    ev = m.store.subscribe("chat")
    loads = [types_pb2.BackendLoad(workload_id="w-1", scraped=True, requests_running=1, requests_waiting=4),
             types_pb2.BackendLoad(workload_id="w-2", scraped=True, requests_waiting=9),   # not gpu-a's workload
             types_pb2.BackendLoad(workload_id="w-gone", scraped=True)]
    asyncio.run(m.on_loads("gpu-a", loads))
    assert ev.is_set()
    d = m.store.full("chat")
    r1, r2 = d.replicas
    assert r1.load.requests_waiting == 4 and r1.load.gpu_memory_pressure == types_pb2.MEMORY_PRESSURE_HIGH
    assert r1.load.gpu_thermal_state == types_pb2.THERMAL_STATE_THROTTLING
    assert not r2.HasField("load")              # a reading from another node does not land on gpu-b's replica
    # the stored record itself carries no load (what goes to etcd)
    assert not m.store.replicas["chat"]["r-1"].HasField("load")
    # the leader's metrics have it, until the replica goes
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("gpumesh_replica_requests_waiting", {"deployment": "chat", "replica": "r-1"}) == 4
    from controlplane.serving import loadmetrics
    loadmetrics.forget("chat", "r-1")
    assert REGISTRY.get_sample_value("gpumesh_replica_requests_waiting", {"deployment": "chat", "replica": "r-1"}) is None
    # a new workload for the replica (restart): the old reading is not shown
    m.store.replicas["chat"]["r-1"].workload_id = "w-3"
    assert not m.store.full("chat").replicas[0].HasField("load")


def test_telemetry_manager_hands_loads_to_listeners():
    from controlplane.controllers.telemetry import TelemetryManager
    got = []

    async def listener(node, loads):
        got.append((node, [x.workload_id for x in loads]))

    async def broken(node, loads):
        raise RuntimeError("a listener's failure does not stop the readings")
    ctl = SimpleNamespace(agent_handlers={}, fleet=SimpleNamespace(nodes={"gpu-a": SimpleNamespace(gpus=[])},
                                                                   gpu=lambda n, i: None))
    t = TelemetryManager(ctl)
    t.backend_listeners.extend([broken, listener])
    reading = types_pb2.NodeTelemetry(backends=[types_pb2.BackendLoad(workload_id="w-1")])
    asyncio.run(t.on_telemetry("gpu-a", reading))
    assert got == [("gpu-a", ["w-1"])]


def test_a_watch_that_ends_leaves_no_entry_behind():
    """The store's watchers are keyed by deployment name: the last watch of a deployment to end drops its key (an
    empty list stayed for every name ever watched, deleted deployments' too)."""
    m, _ = manager()
    first, second = m.store.subscribe("chat"), m.store.subscribe("chat")
    m.store.unsubscribe("chat", first)
    m.store.changed("chat")
    assert second.is_set() and not first.is_set()
    m.store.unsubscribe("chat", second)
    m.store.unsubscribe("chat", second)         # twice: nothing to do
    assert m.store._watchers == {}

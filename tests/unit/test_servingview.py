"""The control plane's ServingViewService without a cluster: what a snapshot holds for an admin and for a
tenant, what counts as a change (not a reading's timestamp), and the request's bounds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.api import auth
from controlplane.serving import viewsvc
from controlplane.serving.replicakeys import ReplicaKeys
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import types_pb2 as T
from mesh import errors


class Store:
    def __init__(self, deps):
        self.deployments = {d.spec.name: d for d in deps}
        self.keys = ReplicaKeys(None)
        self.keys.keys.update({f"{d.spec.name}-r": f"key-of-{d.spec.name}" for d in deps})

    def full(self, name):
        d = D.Deployment()
        d.CopyFrom(self.deployments[name])
        d.replicas.append(D.Replica(id=f"{name}-r", deployment=name, node="n1", gpu_index=0,
                                    state=D.REPLICA_STATE_READY, endpoint="127.0.0.1:1"))
        return d


def fixture():
    deps = [D.Deployment(spec=D.DeploymentSpec(name=n, model="smol", tenant=t)) for n, t in (("a", "team-a"),
                                                                                             ("b", "team-b"))]
    gpu = SimpleNamespace(index=0, allocated_memory=0, allocated_compute=0.0, slices=[], mig_layout=[], sharing="",
                          telemetry=T.GpuTelemetry(index=0, memory_used_bytes=5, memory_total_bytes=10,
                                                   temperature_c=50), health="healthy", memory_pressure="normal",
                          thermal_state="normal")
    entry = SimpleNamespace(ready=True, record=SimpleNamespace(cordoned=False, inventory=SimpleNamespace(
        gpus=[T.Gpu(index=0, memory_bytes=10)])), gpus=[gpu])
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={"n1": entry}))
    return ctl, SimpleNamespace(store=Store(deps)), SimpleNamespace(models={"smol": M.Model(name="smol")}), gpu


def test_snapshot_scoped_by_tenant():
    ctl, deps, models, _ = fixture()
    view = viewsvc.snapshot(ctl, deps, models)                 # unrestricted (admin)
    assert [d.spec.name for d in view.deployments] == ["a", "b"] and [m.name for m in view.models] == ["smol"]
    assert len(view.gpus) == 1 and view.gpus[0].telemetry.temperature_c == 50
    assert view.gpus[0].telemetry.memory_pressure == T.MEMORY_PRESSURE_NORMAL
    # an admin (the gateway) gets every replica's API key
    assert dict(view.replica_api_keys) == {"a-r": "key-of-a", "b-r": "key-of-b"}
    for who in (auth.Principal("client", "alice", "team-a", "tenant"), auth.Principal("client", "dash", "team-a",
                                                                                        "viewer")):
        token = auth._current.set(who)
        try:
            view = viewsvc.snapshot(ctl, deps, models)
        finally:
            auth._current.reset(token)
        assert [d.spec.name for d in view.deployments] == ["a"]
        # a tenant or viewer never gets a key, not even of its own tenant's replicas, anywhere in the view
        assert not view.replica_api_keys and b"key-of" not in view.SerializeToString()


def test_fingerprint_ignores_the_reading_time_only():
    ctl, deps, models, gpu = fixture()
    a = viewsvc.snapshot(ctl, deps, models)
    gpu.telemetry.at.seconds = 99
    b = viewsvc.snapshot(ctl, deps, models)
    assert viewsvc._fingerprint(a) == viewsvc._fingerprint(b)
    gpu.telemetry.temperature_c = 90
    c = viewsvc.snapshot(ctl, deps, models)
    assert viewsvc._fingerprint(c) != viewsvc._fingerprint(b)


def test_model_costs_are_an_admins_only():
    """The per-model costs are the whole fleet's (every tenant's deployments of the model): a tenant's view
    carried them, another tenant's spending on the same model (CostService answers a tenant its own only)."""
    from gpumesh.v1 import cost_service_pb2 as C
    ctl, deps, models, _ = fixture()
    ctl.cost = SimpleNamespace(model_costs=lambda names: [C.ModelCost(model=n, dollars_per_hour=7.5) for n in names])
    assert [c.model for c in viewsvc.snapshot(ctl, deps, models).model_costs] == ["smol"]       # the gateway's
    token = auth._current.set(auth.Principal("client", "alice", "team-a", "tenant"))
    try:
        view = viewsvc.snapshot(ctl, deps, models)
    finally:
        auth._current.reset(token)
    assert [m.name for m in view.models] == ["smol"] and not view.model_costs


async def test_watch_bounds():
    ctl, deps, models, _ = fixture()
    svc = viewsvc.ServingViewService(ctl, deps, models)
    inner = viewsvc.ServingViewService.Watch.__wrapped__
    for req, field in ((V.WatchServingViewRequest(interval_ms=50), "interval_ms"),
                       (V.WatchServingViewRequest(interval_ms=1000, heartbeat_ms=500), "heartbeat_ms")):
        with pytest.raises(errors.InvalidArgument, match=field):
            await inner(svc, req, None).__anext__()
    first = await inner(svc, V.WatchServingViewRequest(), None).__anext__()
    assert first.sequence == 1 and len(first.deployments) == 2 and first.HasField("at")

"""A pool's events (controlplane/pools/store.py): a pool's Create, Update (what changed) and Delete, and its quota
holding a deployment back (a replica it refuses: `PoolExhausted`, from the deployment controller's actuator; an
autoscaler scale-up it caps: `PoolLimit`) are events of kind `Pool`, and `meshctl describe pool` ends with them as
`describe deployment` does. Pools recorded no event at all: `describe pool` had no Events section, and what a
pool's quota held back was told only on each deployment."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from controlplane.pools.store import PoolStore
from controlplane.state.fleet import Fleet
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import event_service_pb2 as E
from gpumesh.v1 import pool_service_pb2 as P
from mesh import errors
from mesh.cost import PriceTable
from mesh.poolapi import pool_from_dict
from tests.unit._meshctl_fake import install, run

PRICES = PriceTable.parse(["H100-80GB=2.40"])
REFUSED = 'PoolExhausted: pool "inference-a" quota max_slices=1 reached (uses 1, a replica asks 1 more)'


class Writer:
    async def write(self, ops, conditions=()) -> int:
        return 1


def world():
    events = []
    ctl = SimpleNamespace(fleet=Fleet(), scheduler=None, writer=Writer(),
                          recorder=SimpleNamespace(emit=lambda kind, name, type, reason, message, **kw:
                                                   events.append(dict(kind=kind, name=name, type=type, reason=reason,
                                                                      message=message, **kw))))
    return PoolStore(ctl, PRICES), ctl, events


async def test_create_update_and_delete_are_events_of_the_pool():
    store, _, events = world()
    await store.create(pool_from_dict({"name": "inference-a", "selector": {"gpu_models": ["H100-80GB"],
                                                                           "isolations": ["mps"]},
                                       "quota": {"max_slices": 1}, "tenants": ["team-a"]}))
    await store.update(pool_from_dict({"name": "inference-a", "selector": {"gpu_models": ["H100-80GB"],
                                                                           "isolations": ["mps"]},
                                       "quota": {"max_slices": 8, "max_gpus": 2.5}, "tenants": ["team-a"]}))
    await store.update(pool_from_dict({"name": "inference-a", "selector": {"gpu_models": ["H100-80GB"],
                                                                           "isolations": ["mps"]},
                                       "quota": {"max_slices": 8, "max_gpus": 2.5}, "tenants": ["team-a"]}))
    await store.delete("inference-a")
    assert [(e["kind"], e["name"], e["type"], e["reason"]) for e in events] == [
        ("Pool", "inference-a", "Normal", "Created"), ("Pool", "inference-a", "Normal", "Updated"),
        ("Pool", "inference-a", "Normal", "Updated"), ("Pool", "inference-a", "Normal", "Deleted")]
    created, changed, same, _ = (e["message"] for e in events)
    assert "quota.max_slices 1" in created and "selector.isolations mps" in created and "tenants team-a" in created
    assert changed == "generation 2: quota.max_gpus unset -> 2.5, quota.max_slices 1 -> 8"
    assert same == "generation 3: nothing changed"
    assert all(e["tenant"] == "" for e in events)          # an admin's: which tenants a pool admits is not a tenant's
    with pytest.raises(errors.NotFound):
        await store.delete("inference-a")
    assert len(events) == 4                                  # a refused change is no event


async def test_a_replica_the_quota_refuses_is_a_warning_on_the_pool_once_per_reason():
    from controlplane.serving.actuator import Actuator
    from controlplane.state.requestids import RequestIds
    store, ctl, events = world()
    await store.create(pool_from_dict({"name": "inference-a", "quota": {"max_slices": 1}}))
    why = [REFUSED]

    async def allocate(req, **kw):
        raise errors.ResourceExhausted(f"cannot place 1 slice(s): H100-80GB: 1 GPU(s): {why[0]}")
    ctl.allocate, ctl.requests = allocate, RequestIds(lambda: 3600.0)
    saved = []

    async def put_replica(r):
        saved.append(r)
    act = Actuator(ctl, None, SimpleNamespace(put_replica=put_replica))
    spec = D.DeploymentSpec(name="chat", tenant="team-a", model="smol", pool="inference-a")
    r = D.Replica(id="r-1", deployment="chat", message="waiting for a slice")
    for _ in range(3):                      # retried every few seconds while the pool stays full
        with pytest.raises(errors.ResourceExhausted):
            await act.allocate(saved[-1] if saved else r, spec, 2 << 30)
    on_pool = [e for e in events if e["kind"] == "Pool" and e["type"] == "Warning"]
    assert len(on_pool) == 1
    e = on_pool[0]
    assert (e["name"], e["reason"], e["tenant"], e["source"]) == ("inference-a", "PoolExhausted", "team-a",
                                                                  "deployment-controller")
    assert e["message"] == f"deployment chat: replica r-1 waits: {REFUSED}"
    why[0] = REFUSED.replace("max_slices=1", "max_slices=2").replace("uses 1", "uses 2")
    with pytest.raises(errors.ResourceExhausted):
        await act.allocate(saved[-1], spec, 2 << 30)
    assert len([e for e in events if e["kind"] == "Pool" and e["type"] == "Warning"]) == 2   # a new reason


async def test_an_autoscaler_capped_by_the_pool_is_a_warning_on_the_pool():
    from controlplane.controllers.autoscaler import AutoscalerController
    from tests.unit.test_autoscaler_controller import Manager, deployment, replica
    store, ctl, events = world()
    await store.create(pool_from_dict({"name": "inference-a", "quota": {"max_slices": 1}}))
    r, load = replica(1, running=1, waiting=7, at=1)
    d = deployment(1, min_replicas=1, max_replicas=4, target=2)
    d.spec.pool = "inference-a"
    dm = Manager(d, [r])
    dm.ctl.pools = store
    store.room = lambda name, need, cost: 0              # the pool is full
    dm.store.loads["r-1"] = load
    clock = [1000.0]
    ctl_ = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    decision = await ctl_.one("chat")
    assert decision.bound_by == "pool" and decision.desired == 1
    clock[0] += 2
    await ctl_.one("chat")                                # the same episode: no second event
    on_pool = [e for e in events if e["kind"] == "Pool" and e["type"] == "Warning"]
    assert [(e["name"], e["reason"], e["tenant"], e["source"]) for e in on_pool] == [
        ("inference-a", "PoolLimit", "team-a", "autoscaler")]
    assert on_pool[0]["message"].startswith("deployment chat: held at 1 replica(s) by the pool's room: ")


class PoolMesh:
    def __init__(self) -> None:
        self.asked = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def get_pool(self, name):
        return P.Pool(name=name, quota=P.PoolQuota(max_slices=1), generation=2)

    def list_events(self, **kw):
        self.asked.append(kw)
        ev = E.Event(id="ev-1", kind="Pool", name="inference-a", type="Warning", reason="PoolExhausted",
                     message=f"deployment chat: replica r-1 waits: {REFUSED}", count=3, source="deployment-controller")
        ev.first_timestamp.GetCurrentTime()
        ev.last_timestamp.GetCurrentTime()
        return [ev]


def test_describe_pool_ends_with_its_events(monkeypatch, capsys):
    m = install(monkeypatch, PoolMesh())
    rc, out, err = run(capsys, "describe", "pool", "inference-a")
    assert rc == 0, err
    assert out.index("Deployments:") < out.index("Events:") and "PoolExhausted" in out and "replica r-1" in out
    assert m.asked[0]["kind"] == "Pool" and m.asked[0]["name"] == "inference-a"
    rc, out, err = run(capsys, "describe", "pool", "inference-a", "-o", "json")
    doc = json.loads(out)
    assert doc["name"] == "inference-a" and [e["reason"] for e in doc["event_list"]] == ["PoolExhausted"]
    rc, out, err = run(capsys, "get", "events", "--for", "pool/inference-a")
    assert rc == 0, err
    assert m.asked[-1]["kind"] == "Pool" and m.asked[-1]["name"] == "inference-a"

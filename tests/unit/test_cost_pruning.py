"""The cost accountant under churn (controlplane/cost/accountant.py): the counters' label sets of deleted nodes,
deployments and models go (they were kept for ever, one series per group ever charged), while the groups still
there keep their figures and the ledger keeps every charge."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from controlplane.cost.accountant import SERIES_GRACE_S, SERIES_IDLE_S, CostAccountant
from controlplane.cost.ledger import CostLedger
from controlplane.state.fleet import Fleet
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2
from mesh.cost import PriceTable
from mesh.cost import accounting as acc

GIB = 1 << 30
PRICES = PriceTable.parse(["H100-80GB=2.40"])
PER_SLICE_HOUR = 2.40 / 8             # a 1g.10gb MIG slice of an H100
TENANT = "prune-t"                    # this file's own label values (the registry is the process's)


def node(name: str) -> types_pb2.Node:
    inv = types_pb2.NodeInventory(cpu_milli=8000, memory_bytes=64 * GIB, gpus=[
        types_pb2.Gpu(index=0, uuid=f"GPU-{name}", model="H100-80GB", memory_bytes=80 * GIB)])
    return types_pb2.Node(name=name, inventory=inv)


def slice_(sid: str, on: str, created: float, labels=None) -> types_pb2.Slice:
    s = types_pb2.Slice(id=sid, tenant=TENANT, node=on, gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                        profile="1g.10gb", memory_bytes=10 * GIB, labels=labels or {})
    s.created_at.FromSeconds(int(created))
    return s


def dollars(dep: str, model: str, on: str):
    return REGISTRY.get_sample_value("gpumesh_cost_dollars_total",
                                     {"tenant": TENANT, "deployment": dep, "model": model, "node": on})


def idle_warm(on: str):
    return REGISTRY.get_sample_value("gpumesh_cost_idle_dollars_total", {"tenant": TENANT, "deployment": "",
                                                                         "model": "", "node": on, "kind": "idle_warm"})


def per_1k(model: str):
    return REGISTRY.get_sample_value("gpumesh_cost_dollars_per_1k_tokens", {"model": model})


def test_deleted_groups_lose_their_series_and_live_ones_keep_their_figures(tmp_path):
    fleet = Fleet()
    fleet.upsert_node(node("prune-live"))
    deps = {"prune-chat": D.Deployment(spec=D.DeploymentSpec(name="prune-chat", model="prune-m-chat"))}
    store = SimpleNamespace(deployments=deps, replicas={}, loads={})
    for s in (slice_("s-plain", "prune-live", 0),
              slice_("s-chat", "prune-live", 0, {"gpumesh.deployment": "prune-chat"})):
        fleet.slices[s.id] = s
    clock = [0.0]
    ledger = CostLedger(str(tmp_path / "h.db"))
    a = CostAccountant(SimpleNamespace(fleet=fleet), SimpleNamespace(store=store), ledger, PRICES, interval=10,
                       token_window=30.0, clock=lambda: clock[0])

    async def account(t):
        clock[0] = t
        await a.account()

    async def churn():
        t = 0.0
        for i in range(40):          # a node, its deployment (of a model of its own) and a warm slice, each retired
            name, dep, model = f"prune-n{i}", f"prune-d{i}", f"prune-m{i}"
            fleet.upsert_node(node(name))
            deps[dep] = D.Deployment(spec=D.DeploymentSpec(name=dep, model=model))
            for s in (slice_(f"s-rep{i}", name, t, {"gpumesh.deployment": dep}),
                      slice_(f"s-warm{i}", name, t, {acc.WARM_LABEL: "true"})):
                fleet.slices[s.id] = s
            t += 10
            await account(t)
            assert dollars(dep, model, name) == pytest.approx(10 * PER_SLICE_HOUR / 3600)
            assert idle_warm(name) == pytest.approx(10 * PER_SLICE_HOUR / 3600)
            for sid in (f"s-rep{i}", f"s-warm{i}"):
                del fleet.slices[sid]
            del deps[dep]
            fleet.drop_node(name)
            t += 10
            await account(t)
            # kept SERIES_GRACE_S, unchanged, so a scrape still sees the last increment; then gone
            assert dollars(dep, model, name) == pytest.approx(10 * PER_SLICE_HOUR / 3600)
            if i >= SERIES_GRACE_S // 20:
                j = i - int(SERIES_GRACE_S // 20)
                assert dollars(f"prune-d{j}", f"prune-m{j}", f"prune-n{j}") is None
                assert idle_warm(f"prune-n{j}") is None
            # bounded: the live groups, the deleted ones of the grace, the models of the last token window (30 s)
            assert len(a._children) <= 2 + 2 * (SERIES_GRACE_S // 20 + 1)
            assert len(a._idle_children) <= SERIES_GRACE_S // 20 + 1
            assert len(a.window) <= 1 + 3
        return t
    t = asyncio.run(churn()) + SERIES_GRACE_S
    asyncio.run(account(t))                 # the grace and the last token window of the retired ones have passed
    assert len(a._children) == 2 and not a._idle_children and len(a._last_live) == 2
    assert dollars("prune-d39", "prune-m39", "prune-n39") is None
    assert set(a.window) == {"prune-m-chat"} and per_1k("prune-m39") is None
    assert per_1k("prune-m-chat") is not None
    # the live groups' counters never lost a charge: every second since creation, at the slice's rate
    assert dollars("", "", "prune-live") == pytest.approx(t * PER_SLICE_HOUR / 3600)
    assert dollars("prune-chat", "prune-m-chat", "prune-live") == pytest.approx(t * PER_SLICE_HOUR / 3600)
    # the ledger keeps the deleted ones' charges (GetCost reads it)
    by_dep = {ln.key: ln.dollars for ln in ledger.query("deployment", 0.0)}
    assert by_dep["prune-d7"] == pytest.approx(10 * PER_SLICE_HOUR / 3600)
    assert len([k for k in by_dep if k.startswith("prune-d")]) == 40
    by_node = {ln.key: ln.dollars for ln in ledger.query("node", 0.0)}
    assert by_node["prune-n3"] == pytest.approx(2 * 10 * PER_SLICE_HOUR / 3600)

    # a deployment moved to another model: its old group's series goes, the new one counts from there
    deps["prune-chat"] = D.Deployment(spec=D.DeploymentSpec(name="prune-chat", model="prune-m-chat2"))
    asyncio.run(account(t + 10))
    assert dollars("prune-chat", "prune-m-chat2", "prune-live") == pytest.approx(10 * PER_SLICE_HOUR / 3600)
    asyncio.run(account(t + 10 + SERIES_GRACE_S))
    assert dollars("prune-chat", "prune-m-chat", "prune-live") is None
    a.pool.shutdown(wait=True)
    ledger.close()


def test_a_group_without_a_live_slice_for_a_day_loses_its_series_deleted_or_not(tmp_path):
    """A tenant that holds no slice on a node any more: nothing is deleted (no event says a tenant is gone), so
    its series went nowhere; now after SERIES_IDLE_S, and a slice of it later counts anew."""
    fleet = Fleet()
    fleet.upsert_node(node("prune-idle"))
    fleet.slices["s-idle"] = slice_("s-idle", "prune-idle", 0)
    clock = [0.0]
    ledger = CostLedger(str(tmp_path / "h.db"))
    a = CostAccountant(SimpleNamespace(fleet=fleet), None, ledger, PRICES, interval=10, clock=lambda: clock[0])

    def account(t):
        clock[0] = t
        asyncio.run(a.account())
    account(10)
    del fleet.slices["s-idle"]
    account(20)
    account(20 + SERIES_GRACE_S)                      # the node is there: not a deleted group, kept
    assert dollars("", "", "prune-idle") == pytest.approx(10 * PER_SLICE_HOUR / 3600)
    account(10 + SERIES_IDLE_S)
    assert dollars("", "", "prune-idle") is None and not a._children and not a._last_live
    fleet.slices["s-back"] = slice_("s-back", "prune-idle", 10 + SERIES_IDLE_S)
    account(20 + SERIES_IDLE_S)
    assert dollars("", "", "prune-idle") == pytest.approx(10 * PER_SLICE_HOUR / 3600)
    a.pool.shutdown(wait=True)
    ledger.close()


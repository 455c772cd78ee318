"""One deployment whose reconcile fails holds back no other (controlplane/serving/deployments.py `reconcile_all`,
serving/passerrors.py). The pass ended at the first deployment whose `reconcile_one` raised: every deployment sorted
after it was not reconciled in that pass, and one that failed every pass starved them for good. Now the failure is
logged, counted (`gpumesh_deployment_reconcile_errors_total`) and a `ReconcileFailed` Warning event on that
deployment, sent again only when its error changes or comes back, and the pass goes on; the replica gauges still
count every deployment's replicas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import REGISTRY

from controlplane.serving.deployments import REPLICAS, DeploymentManager
from controlplane.state import keys
from gpumesh.v1 import deployment_service_pb2 as D
from mesh import errors


class Writer:
    """The group-commit writer's `write`, refusing every write under deployment `refuse`'s replicas with `error`."""

    def __init__(self) -> None:
        self.refuse = ""
        self.error: Exception = errors.Unavailable("etcd: request is too large")

    async def write(self, ops, conditions=()) -> int:
        if self.refuse and any(op.key.startswith(keys.replica(self.refuse, "")) for op in ops):
            raise self.error
        return 1


def no_model(name):
    raise errors.NotFound(f"no model {name!r}")


def manager():
    events = []
    writer = Writer()
    ctl = SimpleNamespace(telemetry=None, writer=writer, fleet=SimpleNamespace(slices={}, nodes={}),
                          recorder=SimpleNamespace(emit=lambda kind, name, type, reason, message, **kw:
                                                   events.append((kind, name, type, reason, message))))
    m = DeploymentManager(ctl, workloads=SimpleNamespace(workloads={}),
                          registry=SimpleNamespace(get=no_model, gpu_models=lambda: []))
    for name in ("a", "b"):
        m.store.deployments[name] = D.Deployment(spec=D.DeploymentSpec(name=name, model="m", replicas=1),
                                                 generation=1)
    return m, writer, events


def failures(events, name):
    return [e for e in events if e[1] == name and e[3] == "ReconcileFailed"]


def count(name):
    return REGISTRY.get_sample_value("gpumesh_deployment_reconcile_errors_total", {"deployment": name}) or 0


async def test_a_deployment_that_always_fails_holds_back_no_other():
    m, writer, events = manager()
    writer.refuse = "a"                          # "a" sorts first: its replica's record is refused every pass
    before = count("a")
    try:
        await m.reconcile_all()
        assert not m.store.replicas.get("a")
        assert len(m.store.replicas["b"]) == 1   # reconciled in the same pass
        assert REPLICAS.labels("pending")._value.get() == 1
        [(kind, name, type, reason, message)] = failures(events, "a")
        assert (kind, type) == ("Deployment", "Warning") and "etcd: request is too large" in message
        assert count("a") == before + 1 and not failures(events, "b")

        await m.reconcile_all()                  # the same error again: counted, no second event
        assert count("a") == before + 2 and len(failures(events, "a")) == 1

        writer.error = errors.Unavailable("etcd: no leader")
        await m.reconcile_all()                  # a new error: a new event
        assert [e[4].rsplit(": ", 1)[-1] for e in failures(events, "a")] == ["request is too large", "no leader"]

        writer.refuse = ""
        await m.reconcile_all()                  # it succeeds: the episode ends
        assert len(m.store.replicas["a"]) == 1
        writer.refuse, writer.error = "a", errors.Unavailable("etcd: request is too large")
        m.store.deployments["a"].spec.replicas = 2
        await m.reconcile_all()                  # failing again, with the first error: told again
        assert len(failures(events, "a")) == 3

        del m.store.deployments["a"], m.store.replicas["a"]
        await m.reconcile_all()                  # gone: its series goes from the metric
        assert REGISTRY.get_sample_value("gpumesh_deployment_reconcile_errors_total", {"deployment": "a"}) is None
    finally:
        await asyncio.sleep(0)                   # (each replica action started, then cancelled)
        for t in m.busy.values():
            t.cancel()
        await asyncio.gather(*m.busy.values(), return_exceptions=True)

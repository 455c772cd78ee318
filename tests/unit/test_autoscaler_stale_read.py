"""The autoscaler writes a decision only onto the deployment it was made from: the real DeploymentManager (its lock,
its store) over a writer that holds a write until the test lets it through. A Wake or a SetScaling holds the
manager's lock while its write is in flight and changes the memory copy only once it is durable; an autoscaler
pass in that window read the copy from before, decided on it, waited for the lock, then wrote its status over the
newer record: the Wake's `woken_at` (what a new leader counts the held request by) was lost for good, and a
policy just removed came back as an autoscaler status. Now such a write is skipped (the next pass decides again on
what is there)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.controllers.autoscaler import AutoscalerController
from controlplane.serving.deployments import DeploymentManager
from controlplane.state import keys
from controlplane.state.store import Put
from gpumesh.v1 import deployment_service_pb2 as D
from mesh import errors, scalingpolicy


class HeldWriter:
    """The group-commit writer's `write`, keeping each key's last value; while `held` is set, every write waits
    for it to be cleared (`let_through`)."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.held: asyncio.Event | None = None
        self.waiting = 0

    async def write(self, ops, conditions=()) -> int:
        if self.held is not None:
            self.waiting += 1
            await self.held.wait()
        for op in ops:
            if isinstance(op, Put):
                self.values[op.key] = op.value
        return 1

    def hold(self) -> None:
        self.held, self.waiting = asyncio.Event(), 0

    def let_through(self) -> None:
        held, self.held = self.held, None
        held.set()


def no_model(name):
    raise errors.NotFound(f"no model {name!r}")


@pytest.fixture
def world():
    writer = HeldWriter()
    ctl = SimpleNamespace(telemetry=None, writer=writer, fleet=SimpleNamespace(slices={}, nodes={}),
                          recorder=SimpleNamespace(emit=lambda *a, **k: None))
    dm = DeploymentManager(ctl, workloads=None, registry=SimpleNamespace(get=no_model, gpu_models=lambda: []))
    policy = scalingpolicy.build(max_replicas=2, target=2, scale_to_zero_after_s=5, stable_window_s=5,
                                 panic_window_s=1, scale_down_delay_s=0)
    dm.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(
        name="chat", model="smol", replicas=0, tenant="team-a", scaling=policy), generation=3)
    return dm, writer, AutoscalerController(dm, dm.registry)


async def until(cond, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not cond():
        assert loop.time() < deadline, what
        await asyncio.sleep(0)


def stored(writer: HeldWriter) -> D.Deployment:
    return D.Deployment.FromString(writer.values[keys.deployment("chat")])


async def test_a_pass_decided_before_a_wake_was_written_keeps_the_wakes_woken_at(world):
    dm, writer, autoscaler = world
    writer.hold()
    wake = asyncio.create_task(dm.scaling.wake("chat"))
    await until(lambda: writer.waiting == 1, "the wake's write did not start")
    assert dm.store.deployments["chat"].spec.replicas == 0      # not durable yet: the memory copy is the old one
    decided = asyncio.create_task(autoscaler.one("chat"))
    await until(lambda: dm._lock.locked() and len(dm._lock._waiters or ()) == 1, "the pass did not reach the lock")
    writer.let_through()
    assert (await asyncio.wait_for(wake, 20)).woke
    await asyncio.wait_for(decided, 20)
    for d in (dm.store.deployments["chat"], stored(writer)):
        assert d.spec.replicas == 1
        assert d.status.autoscaler.HasField("woken_at") and d.status.autoscaler.mode == "wake", d.status.autoscaler


async def test_a_pass_decided_before_the_policy_was_removed_writes_no_status_after_it(world):
    dm, writer, autoscaler = world
    writer.hold()
    clear = asyncio.create_task(dm.scaling.set_scaling("chat", None, clear=True))
    await until(lambda: writer.waiting == 1, "the removal's write did not start")
    decided = asyncio.create_task(autoscaler.one("chat"))
    await until(lambda: dm._lock.locked() and len(dm._lock._waiters or ()) == 1, "the pass did not reach the lock")
    writer.let_through()
    await asyncio.wait_for(clear, 20)
    await asyncio.wait_for(decided, 20)
    for d in (dm.store.deployments["chat"], stored(writer)):
        assert not d.spec.HasField("scaling")
        assert not d.status.HasField("autoscaler"), d.status.autoscaler

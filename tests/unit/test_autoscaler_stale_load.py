"""The autoscaler's load readings have an age bound (controlplane/controllers/autoscale_freshness.py): a replica's
reading received more than `load_max_age` ago is stale, its load unknown. A reading that stopped arriving (its
agent cut off, its scraper stuck) counted with its last value until the replica was replaced, or for good: a burst's
last reading kept a deployment scaled up on load long gone, and a failed scrape counted as no load (a scale-down,
a scale to zero, on load not measured). Now an unknown load is taken as the mean of the replicas read, no
scale-down is made on it (the decision holds and says why), and a stale reading is a `LoadStale` Warning."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.controllers.autoscaler import AutoscalerController
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as T
from tests.unit.test_autoscaler_controller import Manager, deployment, replica

MAX_AGE = 15.0              # autoscaler_load_max_age_seconds' default


def world(n: int, **policy):
    reps = [replica(i + 1, at=1000) for i in range(n)]
    dm = Manager(deployment(n, **policy), [r for r, _ in reps])
    dm.store.load_seen = {}
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])      # its default max age: MAX_AGE
    return dm, ctl, clock


def read(dm, clock, i: int, **kw) -> None:
    """Replica r-i's reading arrives now."""
    _, load = replica(i, at=clock[0], **kw)
    dm.store.loads[f"r-{i}"] = load
    dm.store.load_seen[f"r-{i}"] = clock[0]


async def test_a_burst_whose_reading_stopped_keeps_no_deployment_scaled_up():
    dm, ctl, clock = world(2, min_replicas=1, max_replicas=4, target=2, stable_window_s=6, panic_window_s=2,
                           scale_down_delay_s=0, panic_threshold=100)
    read(dm, clock, 1)
    read(dm, clock, 2, running=1, waiting=13)      # r-2's last reading: a burst; then its agent is cut off
    clock[0] += MAX_AGE
    for _ in range(3):
        clock[0] += 2
        read(dm, clock, 1)                          # r-1 reports every tick: idle
        decision = await ctl.one("chat")
    # r-2's reading is 21 s old: not a burst of 14 requests any more, but unknown: the mean of r-1's (0), and no
    # scale-down on it
    assert decision.desired == 2 and dm.store.deployments["chat"].spec.replicas == 2
    assert (decision.mode, decision.bound_by) == ("hold", "unknown_load")
    assert decision.signals["load_stale"] == 1 and decision.signals["load_unknown"] == 1
    assert "the load of 1 of 2 ready replica(s) is unknown (1 stale: no reading for over 15s)" in decision.reason
    status = dm.store.deployments["chat"].status.autoscaler
    assert status.bound_by == "unknown_load" and status.signals["load_stale"] == 1
    stale = [e for e in dm.events if e[1] == "LoadStale"]
    assert len(stale) == 1 and stale[0][0] == "Warning" and "r-2" in stale[0][2] and "(more than 15s)" in stale[0][2]
    clock[0] += 2
    read(dm, clock, 1)
    read(dm, clock, 2)                              # it reports again, idle: the scale-down goes on
    decision = await ctl.one("chat")
    assert decision.desired == 1 and "load_stale" not in decision.signals
    assert dm.store.deployments["chat"].spec.replicas == 1


async def test_a_known_load_still_scales_up_with_the_unknown_taken_as_the_mean():
    dm, ctl, clock = world(2, min_replicas=1, max_replicas=8, target=2, stable_window_s=2, panic_window_s=2,
                           scale_down_delay_s=0, panic_threshold=100)
    read(dm, clock, 1, running=1, waiting=5)
    read(dm, clock, 2, running=1, waiting=5)
    clock[0] += MAX_AGE + 1
    read(dm, clock, 1, running=1, waiting=5)        # r-2 silent: 16 s since its reading
    decision = await ctl.one("chat")
    assert decision.desired == 6                    # 6 on r-1, r-2 taken as the same: 12 at 2 a replica
    assert "a stale one taken at the mean load of those read" in decision.reason
    assert decision.signals["load_stale"] == 1


async def test_with_no_load_known_nothing_scales_to_zero():
    dm, ctl, clock = world(1, max_replicas=2, target=2, scale_to_zero_after_s=30, stable_window_s=5,
                           panic_window_s=1, scale_down_delay_s=0)
    read(dm, clock, 1, total=10)                    # idle; then its reading stops arriving
    for _ in range(20):                             # 60 s, of which 45 s with nothing known
        decision = await ctl.one("chat")
        clock[0] += 3
    assert decision.desired == 1 and decision.mode == "hold" and dm.store.deployments["chat"].spec.replicas == 1
    assert not any(e[1] == "ScaledToZero" for e in dm.events)
    read(dm, clock, 1, total=40)                    # back, idle now, but 30 requests were served in the gap
    decision = await ctl.one("chat")
    assert decision.desired == 1 and decision.signals["idle_s"] == 0 and "load_unknown" not in decision.signals


async def test_a_failed_scrape_is_no_reading_not_an_idle_replica():
    dm, ctl, clock = world(2, min_replicas=1, max_replicas=4, target=2, stable_window_s=2, panic_window_s=2,
                           scale_down_delay_s=0)
    read(dm, clock, 1)
    read(dm, clock, 2, running=2, waiting=1)
    dm.store.loads["r-2"] = T.BackendLoad(workload_id="w-2", scraped=False, error="GET /metrics answered 503")
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "unknown_load"
    assert "1 not read: no reading yet or /metrics did not answer" in decision.reason
    assert not any(e[1] == "LoadStale" for e in dm.events)      # not stale: the agent reports, the backend did not


async def test_the_hold_never_passes_the_cost_ceiling_or_max_replicas():
    dm, ctl, clock = world(3, min_replicas=1, max_replicas=4, target=2, stable_window_s=2, panic_window_s=2,
                           scale_down_delay_s=0, cost_ceiling_per_hour=0.65)       # $0.30 a replica: 2 affordable
    read(dm, clock, 1)                              # r-2 and r-3 not read yet
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "unknown_load"
    dm, ctl, clock = world(3, min_replicas=1, max_replicas=4, target=2, stable_window_s=2, panic_window_s=2,
                           scale_down_delay_s=0)
    dm.store.deployments["chat"].spec.scaling.max_replicas = 2      # lowered below the 3 there are
    read(dm, clock, 1)
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "unknown_load"


def test_the_store_stamps_each_reading_when_it_arrives():
    from controlplane.serving.deployments import DeploymentManager
    ctl = SimpleNamespace(telemetry=None, fleet=SimpleNamespace(gpu=lambda node, index: None))
    m = DeploymentManager(ctl, workloads=None, registry=None)
    m.store.clock = lambda: 1234.5
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat"))
    r = D.Replica(id="r-1", deployment="chat", node="gpu-a", workload_id="w-1")
    m.store.replicas["chat"] = {"r-1": r}
    load = T.BackendLoad(workload_id="w-1", scraped=True)
    load.at.FromSeconds(5)                          # the agent's clock: not what ages it
    asyncio.run(m.on_loads("gpu-a", [load]))
    assert m.store.load_seen == {"r-1": 1234.5}

    async def write(ops, conds=()):
        return 1
    ctl.writer = SimpleNamespace(write=write)
    asyncio.run(m.store.delete_replica(r))
    assert m.store.load_seen == {} and m.store.loads == {}

"""The live orchestrator across time and leaders: what it keeps bounded (windows, gauges, cooldown entries), what
a new leader carries on from etcd (the warm pool, the moves' budgets), what a bad reading or a long resize must not
stop. The fixtures and helpers are test_orchestrator_live.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

from controlplane.controllers.orchestrator import Orchestrator, Settings
from controlplane.controllers.orchforecast import InlineFitter, Windows, fit_jobs, jobs_for_gpus
from gpumesh.v1 import types_pb2 as t
from tests.unit._workloads_standin import workloads_standin
from tests.unit.test_orchestrator_live import GiB, env, fc, ready_all, running, warm  # noqa: F401 - env is a fixture
from tests.unit.test_placement import make_fleet


async def test_windows_of_released_slices_and_removed_gpus_are_dropped():
    """Telemetry feeds every window whichever rules are on; a slice released (or a GPU whose node went) leaves
    its window behind unless a pass drops it: with slices coming and going, the leader's memory grew for ever."""
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    live = t.Slice(id="s-live", node="n1")
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes=fleet.nodes, slices={live.id: live}))
    orch = Orchestrator(ctl, Settings(warm=False, moves=False, resize=True), fitter=InlineFitter())
    reading = lambda sid: SimpleNamespace(slice_id=sid, memory_used_bytes=GiB)   # noqa: E731
    orch.windows.on_slices("n1", [reading("s-live"), reading("s-gone")])
    g = SimpleNamespace(node="gone-node", index=0, memory_bytes=80 * GiB)
    r = t.GpuTelemetry(memory_used_bytes=GiB, temperature_c=40)
    orch.windows.on_gpu(g, r)
    orch.windows.on_gpu(SimpleNamespace(node="n1", index=0, memory_bytes=80 * GiB), r)
    await orch.forecast()
    assert set(orch.windows.slice) == {"s-live"}
    assert set(orch.windows.gpu) == {"n1/0"}


def test_a_nan_reading_does_not_stop_a_gpus_forecasts():
    """An agent's NaN temperature is left out of the series; the fit goes on (before, it failed for as long as
    the reading stayed in the window: no forecast and so no move for that GPU for hours)."""
    w = Windows(3600)
    g = SimpleNamespace(node="n1", index=0, memory_bytes=80 * GiB)
    for i in range(600):
        r = t.GpuTelemetry(memory_used_bytes=(10 + i % 5) * GiB, temperature_c=60.0 + (i % 7))
        r.at.FromSeconds(1_700_000_000 + i)
        if i == 590:
            r.temperature_c = math.nan
        w.on_gpu(g, r)
    jobs = jobs_for_gpus(w, 1.0, 15.0, 0.9)
    got = {j.metric: f for j, f in zip(jobs, fit_jobs(jobs))}
    assert got["temperature"] is not None and all(math.isfinite(v) for v in got["temperature"].hi)
    assert got["memory_fraction"] is not None


async def test_resize_cooldown_holds_a_slice_then_is_forgotten():
    """A slice the orchestrator resized is left alone for the cooldown; then its entry goes (it was kept for
    ever, one per slice ever resized)."""
    from controlplane.controllers.autoresize import ResizePass
    now = [1000.0]
    rp = ResizePass(SimpleNamespace(fleet=SimpleNamespace(slices={})), None, Settings(resize_cooldown_s=300),
                    clock=lambda: now[0])
    rp.last.update({"s-a": 900.0, "s-b": 600.0})
    got = []
    import controlplane.controllers.autoresize as ar
    real = ar.resize_actions
    ar.resize_actions = lambda views, hi, policy: got.append(sorted(hi)) or []
    try:
        rp.decide({"s-a": fc("slice", "s-a", "memory_used", [GiB]), "s-b": fc("slice", "s-b", "memory_used", [GiB])})
    finally:
        ar.resize_actions = real
    assert got == [["s-b"]] and rp.last == {"s-a": 900.0}


async def test_the_forecast_gauge_of_a_released_slice_goes():
    """gpumesh_orchestrator_forecast_upper had one series per slice ever forecast, each frozen at its last
    value once the slice was released."""
    from prometheus_client import REGISTRY
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    s = t.Slice(id="s-gauge", node="n1", state=t.SLICE_STATE_READY, labels={"gpumesh.io/autoresize": "true"})
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes=fleet.nodes, slices={s.id: s}))
    orch = Orchestrator(ctl, Settings(resize=True), fitter=InlineFitter())
    for i in range(400):
        orch.windows._push(orch.windows.slice, s.id, (1_700_000_000.0 + i, float(GiB * (1 + i % 3))))

    def gauge():
        return REGISTRY.get_sample_value("gpumesh_orchestrator_forecast_upper",
                                         {"kind": "slice", "name": "s-gauge", "metric": "memory_used"})
    await orch.forecast()
    assert gauge() is not None
    del ctl.fleet.slices[s.id]
    await orch.forecast()
    assert gauge() is None and orch.latest == {}


async def test_a_new_leader_keeps_the_warm_pool_until_it_has_a_forecast(env):
    """A new leader (windows empty: no request of the key seen yet) keeps the warm slices the last one carved
    until its own history forecasts the key; it gave them back down to one at its first pass, then carved them
    again once its forecast came."""
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [3.0], step=60)})
    assert len(warm(env.ctl)) == 3
    now = [1_700_000_000.0]
    new = Orchestrator(env.ctl, env.orch.s, workloads=env.wm, migrations=env.mig, fitter=InlineFitter(),
                       clock=lambda: now[0])
    new.pool = env.orch.pool
    await new.warm_pass({})
    assert len(warm(env.ctl)) == 3
    assert key in new.windows.arrivals and new.windows.first_arrival[key] == now[0]
    await new.warm_pass({key: fc("fleet", key, "requests", [0.0], step=60)})    # its forecast: nothing asked
    assert len(warm(env.ctl)) == 1


async def test_a_burst_floor_without_a_forecast_carves_once(env):
    """A key with a burst floor and no forecast yet (history too short) is carved up to its floor once; it was
    counted as having none and carved again at every pass, up to warm_max_total."""
    import collections
    import dataclasses
    key = "1g.10gb/any"
    env.orch.s = dataclasses.replace(env.orch.s, warm_burst_q=1.0, warm_create_s=10.0, warm_burst_windows=1.0)
    env.orch.windows.arrivals[key] = collections.deque((x,) for x in (0.0, 1.0))
    env.orch.windows.first_arrival[key] = 0.0
    assert env.orch.burst_floor() == {key: 2}
    for _ in range(3):
        await env.orch.warm_pass({})
    assert len(warm(env.ctl)) == 2


async def test_a_new_leader_keeps_the_move_budgets_and_cooldowns(env):
    """The moves' ledger is rebuilt from the migration records: a new leader does not move again at once off a
    GPU (or a workload) the last leader moved from a moment ago."""
    from controlplane.controllers.premigrate import MovePass
    from gpumesh.v1 import migration_service_pb2 as MS
    running(env, "n1", "w-a0")
    running(env, "n1", "w-b4")
    hot = {("n1/0", "temperature"): fc("gpu", "n1/0", "temperature", [90] * 5),
           ("n2/0", "temperature"): fc("gpu", "n2/0", "temperature", [40] * 5)}
    th = ((50.0, 70.0, 85.0), (65.0, 80.0, 85.0))
    now = 1_700_000_000.0
    fresh = MovePass(env.ctl, env.wm, env.mig, env.orch.s, clock=lambda: now)
    assert len(fresh.decide(hot, *th, set())) == 1           # no record of a move: it would move
    m = MS.Migration(id="m-1", workload_id="w-x", reason="orchestrator: GPU n1/0 temperature forecast 90.0C ...",
                     phase=MS.MIGRATION_PHASE_DONE)
    m.created_at.FromSeconds(int(now - 100))
    other = MS.Migration(id="m-2", workload_id="w-y", reason="drain")
    other.created_at.FromSeconds(int(now - 50))
    env.mig.migrations.update({m.id: m, other.id: other})
    again = MovePass(env.ctl, env.wm, env.mig, env.orch.s, clock=lambda: now)
    assert again.decide(hot, *th, set()) == []               # n1/0 moved 100 s ago: cooldown 600 s
    assert again.ledger.workload_last_hour(now, "w-x") == 1 and again.ledger.fleet_last_hour(now) == 1


async def test_a_long_resize_does_not_hold_the_orchestrators_pass(env):
    """A MIG slice grows by live migration (minutes): the pass starts it and goes on (warm slices and moves are
    not held for as long as it takes); the slice is not asked again while it runs."""
    import asyncio
    s = t.Slice(id="s-r", node="n1", gpu_index=0, tenant="acme", isolation=t.ISOLATION_MPS, memory_bytes=20 * GiB,
                compute_share=0.2, state=t.SLICE_STATE_READY, labels={"gpumesh.io/autoresize": "true"},
                allocation_id="a-r")
    env.ctl.fleet.put_slice(s)
    gate = asyncio.Event()

    async def slow_resize(sid, memory_bytes, compute_share, mig_profile=""):
        env.mig.calls.append(("resize", sid, memory_bytes))
        await gate.wait()
    env.mig.resize = slow_resize
    rp = env.orch.resizes
    rp.s = Settings(resize_cooldown_s=0.0)
    big = {"s-r": fc("slice", "s-r", "memory_used", [30 * GiB] * 3)}
    assert await asyncio.wait_for(rp.act(rp.decide(big)), 2) == 1
    assert await rp.act(rp.decide(big)) == 0 and len(env.mig.calls) == 1       # under way: not asked again
    gate.set()
    await rp.settle()
    assert not rp.running


async def test_a_new_leader_keeps_the_resize_cooldown(env):
    """The cooldown lived in the leader's memory only: after a failover the new leader resized again at once a slice
    the old one had just resized. A resize now records `resized_at` in the slice's etcd record, and a fresh
    controller built from etcd (what a new leader builds) holds the slice until the cooldown ends."""
    import time

    from controlplane.controllers.autoresize import ResizePass
    from controlplane.controllers.migrations import MigrationManager
    from controlplane.controllers.nodes import rebuild
    from controlplane.controllers.slices import Controller
    from controlplane.state import keys
    from tests.unit.test_orchestrator_live import FakeMigrations

    s = t.Slice(id="s-cool", node="n1", gpu_index=0, gpu_model="H100-80GB", tenant="acme", isolation=t.ISOLATION_MPS,
                memory_bytes=10 * GiB, compute_share=0.2, state=t.SLICE_STATE_READY, allocation_id="a-cool",
                labels={"gpumesh.io/autoresize": "true"})
    env.ctl.fleet.put_slice(s)
    await env.ctl.save([s], created=True)
    mm = MigrationManager(env.ctl, workloads_standin())
    cooldown = 300.0
    old = ResizePass(env.ctl, mm, Settings(resize_cooldown_s=cooldown))
    before = time.time()
    assert await old.act(old.decide({s.id: fc("slice", s.id, "memory_used", [15 * GiB] * 3)})) == 1
    await old.settle()
    after = time.time()
    assert env.ctl.fleet.slices[s.id].memory_bytes == 17 * GiB            # 15 GiB * 1.1, whole GiB: in place

    new_ctl = Controller(env.ctl.store)                  # the new leader: its fleet from etcd, its memory empty
    rebuild(new_ctl, await env.ctl.store.load(keys.SLICES))
    rec = new_ctl.fleet.slices[s.id]
    assert rec.memory_bytes == 17 * GiB and rec.HasField("resized_at")
    at = rec.resized_at.ToNanoseconds() / 1e9
    assert before <= at <= after
    clock = [at + cooldown - 1]
    mig = FakeMigrations()
    new = ResizePass(new_ctl, mig, Settings(resize_cooldown_s=cooldown), clock=lambda: clock[0])
    more = {s.id: fc("slice", s.id, "memory_used", [25 * GiB] * 3)}
    assert await new.act(new.decide(more)) == 0 and mig.calls == []        # still cooling: left alone
    clock[0] = at + cooldown
    assert await new.act(new.decide(more)) == 1
    await new.settle()
    assert mig.calls == [("resize", s.id, 28 * GiB)]


async def test_a_warm_slice_its_agent_could_not_carve_is_given_back_and_replaced(env):
    """A warm slice the agent failed to carve (FAILED: NVML refused, no such GPU) was counted as carved: the pool
    kept it for ever (its GPU space held, no tenant to release it, never claimable) and carved no replacement,
    so a key that asked for warm slices had none ready. It is given back, and the pass carves what is missing."""
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    need_two = {key: fc("fleet", key, "requests", [2.0], step=60)}
    await env.orch.warm_pass(need_two)
    bad = warm(env.ctl)[0]
    failed = t.Slice()
    failed.CopyFrom(bad)
    failed.state, failed.message = t.SLICE_STATE_FAILED, "nvml: insufficient resources"
    env.ctl.fleet.put_slice(failed)
    await env.orch.warm_pass(need_two)
    assert env.ctl.fleet.slices.get(bad.id) is None or env.ctl.fleet.slices[bad.id].state == t.SLICE_STATE_RELEASING
    live = [s for s in warm(env.ctl) if s.state != t.SLICE_STATE_FAILED]
    assert len(live) == 2 and bad.id not in {s.id for s in live}


async def test_a_node_that_fails_to_carve_gets_no_warm_slice_for_a_growing_backoff(env):
    """FGD chose the same spot every pass, so a GPU whose carving always failed had a warm slice carved, failed and
    given back there on every pass for good (two events and an NVML call a pass). The node of a failed carve now gets
    none for 60 s, doubling at each failure there, and is forgotten once a warm slice there is READY."""
    from controlplane.controllers import warmslices
    now = [1000.0]
    env.orch.pool.clock = lambda: now[0]
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    need_one = {key: fc("fleet", key, "requests", [1.0], step=60)}

    def fail_the_warm_one():
        (w,) = warm(env.ctl)
        failed = t.Slice()
        failed.CopyFrom(w)
        failed.state, failed.message = t.SLICE_STATE_FAILED, "nvml: insufficient resources"
        env.ctl.fleet.put_slice(failed)
        return w.node
    await env.orch.warm_pass(need_one)
    first = fail_the_warm_one()
    await env.orch.warm_pass(need_one)
    (again,) = warm(env.ctl)
    assert again.node != first                                # before: the same spot, on every pass
    assert env.orch.pool.backoff[first] == (1000.0 + warmslices.FAILED_BACKOFF_S, warmslices.FAILED_BACKOFF_S)
    second = fail_the_warm_one()
    await env.orch.warm_pass(need_one)
    assert warm(env.ctl) == []                                # both nodes backed off: none carved, none churned
    now[0] += warmslices.FAILED_BACKOFF_S + 1                 # the first node's 60 s are over
    await env.orch.warm_pass(need_one)
    (third,) = warm(env.ctl)
    assert third.node == first and second in env.orch.pool.backoff
    fail_the_warm_one()
    await env.orch.warm_pass(need_one)
    assert env.orch.pool.backoff[first][1] == 2 * warmslices.FAILED_BACKOFF_S    # doubled at the second failure
    now[0] += 2 * warmslices.FAILED_BACKOFF_S + 1
    await env.orch.warm_pass(need_one)
    ready_all(env.ctl)
    await env.orch.warm_pass(need_one)
    assert not {w.node for w in warm(env.ctl)} & set(env.orch.pool.backoff)   # READY there: forgotten


async def test_a_warm_slice_on_a_cordoned_node_is_given_back_and_carved_elsewhere(env):
    """A cordoned node takes no new placement, and a claim is one (`claim` passes such warm slices over): its warm
    slices were counted as carved, so the key got none a request could take. They are given back, and the pass
    carves what is missing on the nodes still open."""
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    need_two = {key: fc("fleet", key, "requests", [2.0], step=60)}
    await env.orch.warm_pass(need_two)
    ready_all(env.ctl)
    before = warm(env.ctl)
    assert len(before) == 2
    shut = before[0].node
    env.ctl.fleet.nodes[shut].record.cordoned = True
    await env.orch.warm_pass(need_two)
    live = warm(env.ctl)
    assert len(live) == 2 and all(s.node != shut for s in live)
    assert all(env.ctl.fleet.slices.get(s.id) is None or env.ctl.fleet.slices[s.id].state == t.SLICE_STATE_RELEASING
               for s in before if s.node == shut)


async def test_a_pass_judges_temperature_moves_with_the_memory_moves_it_just_decided(env):
    """The pass runs the move rule twice (memory, then temperature), each against the ledger as it was: a GPU
    hot on both had a workload moved for each in one pass (its cooldown and "one move per source GPU" ignored),
    and the fleet budget was spent twice (fleet_per_hour 1: two moves)."""
    import dataclasses
    th = ((50.0, 70.0, 85.0), (65.0, 80.0, 85.0))
    running(env, "n1", "w-a0")
    running(env, "n1", "w-b4")
    both = {("n1/0", "memory_fraction"): fc("gpu", "n1/0", "memory_fraction", [0.99] * 5),
            ("n1/0", "temperature"): fc("gpu", "n1/0", "temperature", [90] * 5),
            ("n2/0", "memory_fraction"): fc("gpu", "n2/0", "memory_fraction", [0.1] * 5),
            ("n2/0", "temperature"): fc("gpu", "n2/0", "temperature", [40] * 5)}
    decisions = env.orch.moves.decide(both, *th, set())
    assert [(a.subject, a.source) for a, _, _ in decisions] == [("w-a0", "n1/0")]

    for wid in ("w-a0", "w-b4"):
        del env.wm.workloads[wid]
        env.ctl.fleet.drop_slice(f"s-{wid}")
    for node, wid in (("n1", "w-a0"), ("n2", "w-c0")):      # a quarter of a GPU each: either fits on the other
        running(env, node, wid, profile="2g.20gb")
        s = t.Slice()
        s.CopyFrom(env.ctl.fleet.slices[f"s-{wid}"])
        s.memory_bytes, s.placement.size = 20 * GiB, 2
        env.ctl.fleet.put_slice(s)
    env.orch.moves.s = dataclasses.replace(env.orch.moves.s, fleet_per_hour=1)
    env.orch.moves.ledger = type(env.orch.moves.ledger)()
    apart = {("n1/0", "memory_fraction"): fc("gpu", "n1/0", "memory_fraction", [0.99] * 5),
             ("n1/0", "temperature"): fc("gpu", "n1/0", "temperature", [40] * 5),
             ("n2/0", "memory_fraction"): fc("gpu", "n2/0", "memory_fraction", [0.1] * 5),
             ("n2/0", "temperature"): fc("gpu", "n2/0", "temperature", [90] * 5)}
    assert len(env.orch.moves.decide(apart, *th, set())) == 1


async def test_a_workload_whose_move_was_refused_is_not_asked_for_again_each_pass(env):
    """The migration of the hot GPU's lowest-priority workload is refused (it cannot be checkpointed, say): the
    next pass picked the same workload again, refused again, a PreMigrateFailed warning every pass for as long as
    the GPU stayed hot, and its other workloads were never tried. A refused workload sits out the cooldown."""
    from mesh import errors
    running(env, "n1", "w-a0", priority=0)
    running(env, "n1", "w-b4", priority=5)
    migrate = env.mig.migrate

    async def refuse_a(wid, **kw):
        if wid == "w-a0":
            env.mig.calls.append(("refused", wid))
            raise errors.FailedPrecondition("workload w-a0 does not use the checkpoint SDK")
        await migrate(wid, **kw)
    env.mig.migrate = refuse_a
    hot = {("n1/0", "temperature"): fc("gpu", "n1/0", "temperature", [90] * 5),
           ("n2/0", "temperature"): fc("gpu", "n2/0", "temperature", [40] * 5)}
    th = ((50.0, 70.0, 85.0), (65.0, 80.0, 85.0))
    assert await env.orch.moves.act(env.orch.moves.decide(hot, *th, set())) == 0
    assert await env.orch.moves.act(env.orch.moves.decide(hot, *th, set())) == 1
    assert [c[:2] for c in env.mig.calls] == [("refused", "w-a0"), ("migrate", "w-b4")]


async def test_a_leader_with_warm_slices_off_gives_the_warm_slices_back(env):
    """Warm slices carved by a leader with the rule on, then a leader with it off: nothing claimed them or made room
    where they sat (the pool does both, and there is none), so they held their GPU space until an admin released
    them one by one. The leader with the rule off gives each back, with an event saying why; tenants' slices stay."""
    from controlplane.controllers.warmslices import release_when_off
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [2.2], step=60)})
    ready_all(env.ctl)
    carved = {s.id for s in warm(env.ctl)}
    assert len(carved) == 3
    from mesh.slicespec import validate
    env.ctl.warm = None                 # the tenant's slice is a fresh one, not a claimed warm one
    _, (tenant,) = await env.ctl.allocate(validate(t.SliceSpec(tenant="acme", mig_profile="2g.20gb")), no_wait=True)
    events = []
    env.ctl.recorder = SimpleNamespace(emit=lambda *a, **kw: events.append(a))
    gone = await release_when_off(env.ctl, "orchestrator_warm_slices is false")
    assert set(gone) == carved and warm(env.ctl) == []
    assert all(env.ctl.fleet.slices[sid].state == t.SLICE_STATE_RELEASING for sid in carved)
    assert "warm slices are turned off" in env.ctl.fleet.slices[gone[0]].message
    assert env.ctl.fleet.slices[tenant.id].state != t.SLICE_STATE_RELEASING
    assert sorted(e[1] for e in events if e[3] == "WarmSliceReleased") == sorted(carved)
    assert await release_when_off(env.ctl, "orchestrator_warm_slices is false") == []     # once

"""The live orchestrator's glue (controlplane/controllers/orchestrator.py and its passes) on a fake
fleet over a real etcd: forecasts in, warm slices / migrations / resizes out, as tables. The
actuators for moves and resizes are recorders here (their machinery has its own tests); warm slices
and Allocate's claim are the real controller's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from controlplane.controllers.orchestrator import Orchestrator, Settings
from controlplane.controllers.orchforecast import (Forecast, InlineFitter, Windows, fit_jobs, jobs_for_demand,
                                                   jobs_for_gpus)
from controlplane.controllers.slices import Controller
from controlplane.controllers.warmslices import KEY_LABEL, WARM_LABEL, is_warm
from controlplane.scheduler import profiles
from controlplane.state.store import EtcdStore
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.slicespec import validate
from tests.unit.test_placement import make_fleet

GiB = 1 << 30


class FakeMigrations:
    def __init__(self):
        self.migrations = {}
        self.calls = []

    def active_for(self, wid):
        return None

    async def migrate(self, wid, to_node="", to_slice="", mode=0, reason=""):
        self.calls.append(("migrate", wid, to_node, reason))

    async def resize(self, sid, memory_bytes, compute_share, mig_profile=""):
        self.calls.append(("resize", sid, memory_bytes))


def fc(kind, name, metric, hi, points=None, step=1.0):
    points = points or hi
    return Forecast(kind, name, metric, "damped", step, points[0], tuple(points), tuple(points), tuple(hi), 0.9)


@pytest.fixture
async def env(etcd_server, etcd_client):
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await store.become_leader("orch-test", ttl=30)
    ctl = Controller(store)
    ctl.scheduler = profiles.build("default")
    ctl.writer.start()
    fleet = make_fleet(("n1", [("H100-80GB", True)]), ("n2", [("H100-80GB", True)]))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    for n in ctl.fleet.nodes.values():
        for g in n.gpus:
            g.health = "healthy"
    wm = SimpleNamespace(workloads={})
    mig = FakeMigrations()
    settings = Settings(warm=True, moves=True, resize=True, demand_step_s=60, warm_lead_s=60, warm_max_per_key=4,
                        warm_max_total=6, cooldown_s=600, load_step_s=1.0)
    orch = Orchestrator(ctl, settings, workloads=wm, migrations=mig, fitter=InlineFitter())
    orch.attach()
    yield SimpleNamespace(ctl=ctl, orch=orch, wm=wm, mig=mig)
    await ctl.writer.stop()
    await store.revoke_lease(store.session_lease)
    await store.close()


def ready_all(ctl):
    for s in list(ctl.fleet.slices.values()):
        if s.state == t.SLICE_STATE_PENDING:
            ns = t.Slice()
            ns.CopyFrom(s)
            ns.state = t.SLICE_STATE_READY
            ns.device_uuid = f"MIG-{s.id}"
            ctl.fleet.put_slice(ns)


def warm(ctl):
    return [s for s in ctl.fleet.slices.values() if is_warm(s) and s.state != t.SLICE_STATE_RELEASING]


# -- rule 1: warm slices ------------------------------------------------------------------------

@pytest.mark.parametrize("hi, want", [((0.0,), 0), ((0.4,), 1), ((2.2,), 3), ((9.0,), 4)])
async def test_warm_pass_carves_what_the_upper_edge_asks_for(env, hi, want):
    env.orch.windows.on_request("1g.10gb/any")
    await env.orch.warm_pass({"1g.10gb/any": fc("fleet", "1g.10gb/any", "requests", list(hi), step=60)})
    ws = warm(env.ctl)
    assert len(ws) == want
    for s in ws:
        assert s.tenant == "" and s.labels[WARM_LABEL] == "true" and s.labels[KEY_LABEL] == "1g.10gb/any"
        assert s.profile == "1g.10gb" and s.state == t.SLICE_STATE_PENDING
    assert env.ctl.fleet.usage.get("t", (0, 0, 0))[0] == 0       # no tenant pays for them


async def test_warm_pass_is_level_triggered_with_hysteresis(env):
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    high = {key: fc("fleet", key, "requests", [3.0], step=60)}
    await env.orch.warm_pass(high)
    await env.orch.warm_pass(high)                      # the same forecast again: nothing more
    assert len(warm(env.ctl)) == 3
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [1.5], step=60)})
    assert len(warm(env.ctl)) == 3                      # need 2, band up to 4: kept
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [0.0], step=60)})
    assert len(warm(env.ctl)) == 1                      # need 0: down to the band's edge (1)


async def test_warm_total_is_capped(env):
    for key in ("1g.10gb/any", "1g.20gb/any"):
        env.orch.windows.on_request(key)
    await env.orch.warm_pass({k: fc("fleet", k, "requests", [4.0], step=60) for k in ("1g.10gb/any", "1g.20gb/any")})
    assert len(warm(env.ctl)) == 6


async def test_the_burst_floor_keeps_the_bursts_within_a_create_time_warm(env):
    """warm_burst_q: a key whose arrivals come in bursts faster than a slice can be carved keeps the burst's
    quantile warm even when the step forecast asks for nothing; the create time is measured from the pool's
    own warm slices unless configured."""
    import collections
    import dataclasses
    key = "1g.10gb/any"
    env.orch.s = dataclasses.replace(env.orch.s, warm_burst_q=1.0, warm_create_s=10.0, warm_burst_windows=1.0)
    bursts = [b + d for b in (0.0, 100.0, 200.0) for d in (0.0, 1.0, 2.0)] + [300.0, 400.0]
    env.orch.windows.arrivals[key] = collections.deque((x,) for x in bursts)
    assert env.orch.burst_floor() == {key: 3}
    seen: list[tuple] = []
    env.ctl.recorder = SimpleNamespace(emit=lambda *a, **k: seen.append(a))
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [0.0], step=60)})
    assert len(warm(env.ctl)) == 3
    assert any(a[3] == "WarmSlicesCreated" and "burst high 3 within a create" in a[4] for a in seen), seen
    # off: the forecast alone decides
    env.orch.s = dataclasses.replace(env.orch.s, warm_burst_q=0.0)
    assert env.orch.burst_floor() == {}
    # measured create time: the median of the warm slices' create-to-ready times
    env.orch.s = dataclasses.replace(env.orch.s, warm_burst_q=1.0, warm_create_s=0.0)
    assert env.orch.pool.create_time_s() == 10.0            # nothing READY yet: the default
    for i, s in enumerate(sorted(warm(env.ctl), key=lambda s: s.id)):
        ns = t.Slice()
        ns.CopyFrom(s)
        ns.state = t.SLICE_STATE_READY
        ns.updated_at.FromNanoseconds(s.created_at.ToNanoseconds() + int((1.5 + i) * 1e9))   # 1.5, 2.5, 3.5 s
        env.ctl.fleet.put_slice(ns)
    assert env.orch.pool.create_time_s() == pytest.approx(2.5)
    assert env.orch.burst_floor() == {key: 3}               # bursts of 3 within 2.5 s too
    env.orch.s = dataclasses.replace(env.orch.s, warm_create_s=60.0, warm_burst_windows=2.0)
    assert env.orch.burst_floor() == {key: 6}               # within 120 s: 100..102 and 200..202


async def test_allocate_claims_a_ready_warm_slice_as_a_fresh_one(env):
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [1.0], step=60)})
    (w,) = warm(env.ctl)
    req = validate(t.SliceSpec(tenant="acme", mig_profile="1g.10gb", labels={"app": "nb"}, priority=3))
    # still being carved: not claimed (scheduled as usual instead)
    _, fresh = await env.ctl.allocate(req, no_wait=True)
    assert fresh[0].id != w.id
    ready_all(env.ctl)
    _, got = await env.ctl.allocate(req)
    s = got[0]
    assert s.id == w.id and s.state == t.SLICE_STATE_READY
    assert s.tenant == "acme" and dict(s.labels) == {"app": "nb"} and s.priority == 3
    assert s.allocation_id != w.allocation_id and s.created_at.ToNanoseconds() > w.created_at.ToNanoseconds()
    assert not warm(env.ctl) and env.ctl.warm.claims == 1
    assert env.ctl.fleet.usage["acme"][0] == 2                 # now counted against the tenant


async def test_a_warm_slice_chosen_for_release_is_never_claimed_while_an_earlier_one_is_released(env):
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [2.0], step=60)})
    ready_all(env.ctl)
    first, second = sorted(warm(env.ctl), key=lambda s: s.id)
    real_release, claimed = env.ctl.release, []

    async def release_then_allocate(sid, **kw):     # an Allocate arrives while the first release awaits
        out = await real_release(sid, **kw)
        if sid == first.id:
            _, got = await env.ctl.allocate(validate(t.SliceSpec(tenant="acme", mig_profile="1g.10gb")),
                                            no_wait=True)
            claimed.append(got[0].id)
        return out
    env.ctl.release = release_then_allocate
    gone = await env.ctl.warm.release_ids([first.id, second.id], "test")
    assert claimed and claimed[0] != second.id          # the second was withheld from the claim
    assert gone == [first.id, second.id] and not env.ctl.warm.yielding
    assert env.ctl.fleet.slices[claimed[0]].tenant == "acme"


async def test_claim_respects_quota_and_model(env):
    fw = profiles.build("default", args={"TenantQuota": {"tenants": {"tiny": {"max_slices": 0}}}})
    env.ctl.scheduler = fw
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [1.0], step=60)})
    ready_all(env.ctl)
    with pytest.raises(errors.ResourceExhausted):
        await env.ctl.allocate(validate(t.SliceSpec(tenant="tiny", mig_profile="1g.10gb")), no_wait=True)
    with pytest.raises(errors.MeshError):       # another model: not this warm slice
        await env.ctl.allocate(validate(t.SliceSpec(tenant="a", mig_profile="1g.10gb", gpu_model="A100-80GB")),
                               no_wait=True)
    assert len(warm(env.ctl)) == 1


async def test_claim_counts_the_memory_the_warm_slice_holds(env):
    # a MIG profile names no memory: the pre-filter let a tenant capped at 5 GiB claim a 10 GiB warm slice
    fw = profiles.build("default", args={"TenantQuota": {"tenants": {"small": {"max_memory_bytes": 5 * GiB}}}})
    env.ctl.scheduler = fw
    key = "1g.10gb/any"
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [1.0], step=60)})
    ready_all(env.ctl)
    with pytest.raises(errors.ResourceExhausted, match="max_memory_bytes"):
        await env.ctl.allocate(validate(t.SliceSpec(tenant="small", mig_profile="1g.10gb")), no_wait=True)
    assert len(warm(env.ctl)) == 1 and env.ctl.warm.claims == 0


async def test_a_real_request_takes_the_space_of_warm_slices(env):
    key = "1g.10gb/any"
    env.orch.s = Settings(warm=True, warm_max_per_key=14, warm_max_total=14)
    env.orch.windows.on_request(key)
    await env.orch.warm_pass({key: fc("fleet", key, "requests", [14.0], step=60)})
    assert len(warm(env.ctl)) == 14                 # both GPUs full of warm 1g.10gb
    _, got = await env.ctl.allocate(validate(t.SliceSpec(tenant="acme", mig_profile="7g.80gb")), no_wait=True)
    g = (got[0].node, got[0].gpu_index)
    released = [s for s in env.ctl.fleet.slices.values() if s.state == t.SLICE_STATE_RELEASING]
    assert len(released) == 7 and all((s.node, s.gpu_index) == g for s in released)
    assert len(warm(env.ctl)) == 7                  # the other GPU's stay


# -- rule 2: moves before the hot spot ---------------------------------------------------------

def running(env, node, wid, priority=0, profile="3g.40gb"):
    s = t.Slice(id=f"s-{wid}", node=node, gpu_index=0, tenant="acme", isolation=t.ISOLATION_MIG, profile=profile,
                memory_bytes=40 * GiB, state=t.SLICE_STATE_READY, priority=priority, allocation_id=f"a-{wid}")
    s.placement.start, s.placement.size = (0, 4) if wid.endswith("0") else (4, 4)
    env.ctl.fleet.put_slice(s)
    env.wm.workloads[wid] = t.Workload(id=wid, slice_id=s.id, node=node, tenant="acme",
                                       state=t.WORKLOAD_STATE_RUNNING)


@pytest.mark.parametrize("metric, points, hi, moved", [
    ("memory_fraction", [0.80] * 5, [0.84] * 5, False),             # high, not critical
    ("memory_fraction", [0.84] * 5, [0.84, 0.86, 0.9, 0.95, 0.97], True),   # the interval crosses: move
    ("memory_fraction", [0.99] * 5, [0.99] * 5, True),
    ("temperature", [70, 72, 74, 76, 78], [72, 75, 78, 81, 84], False),    # stays below 85 C
    ("temperature", [78, 80, 82, 83, 84], [80, 83, 85.5, 87, 88], True),   # the upper edge passes 85 C
])
async def test_moves_judge_the_interval(env, metric, points, hi, moved):
    running(env, "n1", "w-low0", priority=0)
    running(env, "n1", "w-high4", priority=5)
    fs = {("n1/0", metric): fc("gpu", "n1/0", metric, hi, points),
          ("n2/0", metric): fc("gpu", "n2/0", metric, [0.1 if metric == "memory_fraction" else 40] * 5)}
    decisions = env.orch.moves.decide(fs, (50.0, 70.0, 85.0), (65.0, 80.0, 85.0), set())
    done = await env.orch.moves.act(decisions)
    if moved:
        assert done == 1 and env.mig.calls[0][:3] == ("migrate", "w-low0", "n2")   # lowest priority, to n2
        assert "forecast" in env.mig.calls[0][3] and "benefit" in env.mig.calls[0][3]
    else:
        assert done == 0 and not env.mig.calls


async def test_moves_cooldown_budget_and_no_target(env):
    running(env, "n1", "w-a0")
    running(env, "n1", "w-b4")
    hot = {("n1/0", "temperature"): fc("gpu", "n1/0", "temperature", [90] * 5),
           ("n2/0", "temperature"): fc("gpu", "n2/0", "temperature", [40] * 5)}
    th = ((50.0, 70.0, 85.0), (65.0, 80.0, 85.0))
    assert await env.orch.moves.act(env.orch.moves.decide(hot, *th, set())) == 1
    assert await env.orch.moves.act(env.orch.moves.decide(hot, *th, set())) == 0      # cooldown of n1/0
    env.mig.calls.clear()
    both_hot = dict(hot)
    both_hot[("n2/0", "temperature")] = fc("gpu", "n2/0", "temperature", [83] * 5)   # above high (80 C)
    env.orch.moves.ledger = type(env.orch.moves.ledger)()
    assert await env.orch.moves.act(env.orch.moves.decide(both_hot, *th, set())) == 0
    # a model replica's slice is never moved by the orchestrator
    assert env.orch.moves.decide(hot, *th, {"s-w-a0", "s-w-b4"}) == []


# -- rule 3: grow before the need ----------------------------------------------------------------

@pytest.mark.parametrize("labels, hi_gib, want", [
    ({}, 30, None),                                                        # not opted in
    ({"gpumesh.io/autoresize": "true"}, 30, 33 * GiB),                     # grow to hi * 1.1, whole GiB
    ({"gpumesh.io/autoresize": "true", "gpumesh.io/autoresize-max-gib": "25"}, 30, 25 * GiB),
    ({"gpumesh.io/autoresize": "true"}, 16, None),                         # fits; 16 * 1.1 * 1.3 >= 20: kept
    ({"gpumesh.io/autoresize": "true"}, 5, 6 * GiB),                       # shrink with headroom
])
async def test_resize_table(env, labels, hi_gib, want):
    s = t.Slice(id="s-r", node="n1", gpu_index=0, tenant="acme", isolation=t.ISOLATION_MPS, memory_bytes=20 * GiB,
                compute_share=0.2, state=t.SLICE_STATE_READY, labels=labels, allocation_id="a-r")
    env.ctl.fleet.put_slice(s)
    await env.orch.resizes.act(env.orch.resizes.decide({"s-r": fc("slice", "s-r", "memory_used", [hi_gib * GiB] * 3)}))
    await env.orch.resizes.settle()
    assert env.mig.calls == ([] if want is None else [("resize", "s-r", want)])


# -- the forecasts the passes read ----------------------------------------------------------------

def test_demand_series_counts_requests_per_step_with_zeros():
    now = [1000.0]
    w = Windows(3600, clock=lambda: now[0])
    for ts in (1000.5, 1001.2, 1003.9, 1003.95):
        now[0] = ts
        w.on_request("k")
    (job,) = jobs_for_demand(w, 1.0, 2.0, 0.9, 1005.5)
    assert job.values == (1.0, 1.0, 0.0, 2.0, 0.0) and job.times[-1] == 1005.0


def test_gpu_forecast_sees_a_rising_temperature_before_it_crosses():
    w = Windows(3600)
    g = SimpleNamespace(node="n1", index=0, memory_bytes=80 * GiB)
    for i in range(150):
        temp = 40.0 if i < 60 else 95 - 55 * math.exp(-(i - 60) / 60)
        r = t.GpuTelemetry(index=0, memory_used_bytes=GiB, memory_total_bytes=80 * GiB, temperature_c=temp)
        r.at.FromNanoseconds(int((1000 + i) * 1e9))
        w.on_gpu(g, r)
    fs = {(f.name, f.metric): f for f in fit_jobs(jobs_for_gpus(w, 1.0, 15.0, 0.9)) if f}
    temp = fs[("n1/0", "temperature")]
    assert temp.last < 85 and temp.peak_hi > temp.last
    assert fs[("n1/0", "memory_fraction")].model == "constant"


def test_short_history_gives_no_forecast():
    w = Windows(3600)
    w.on_request("k")
    assert fit_jobs(jobs_for_demand(w, 1.0, 5.0, 0.9, w.first_arrival["k"] + 3)) == [None]


async def test_process_fitter_fits_off_the_loop_and_survives_a_dead_worker():
    from controlplane.controllers.orchforecast import Job, ProcessFitter
    import os
    import signal
    times = tuple(float(i) for i in range(1, 61))
    values = tuple(float(i % 7) for i in range(60))
    job = Job("gpu", "n1/0", "temperature", 1.0, 3.0, 0.9, times, values)
    f = ProcessFitter(1)
    try:
        (got,) = await f([job])
        assert got is not None and len(got.hi) == 3
        for pid in list(f.pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception):
            await f([job])
        (again,) = await f([job])
        assert again is not None
    finally:
        f.close()


async def test_a_new_leader_starts_from_the_history_store(tmp_path, env):
    from controlplane.forecast.history import HistoryStore
    from controlplane.forecast.recorder import HistoryRecorder
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "h.db")))
    now = env.orch.clock()
    rows = []
    for i in range(200):
        at = now - 200 + i
        rows += [("gpu", "n1/0", "temperature", "", at, 40.0 + i * 0.1), ("gpu", "n1/0", "memory_used", "", at, 8 * GiB),
                 ("gpu", "n1/0", "memory_total", "", at, 80 * GiB)]
    for m in range(40):
        rows.append(("fleet", "profile/1g.10gb", "requests", "", (int(now // 60) - 40 + m) * 60.0, 3))
    rec.store.write(rows)
    try:
        await env.orch.seed(rec)
        w = env.orch.windows
        assert len(w.gpu["n1/0"]) == 200 and w.gpu["n1/0"][-1][1] == pytest.approx(0.1)
        assert len(w.arrivals["1g.10gb/any"]) == 120
        fs = await env.orch.forecast()
        assert ("gpu", "n1/0", "temperature") in fs and ("fleet", "1g.10gb/any", "requests") in fs
    finally:
        await rec.stop()

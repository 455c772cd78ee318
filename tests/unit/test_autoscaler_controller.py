"""The autoscaler controller over an in-memory deployment manager (the real one needs etcd: see
tests/integration/test_autoscaling.py): the sample it builds from the replicas' load signals and counters,
the replicas it sets and the events and status it writes, the cost ceiling's Warning, and Wake."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from controlplane.controllers import autoscale_signals, autoscale_variants
from controlplane.controllers.autoscaler import AutoscalerController
from controlplane.serving import replicacost
from controlplane.serving.scaling import ScalingOps
from controlplane.state.fleet import GpuState
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as T
from mesh import errors, gpumodels, scalingpolicy
from mesh.cost import PriceTable

READY = D.REPLICA_STATE_READY


class Manager:
    """What the controller and ScalingOps use of controlplane/serving/deployments.DeploymentManager."""

    def __init__(self, d: D.Deployment, replicas: list[D.Replica]) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.by_name = {d.spec.name: replicas}          # each deployment's replicas
        self.store = SimpleNamespace(deployments={d.spec.name: d}, loads={}, get=self._get, full=self._get,
                                     replicas_of=lambda n: list(self.by_name.get(n, [])))
        self.replicas = replicas
        self.needs = {}                                 # variant -> VRAM need (default 2 GiB)
        self.ctl = SimpleNamespace(fleet=SimpleNamespace(slices={}, nodes={}))
        self.registry = SimpleNamespace(gpu_models=lambda: [gpumodels.get_model("H100-80GB")],
                                        get=lambda name: None)
        self.prices = PriceTable.parse(["H100-80GB=2.40"])
        self.scaling = ScalingOps(self)
        self.writes = 0

    def _get(self, name):
        if name not in self.store.deployments:
            raise errors.NotFound(f"no deployment {name!r}")
        return self.store.deployments[name]

    def _resolve(self, spec):
        # a 2 GiB replica: a 1g.10gb MIG slice, 1/8 of an H100 = $0.30/h, unless the test sizes the variant
        return None, self.needs.get(spec.variant, 2 << 30)

    async def create(self, spec):          # what DeploymentManager.create keeps of a companion
        d = D.Deployment(spec=spec, generation=1)
        self.store.deployments[spec.name] = d
        self.by_name.setdefault(spec.name, [])
        return d

    async def scale(self, name, replicas):
        return await self._change(name, 0, lambda d: setattr(d.spec, "replicas", replicas))

    async def delete(self, name):
        return self.store.deployments.pop(self._get(name).spec.name)

    async def _change(self, name, generation, edit):
        d = D.Deployment()
        d.CopyFrom(self._get(name))
        edit(d)
        d.generation += 1
        self.store.deployments[name] = d
        self.writes += 1
        return d

    async def write_autoscaler_status(self, name, status):
        self.store.deployments[name].status.autoscaler.CopyFrom(status)
        self.writes += 1

    def _event_as(self, name, type, reason, message, tenant, source):
        self.events.append((type, reason, message))

    def _event(self, name, type, reason, message, tenant=""):
        self.events.append((type, reason, message))


def replica(i: int, running: float = 0, waiting: float = 0, total: float = 0, at: float = 0) -> tuple:
    r = D.Replica(id=f"r-{i}", deployment="chat", state=READY, workload_id=f"w-{i}", endpoint="127.0.0.1:1")
    load = T.BackendLoad(workload_id=f"w-{i}", scraped=True, requests_running=running, requests_waiting=waiting,
                         requests_total=total, kv_cache_usage=0.25, ttft_seconds=0.4)
    load.at.FromNanoseconds(int(at * 1e9))
    return r, load


def deployment(replicas: int, **policy) -> D.Deployment:
    return D.Deployment(spec=D.DeploymentSpec(name="chat", model="smol", replicas=replicas, tenant="team-a",
                                              scaling=scalingpolicy.build(**policy)))


def test_the_sample_sums_in_flight_and_queue_and_rates_the_counters():
    counters = autoscale_signals.Counters()
    (r1, l1), (r2, l2) = replica(1, 1, 2, total=10, at=100), replica(2, 1, 0, total=5, at=100)
    s = autoscale_signals.sample(100, [r1, r2], {"r-1": l1, "r-2": l2}, counters)
    assert (s.in_flight, s.queue, s.ready, s.request_rate) == (2, 2, 2, 0)     # no previous reading: no rate
    assert s.kv_cache == pytest.approx(0.25) and s.ttft_ms == pytest.approx(400)
    (r1, l1), (r2, l2) = replica(1, total=30, at=110), replica(2, total=15, at=110)
    s = autoscale_signals.sample(110, [r1, r2], {"r-1": l1, "r-2": l2}, counters)
    assert s.request_rate == pytest.approx(3.0)                                  # 30 requests over 10 s
    stale = T.BackendLoad(workload_id="w-old", scraped=True, requests_running=9)  # an earlier workload's reading
    s = autoscale_signals.sample(120, [r1], {"r-1": stale}, counters)
    assert s.in_flight == 0 and s.ready == 1
    assert autoscale_signals.counts([r1, D.Replica(state=D.REPLICA_STATE_PENDING),
                                     D.Replica(state=D.REPLICA_STATE_TERMINATING)]) == (1, 1)


def test_cold_start_from_the_replicas_then_the_registry_then_the_default():
    r = D.Replica(id="r-1")
    r.created_at.FromSeconds(100)
    r.ready_at.FromSeconds(142)
    assert autoscale_signals.cold_start([r], None, 30) == (42, "replicas")
    from gpumesh.v1 import model_service_pb2 as M
    v = M.Variant(name="q4")
    v.measured["H100-80GB"].load_seconds = 4.5
    assert autoscale_signals.cold_start([], v, 30) == (4.5 + autoscale_signals.SLICE_START_S, "registry")
    assert autoscale_signals.cold_start([], None, 30) == (30, "default")


async def test_a_burst_scales_up_with_an_event_and_the_status():
    reps = [replica(1, running=1, waiting=7, at=1)]
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, stable_window_s=10, panic_window_s=2,
                            scale_down_delay_s=0), [reps[0][0]])
    dm.store.loads["r-1"] = reps[0][1]
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    decision = await ctl.one("chat")
    d = dm.store.deployments["chat"]
    assert decision.desired == 4 and d.spec.replicas == 4            # 8 in flight + waiting at 2 per replica
    assert decision.mode == "panic" and d.status.autoscaler.desired == 4 and d.status.autoscaler.mode == "panic"
    assert d.status.autoscaler.HasField("last_scale_at")
    assert d.status.autoscaler.signals["queue"] == 7 and d.status.autoscaler.replica_cost_per_hour == pytest.approx(0.3)
    kind, reason, text = dm.events[-1]
    assert (kind, reason) == ("Normal", "Autoscaled") and "replicas 1 -> 4 (panic" in text and "queue=7" in text


async def test_the_cost_ceiling_stops_a_scale_up_and_warns_once():
    r, load = replica(1, running=1, waiting=7, at=1)
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, cost_ceiling_per_hour=0.65), [r])
    dm.store.loads["r-1"] = load
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "cost_ceiling"     # $0.65 / $0.30 = 2 replicas
    warnings = [e for e in dm.events if e[0] == "Warning"]
    assert len(warnings) == 1 and warnings[0][1] == "CostCeiling"
    assert "$0.65/h" in warnings[0][2] and "$0.3000/h each" in warnings[0][2] and "wants 4" in warnings[0][2]
    clock[0] += 2
    await ctl.one("chat")
    assert len([e for e in dm.events if e[0] == "Warning"]) == 1              # once per episode
    assert dm.store.deployments["chat"].status.autoscaler.bound_by == "cost_ceiling"


async def test_idle_scales_to_zero_and_wake_brings_one_back():
    r, load = replica(1, at=1)
    dm = Manager(deployment(1, max_replicas=2, target=2, scale_to_zero_after_s=5, stable_window_s=5,
                            panic_window_s=1, scale_down_delay_s=0), [r])
    dm.store.loads["r-1"] = load
    clock = [1000.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    assert (await ctl.one("chat")).desired == 1            # idle 0 s: within the grace
    clock[0] += 6
    decision = await ctl.one("chat")
    assert decision.desired == 0 and decision.mode == "idle"
    assert dm.store.deployments["chat"].spec.replicas == 0 and dm.events[-1][1] == "ScaledToZero"
    dm.replicas.clear()
    resp = await dm.scaling.wake("chat")
    assert resp.woke and resp.replicas == 1 and dm.events[-1][1] == "WokenFromZero"
    assert (await dm.scaling.wake("chat")).woke is False          # idempotent
    for _ in range(4):                                 # no replica READY yet: the held request is demand
        clock[0] += 3
        decision = await ctl.one("chat")
        assert decision.desired == 1 and dm.store.deployments["chat"].spec.replicas == 1
    r, load = replica(2, at=2)                         # READY: the request is served, the idle period starts
    dm.replicas.append(r)
    dm.store.loads["r-2"] = load
    clock[0] += 1
    assert (await ctl.one("chat")).desired == 1
    clock[0] += 6
    assert (await ctl.one("chat")).desired == 0


async def test_a_new_leader_still_counts_the_held_request_from_the_woken_status():
    r, load = replica(1, at=1)
    dm = Manager(deployment(0, max_replicas=2, target=2, scale_to_zero_after_s=5, stable_window_s=5,
                            panic_window_s=1, scale_down_delay_s=0), [])
    await dm.scaling.wake("chat")
    clock = [dm.store.deployments["chat"].status.autoscaler.woken_at.ToNanoseconds() / 1e9]
    dm.scaling.woken.clear()                          # the old leader's memory is gone with it
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0])
    for _ in range(4):                                # no replica READY yet: still not scaled away
        clock[0] += 3
        assert (await ctl.one("chat")).desired == 1 and dm.store.deployments["chat"].spec.replicas == 1


async def test_wake_needs_a_policy_that_scales_to_zero():
    r, _ = replica(1)
    dm = Manager(deployment(1, max_replicas=2, target=2), [r])
    with pytest.raises(errors.FailedPrecondition, match="scales to zero"):
        await dm.scaling.wake("chat")


async def test_a_predictive_policy_provisions_for_the_forecast_of_its_recorded_request_rate(tmp_path):
    """The controller records the request rate into the history store (real SQLite) and forecasts it with the
    forecasting service's code: on a rising rate, the forecast's upper quantile one lead time ahead, times the
    time in service it measures (Little's law), wants more replicas than the load now."""
    from controlplane.controllers import autoscale_forecast
    from controlplane.forecast.history import HistoryStore
    from controlplane.forecast.recorder import HistoryRecorder
    rec = HistoryRecorder(HistoryStore(str(tmp_path / "history.db")), clock=lambda: 0.0)
    try:
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0)
        assert value is None and "no samples" in note                        # nothing recorded yet: reactive
        for i in range(400):                                                 # rate rising 1 request/s per 100 s
            rec.add("deployment", "chat", "request_rate", i / 100, "team-a", at=1000.0 + i)
        await rec.flush()
        value, note = await autoscale_forecast.upper(rec, "chat", "request_rate", 20, 0.9, 1.0)
        assert value is not None and value > 399 / 100, note                 # above the last value: rising

        r, load = replica(1, running=10, waiting=0, total=0, at=1)           # 10 in flight now wants 2 of 8
        dm = Manager(deployment(1, min_replicas=1, max_replicas=64, target=8, predictive=True, lead_time_s=20,
                                scale_down_delay_s=0), [r])
        dm.store.loads["r-1"] = load
        clock = [1400.0]
        ctl = AutoscalerController(dm, dm.registry, history=rec, clock=lambda: clock[0], forecast_every=1)
        first = await ctl.one("chat")
        assert first.mode != "predictive"                                    # the fit runs in the background
        await ctl.states["chat"].forecasting
        clock[0] += 1
        _, load = replica(1, running=10, waiting=0, total=4, at=2)           # 4 requests finished in 1 s
        dm.store.loads["r-1"] = load
        decision = await ctl.one("chat")
        rate = ctl.states["chat"].forecast
        assert decision.mode == "predictive", decision.reason
        assert decision.signals["service_s"] == pytest.approx(20 / 4)        # Little's law: mean 10 in flight / 2 per s
        assert decision.signals["forecast_upper"] == pytest.approx(rate * 5.0, rel=1e-3)
        assert decision.desired == math.ceil(rate * 5.0 / 8) > 2
        status = dm.store.deployments["chat"].status.autoscaler
        assert status.signals["lead_time_s"] == 20 and status.signals["forecast_rate"] == pytest.approx(rate, rel=1e-3)
        assert {s[2] for s in rec.pending} >= {"request_rate", "demand_concurrency"}   # what it saw went to the history
    finally:
        await rec.stop()


# -- variant overflow (controlplane/controllers/autoscale_variants.py) --------------------------------------

GIB = 1 << 30


def fleet_with_free(dm: Manager, free_bytes: int) -> GpuState:
    """One schedulable node with one H100 shared by MPS (no MIG), `free_bytes` of its memory free."""
    model = gpumodels.get_model("H100-80GB")
    g = GpuState(node="n1", index=0, uuid="GPU-1", model=model, mig_enabled=False, memory_bytes=80 * GIB,
                 nvlink_domain=0)
    g.allocated_memory = 80 * GIB - free_bytes
    dm.ctl.fleet.nodes = {"n1": SimpleNamespace(schedulable=True, gpus=[g])}
    return g


def waiting(i: int, name: str = "chat") -> D.Replica:
    """A replica the actuator could not place (controlplane/serving/actuator.py allocate's message)."""
    return D.Replica(id=f"{name}-p{i}", deployment=name, state=D.REPLICA_STATE_PENDING,
                     message="no slice yet: no node has a GPU with room for 20.0 GiB")


def ready(i: int, name: str = "chat") -> D.Replica:
    return D.Replica(id=f"{name}-{i}", deployment=name, state=READY, slice_id=f"s-{name}-{i}", workload_id=f"w-{i}")


def overflow_setup(replicas: list[D.Replica], free_bytes: int, **policy) -> tuple[Manager, AutoscalerController]:
    d = deployment(len(replicas), variants=("bf16", "q4"), **policy)
    d.spec.variant = "bf16"
    dm = Manager(d, replicas)
    dm.needs = {"bf16": 20 * GIB, "q4": 2 * GIB}
    fleet_with_free(dm, free_bytes)
    dm.clock = [1000.0]
    return dm, AutoscalerController(dm, dm.registry, clock=lambda: dm.clock[0])


async def test_replicas_waiting_for_room_overflow_to_the_next_variant_that_fits():
    # 4 wanted (min = max = 4); 1 bf16 replica runs, 3 wait: 10 GiB free holds no 20 GiB bf16 but 5 q4s
    dm, ctl = overflow_setup([ready(1), waiting(1), waiting(2), waiting(3)], 10 * GIB, min_replicas=4,
                             max_replicas=4, target=2)
    decision = await ctl.one("chat")
    assert decision.desired == 4
    parent, comp = dm.store.deployments["chat"], dm.store.deployments.get("chat-q4")
    assert parent.spec.replicas == 1                      # held at what it placed: the waiting ones hold nothing
    assert comp is not None and comp.spec.replicas == 3 and comp.spec.variant == "q4"
    assert comp.spec.labels["gpumesh.overflow-of"] == "chat" and comp.spec.tenant == "team-a"
    assert comp.spec.model == "smol" and not comp.spec.HasField("scaling")   # the parent's controller scales it
    overflow = [e for e in dm.events if e[1] == "VariantOverflow"]
    assert len(overflow) == 1 and "variant q4 (chat-q4) 0 -> 3" in overflow[0][2]
    assert "3 replica(s) wait" in overflow[0][2]
    assert parent.status.autoscaler.desired == 4 and parent.status.autoscaler.signals["overflow_replicas"] == 3
    assert any(e[1] == "Autoscaled" and "replicas 4 -> 1 (of 4; the rest as its variant companion)" in e[2]
               for e in dm.events)


async def test_no_overflow_when_no_variant_fits_or_nothing_waits():
    dm, ctl = overflow_setup([ready(1), waiting(1)], 1 * GIB, min_replicas=2, max_replicas=2, target=2)
    await ctl.one("chat")                                 # 1 GiB free: no q4 fits either
    assert "chat-q4" not in dm.store.deployments and dm.store.deployments["chat"].spec.replicas == 2
    dm, ctl = overflow_setup([ready(1), ready(2)], 10 * GIB, min_replicas=2, max_replicas=2, target=2)
    await ctl.one("chat")                                 # all placed: nothing to overflow
    assert "chat-q4" not in dm.store.deployments and not [e for e in dm.events if e[1] == "VariantOverflow"]


async def test_the_companion_goes_back_to_zero_when_the_variant_has_room_again():
    dm, ctl = overflow_setup([ready(1), waiting(1), waiting(2), waiting(3)], 10 * GIB, min_replicas=4,
                             max_replicas=4, target=2)
    await ctl.one("chat")
    dm.by_name["chat"][:] = [ready(1)]                    # the deployment controller dropped the waiting ones
    dm.by_name["chat-q4"] = [ready(i, "chat-q4") for i in range(3)]
    await ctl.one("chat")                                 # still no room for bf16: nothing changes
    assert dm.store.deployments["chat"].spec.replicas == 1 and dm.store.deployments["chat-q4"].spec.replicas == 3
    fleet_with_free(dm, 70 * GIB)                         # room for 3 bf16 again; max 4 leaves no surge
    steps = []
    for parent_now in ([ready(1)],                                     # swap one: q4 3 -> 2, bf16 1 -> 2
                       [ready(1), D.Replica(id="chat-s", deployment="chat", slice_id="s-x",
                                            state=D.REPLICA_STATE_STARTING)],   # the new one not READY: wait
                       [ready(1), ready(2)],                           # READY: swap the next
                       [ready(1), ready(2), ready(3)]):                 # and the last
        dm.by_name["chat"][:] = parent_now
        dm.by_name["chat-q4"] = [ready(i, "chat-q4") for i in range(dm.store.deployments["chat-q4"].spec.replicas)]
        await ctl.one("chat")
        parent, comp = dm.store.deployments["chat"].spec.replicas, dm.store.deployments["chat-q4"].spec.replicas
        assert parent + comp <= 4                                      # max counts both, at every step
        steps.append((parent, comp))
    assert steps == [(2, 2), (2, 2), (3, 1), (4, 0)]
    assert "1 -> 0" in [e for e in dm.events if e[1] == "VariantOverflow"][-1][2]
    d = dm.store.deployments["chat"]                      # the policy drops its variants: the companion goes
    d.spec.scaling.ClearField("variants")
    await ctl.run_once()
    assert "chat-q4" not in dm.store.deployments


async def test_max_replicas_counts_the_deployment_and_its_companion():
    # 3 bf16 placed (1 READY, 2 starting with a slice), 1 waiting: 4 wanted of max 4
    starting = [D.Replica(id=f"chat-s{i}", deployment="chat", slice_id=f"s{i}", state=D.REPLICA_STATE_STARTING)
                for i in range(2)]
    dm, ctl = overflow_setup([ready(1), *starting, waiting(1)], 10 * GIB, min_replicas=4, max_replicas=4, target=2)
    await ctl.one("chat")
    parent, comp = dm.store.deployments["chat"], dm.store.deployments["chat-q4"]
    assert parent.spec.replicas == 3 and comp.spec.replicas == 1     # 3 short of READY, but at most 4 in all
    assert parent.spec.replicas + comp.spec.replicas == 4
    assert "bound by max" in [e for e in dm.events if e[1] == "VariantOverflow"][-1][2]


async def test_the_cost_ceiling_counts_the_companions_replicas():
    # the q4 replica costs $0.30/h; bf16's slice (3g.40gb of an H100) more: the ceiling leaves room for 1 q4
    bf16 = replicacost.cheapest(20 * GIB, 0, [gpumodels.get_model("H100-80GB")], PriceTable.parse(["H100-80GB=2.40"]))
    ceiling = 2 * bf16 + 0.45
    r1, load = replica(1, running=2, waiting=14, at=1)               # 16 waiting at 2 per replica: 8 wanted
    r1.slice_id = "s-1"
    dm, ctl = overflow_setup([r1, ready(2), waiting(1), waiting(2)], 40 * GIB, min_replicas=1, max_replicas=8,
                             target=2, cost_ceiling_per_hour=ceiling)
    dm.store.loads["r-1"] = load
    decision = await ctl.one("chat")
    assert decision.desired == 2 and decision.bound_by == "cost_ceiling"   # the ceiling at bf16's price
    assert "chat-q4" not in dm.store.deployments          # 2 placed: nothing left to overflow within the ceiling
    from controlplane.controllers.autoscale_variants import split
    sp = split(4, max_replicas=8, ceiling=2.0, parent_ready=1, parent_placed=1, waiting=3, companion_now=0,
               parent_fits=False, companion_fit=10, parent_cost=0.5, companion_cost=0.6)
    assert (sp.parent, sp.companion, sp.bound_by) == (1, 2, "cost_ceiling")   # 0.5 + 2 x 0.6 <= 2.0 < 0.5 + 3 x 0.6
    assert sp.parent * 0.5 + sp.companion * 0.6 <= 2.0
    sp = split(4, max_replicas=3, ceiling=0, parent_ready=1, parent_placed=1, waiting=3, companion_now=0,
               parent_fits=False, companion_fit=10, parent_cost=0.5, companion_cost=0.6)
    assert (sp.parent, sp.companion, sp.bound_by) == (1, 2, "max")


def test_companion_names_are_valid_deployment_names():
    from controlplane.controllers.autoscale_variants import companion_name
    from controlplane.serving.deployspec import check_name
    assert companion_name("chat", "q4_k_m") == "chat-q4_k_m"
    assert check_name(companion_name("x" * 63, "Q4 K/M" * 10))


def test_the_companion_spec_drops_what_its_variant_does_not_take():
    from gpumesh.v1 import model_service_pb2 as M
    parent = deployment(2, max_replicas=4, target=2, variants=("bf16", "q4")).spec
    parent.variant, parent.pool, parent.labels["team"] = "bf16", "gpus", "a"
    parent.backend.device, parent.backend.context = "cuda", 32768
    spec = autoscale_variants.companion_spec(parent, "q4", 3, M.Variant(name="q4", backend=M.BACKEND_LLAMA_CPP,
                                                                        max_context=8192))
    assert (spec.name, spec.variant, spec.replicas, spec.pool, spec.tenant) == ("chat-q4", "q4", 3, "gpus", "team-a")
    assert spec.backend.device == "" and spec.backend.context == 0 and not spec.HasField("scaling")
    assert dict(spec.labels) == {"team": "a", "gpumesh.overflow-of": "chat"}
    assert parent.backend.device == "cuda" and parent.HasField("scaling")          # the parent's spec untouched


async def test_a_swap_back_that_waits_again_backs_off():
    dm, ctl = overflow_setup([ready(1), waiting(1), waiting(2), waiting(3)], 10 * GIB, min_replicas=4,
                             max_replicas=4, target=2)
    await ctl.one("chat")
    dm.by_name["chat-q4"] = [ready(i, "chat-q4") for i in range(3)]
    dm.by_name["chat"][:] = [ready(1)]
    fleet_with_free(dm, 70 * GIB)                         # the estimate sees room for bf16
    await ctl.one("chat")
    assert (dm.store.deployments["chat"].spec.replicas, dm.store.deployments["chat-q4"].spec.replicas) == (2, 2)
    dm.by_name["chat"][:] = [ready(1), waiting(4)]        # ... but the scheduler placed none: back to q4
    dm.by_name["chat-q4"] = [ready(i, "chat-q4") for i in range(2)]
    dm.clock[0] += 2
    await ctl.one("chat")
    assert (dm.store.deployments["chat"].spec.replicas, dm.store.deployments["chat-q4"].spec.replicas) == (1, 3)
    dm.by_name["chat"][:] = [ready(1)]
    dm.by_name["chat-q4"] = [ready(i, "chat-q4") for i in range(3)]
    for _ in range(3):                                    # no new swap while the back-off lasts
        dm.clock[0] += 2
        await ctl.one("chat")
        assert (dm.store.deployments["chat"].spec.replicas, dm.store.deployments["chat-q4"].spec.replicas) == (1, 3)
    dm.clock[0] += autoscale_variants.RETRY_S
    await ctl.one("chat")
    assert (dm.store.deployments["chat"].spec.replicas, dm.store.deployments["chat-q4"].spec.replicas) == (2, 2)


def test_the_fit_estimate_follows_how_the_gpu_is_shared():
    model = gpumodels.get_model("H100-80GB")
    mig = GpuState(node="n1", index=0, uuid="GPU-1", model=model, mig_enabled=True, memory_bytes=80 * GIB,
                   nvlink_domain=0)
    fleet = SimpleNamespace(nodes={"n1": SimpleNamespace(schedulable=True, gpus=[mig])})
    assert autoscale_variants.fit_count(2 * GIB, fleet) == 7          # seven 1g.10gb placements on an empty H100
    assert autoscale_variants.fit_count(2 * GIB, fleet, isolation=2) == 0   # MPS asked: a MIG GPU holds none
    mig.health = "unhealthy"
    assert autoscale_variants.fit_count(2 * GIB, fleet) == 0
    mps = GpuState(node="n1", index=1, uuid="GPU-2", model=model, mig_enabled=False, memory_bytes=80 * GIB,
                   nvlink_domain=0)
    mps.allocated_memory = 75 * GIB
    fleet.nodes["n1"].gpus.append(mps)
    assert autoscale_variants.fit_count(2 * GIB, fleet) == 2 and autoscale_variants.fit_count(2 * GIB, fleet, 1) == 0
    fleet.nodes["n1"].schedulable = False
    assert autoscale_variants.fit_count(2 * GIB, fleet) == 0


# -- a predictive policy's figures through quiet windows and a new leader; one deployment's failure -----------

def _forecast_rate(monkeypatch, rates: dict[str, float]) -> None:
    from controlplane.controllers import autoscale_forecast

    async def upper(history, name, series, lead_s, quantile, step_floor):
        return rates.get(name), "table"
    monkeypatch.setattr(autoscale_forecast, "upper", upper)


async def _pass(ctl: AutoscalerController, name: str = "chat"):
    """One pass of the controller over ``name``, the forecast's fit it started done."""
    decision = await ctl.one(name)
    st = ctl.states[name]
    if st.forecasting is not None:
        await st.forecasting
    return decision


def _predictive_deployment(**kw) -> D.Deployment:
    return deployment(1, min_replicas=1, max_replicas=8, target=1, predictive=True, stable_window_s=10,
                      panic_window_s=2, scale_down_delay_s=0, **kw)


async def test_the_forecast_floor_outlives_a_quiet_window(monkeypatch):
    """The time in service measured while requests came (4 in flight at 1 request/s: 4 s) still sizes the
    floor after a stable window with no request: the forecast of 1.5 requests/s keeps 6 replicas warm."""
    _forecast_rate(monkeypatch, {"chat": 1.5})
    r, _ = replica(1)
    dm = Manager(_predictive_deployment(), [r])
    clock = [0.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=0)
    clock[0], total = 1.0, 0.0
    dm.store.loads["r-1"] = replica(1, total=total, at=1)[1]     # the counter's first reading
    await _pass(ctl)
    for t in range(2, 6):                                     # 1 request/s, 4 in flight
        clock[0], total = float(t), total + 1
        dm.store.loads["r-1"] = replica(1, running=4, total=total, at=t)[1]
        d = await _pass(ctl)
    assert d.signals["service_s"] == pytest.approx(4.0) and d.signals["forecast_upper"] == pytest.approx(6.0)
    for t in range(5, 41):                                    # 36 s with no request, past the 10 s window
        clock[0] = float(t)
        dm.store.loads["r-1"] = replica(1, running=0, total=total, at=t)[1]
        d = await _pass(ctl)
        assert d.desired == 6 and d.signals["forecast_upper"] == pytest.approx(6.0), (t, d.reason)
    assert d.mode == "predictive" and ctl.states["chat"].figures_from == "measured"


async def test_a_new_leader_sizes_the_floor_with_the_figures_on_the_status_then_the_registry(monkeypatch):
    """A new leader has seen no request: it takes the time in service the previous leader wrote on the
    status; without one, the registry's `model bench` figures of the variant (TTFT + max_tokens / decode
    speed); without those, no floor."""
    from gpumesh.v1 import model_service_pb2 as M
    _forecast_rate(monkeypatch, {"chat": 1.0})

    async def first_decision(d: D.Deployment, variant=None):
        r, load = replica(1, running=0, total=0, at=1)
        dm = Manager(d, [r])
        dm.store.loads["r-1"] = load
        dm._resolve = lambda spec: (variant, 2 << 30)
        ctl = AutoscalerController(dm, dm.registry, clock=lambda: 100.0, forecast_every=0)
        await _pass(ctl)                                      # the first pass starts the fit
        return await _pass(ctl)

    d = _predictive_deployment()
    d.status.autoscaler.signals["service_s"] = 5.0
    d.status.autoscaler.signals["ttft_free_s"] = 0.25
    got = await first_decision(d)
    assert got.signals["forecast_upper"] == pytest.approx(5.0) and got.desired == 5 and got.mode == "predictive"

    v = M.Variant(name="q4")
    v.measured["H100-80GB"].CopyFrom(M.Measurement(tokens_per_second=20, max_tokens=64, ttft_seconds=0.3))
    got = await first_decision(_predictive_deployment(), v)
    assert got.signals["service_s"] == pytest.approx(0.3 + 64 / 20) and got.desired == 4     # 3.5 s: 3.5 wants 4
    assert got.signals["ttft_free_s"] == pytest.approx(0.3)

    got = await first_decision(_predictive_deployment(), M.Variant(name="q4"))
    assert "forecast_upper" not in got.signals and got.desired == 1


async def test_one_deployments_failure_does_not_stop_the_others(monkeypatch):
    """A deployment whose decision fails (an infinite forecast rate: the sizing code refuses it) is logged,
    counted and warned about once; the deployments after it are still decided on every pass."""
    from prometheus_client import REGISTRY
    _forecast_rate(monkeypatch, {"a-bad": math.inf})
    busy, load = replica(1, running=1, waiting=7, at=1)
    dm = Manager(deployment(1, min_replicas=1, max_replicas=4, target=2, stable_window_s=10, panic_window_s=2,
                            scale_down_delay_s=0), [busy])
    dm.store.loads["r-1"] = load
    bad = _predictive_deployment(slo_ttft_ms=5000)
    bad.spec.name = "a-bad"
    bad.status.autoscaler.signals["service_s"] = 4.0         # figures to size with (a previous leader's)
    r2 = D.Replica(id="r-2", deployment="a-bad", state=READY, workload_id="w-2")
    dm.store.deployments["a-bad"], dm.by_name["a-bad"] = bad, [r2]
    dm.store.loads["r-2"] = replica(2, at=1)[1]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: 100.0, forecast_every=0)
    before = REGISTRY.get_sample_value("gpumesh_autoscaler_errors_total", {"deployment": "a-bad"}) or 0.0
    for _ in range(3):
        await ctl.run_once()
        fit = ctl.states["a-bad"].forecasting
        if fit is not None:
            await fit
    assert dm.store.deployments["chat"].spec.replicas == 4                # decided behind the failing one
    after = REGISTRY.get_sample_value("gpumesh_autoscaler_errors_total", {"deployment": "a-bad"})
    assert after - before == 2                                            # passes 2 and 3 (pass 1 had no forecast)
    warnings = [e for e in dm.events if e[1] == "AutoscalerError"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning" and "rate inf" in warnings[0][2]
    assert "a-bad" in ctl.failing

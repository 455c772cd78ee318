"""The autoscaler's variant overflow (controlplane/controllers/autoscale_variants.py) over the in-memory
deployment manager of test_autoscaler_controller.py: replicas waiting for room overflow to a companion
deployment of the next variant that fits, which goes back to zero when the variant has room again; the
companion counts against max_replicas and the cost ceiling."""

from __future__ import annotations

from types import SimpleNamespace

from controlplane.controllers import autoscale_variants
from controlplane.controllers.autoscaler import AutoscalerController
from controlplane.serving import replicacost
from controlplane.state.fleet import GpuState
from gpumesh.v1 import deployment_service_pb2 as D
from mesh import gpumodels
from mesh.cost import PriceTable
from tests.unit.test_autoscaler_controller import READY, Manager, deployment, replica

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


def test_long_parents_cut_to_one_prefix_get_companions_of_their_own():
    """Two parents of 63 characters that differ only past the cut got one companion name: the second one's
    companion was refused (its name taken) for as long as both overflowed. A name that loses something ends in
    a hash of the full pair; one that loses nothing stays `<parent>-<variant>`."""
    from controlplane.controllers.autoscale_variants import companion_name
    from controlplane.serving.deployspec import check_name
    a, b = "chat-" + "x" * 57 + "a", "chat-" + "x" * 57 + "b"
    names = {companion_name(p, v) for p in (a, b, "x" * 40) for v in ("q4_k_m", "Q4 K/M", "Q4/K M", "q" * 40)}
    assert len(names) == 12
    for n in names:
        assert check_name(n) and len(n) <= 63
    assert companion_name(a, "q4_k_m") == companion_name(a, "q4_k_m")     # the same pair: the same name
    assert companion_name(a, "q4_k_m").startswith("chat-xxx") and "-q4_k_m-" in companion_name(a, "q4_k_m")
    assert companion_name("x" * 40, "q4_k_m") == "x" * 40 + "-q4_k_m"      # fits as it is: unchanged


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


def _stamping(dm: Manager) -> None:
    """The fake's create stamps created_at from its clock, as DeploymentManager.create does."""
    create = dm.create

    async def stamped(spec):
        d = await create(spec)
        d.created_at.FromNanoseconds(int(dm.clock[0] * 1e9))
        return d
    dm.create = stamped


async def test_a_deployment_created_again_by_its_tenant_does_not_adopt_the_earlier_ones_companion():
    """`chat` overflowed to `chat-q4`; its tenant deleted `chat` and created it again before the autoscaler's next
    pass deleted the companion. The companion was found by its parent's name and tenant only, so the new `chat`
    adopted the earlier one's (its replicas, its spec: another model or backend settings, its count beside the new
    deployment's). A companion carries its parent's creation time; the new `chat` does not adopt it, it is deleted
    as an orphan, and the new `chat` overflows to a companion of its own."""
    dm, ctl = overflow_setup([ready(1), waiting(1), waiting(2), waiting(3)], 10 * GIB, min_replicas=4,
                             max_replicas=4, target=2)
    _stamping(dm)
    dm.store.deployments["chat"].created_at.FromSeconds(900)
    await ctl.run_once()
    old = dm.store.deployments["chat-q4"]
    assert old.spec.replicas == 3
    assert autoscale_variants.companion_of(dm.store.deployments, "chat") is old
    # deleted and created again by the same tenant (one READY replica, nothing waiting), before the next pass
    again = deployment(1, variants=("bf16", "q4"), min_replicas=1, max_replicas=4, target=2)
    again.spec.variant = "bf16"
    again.created_at.FromSeconds(1100)
    dm.store.deployments["chat"] = again
    dm.by_name["chat"] = [ready(1)]
    dm.clock[0] = 1200.0
    assert autoscale_variants.companion_of(dm.store.deployments, "chat") is None
    await ctl.run_once()
    assert "chat-q4" not in dm.store.deployments                  # the orphan is deleted
    assert dm.store.deployments["chat"].spec.replicas == 1        # the new one's count is its own alone
    # the new one overflows to a companion of its own
    dm.by_name["chat"] = [ready(1), waiting(1)]
    dm.store.deployments["chat"].spec.scaling.min_replicas = 2
    await ctl.run_once()
    mine = dm.store.deployments["chat-q4"]
    assert old.spec.labels[autoscale_variants.LABEL_OVERFLOW_PARENT_CREATED] == str(900 * 10**9)
    assert mine.spec.labels[autoscale_variants.LABEL_OVERFLOW_PARENT_CREATED] == str(1100 * 10**9)
    assert autoscale_variants.companion_of(dm.store.deployments, "chat") is mine


def test_a_companion_made_before_the_parent_label_is_its_parents_when_made_after_it():
    """Companions created by a control plane before this label stay adopted on an upgrade (deleted, their
    replicas went and came back), unless they are older than the deployment under their parent's name."""
    parent = deployment(1, max_replicas=4, target=2)
    parent.created_at.FromSeconds(100)
    comp = D.Deployment(spec=autoscale_variants.companion_spec(parent.spec, "q4", 1))
    assert autoscale_variants.LABEL_OVERFLOW_PARENT_CREATED not in comp.spec.labels
    comp.created_at.FromSeconds(150)
    assert autoscale_variants.belongs(comp, parent)
    comp.created_at.FromSeconds(50)
    assert not autoscale_variants.belongs(comp, parent)
    labelled = D.Deployment(spec=autoscale_variants.companion_spec(
        parent.spec, "q4", 1, parent_created=autoscale_variants.created_stamp(parent)))
    assert autoscale_variants.belongs(labelled, parent)        # its own created_at is not what counts
    other = deployment(1, max_replicas=4, target=2)
    other.created_at.FromSeconds(101)
    assert not autoscale_variants.belongs(labelled, other)

"""MIG-aware placement over an in-memory fleet (no etcd, no gRPC), by the default profile and by best fit.

Each test places with its own, fresh scheduler: the default profile's FragmentationGradient learns the request
mix from the requests it has placed, so the one framework the tests used to share (placement's module-level
default) made a test's choices depend on the tests that ran before it (two best-fit tests passed only after
others had taught it a mix, and failed alone or in some `-k` subsets)."""

import pytest

from controlplane import placement
from controlplane.scheduler import profiles
from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2 as t
from mesh import errors, gpumodels
from mesh.slicespec import ISOLATION_ENUM, validate

GiB = 1 << 30
SCHEDULER = None        # the running test's framework (the fixture `scheduler`)


@pytest.fixture(autouse=True, params=["default", "bestfit"])
def scheduler(request):
    """A fresh framework of the profile for this test (no request mix learned from other tests)."""
    global SCHEDULER
    SCHEDULER = profiles.build(request.param)
    yield SCHEDULER
    SCHEDULER = None


def make_fleet(*nodes, ready=True):
    """nodes: (name, [(model, mig_enabled), ...], nvlink_domains)"""
    fleet = Fleet()
    for name, gpus, *rest in nodes:
        inv = t.NodeInventory(hostname=name)
        domains = rest[0] if rest else []
        for i, (model, mig) in enumerate(gpus):
            m = gpumodels.get_model(model)
            dom = next((d for d, members in enumerate(domains) if i in members), -1)
            inv.gpus.add(index=i, uuid=f"GPU-{name}-{i}", model=m.name, memory_bytes=m.memory_mib << 20,
                         mig_enabled=mig, nvlink_domain=dom)
        entry = fleet.upsert_node(t.Node(name=name, inventory=inv))
        entry.ready = ready
    return fleet


def commit(fleet, choices, tag=[0]):
    for c in choices:
        tag[0] += 1
        s = t.Slice(id=f"s-{tag[0]}", node=c.node, gpu_index=c.gpu_index, isolation=ISOLATION_ENUM[c.isolation],
                    profile=c.profile or "", memory_bytes=c.memory_bytes, compute_share=c.compute_share)
        if c.profile:
            s.placement.start, s.placement.size = c.start, c.size
        fleet.put_slice(s)


def alloc(fleet, **spec):
    choices = placement.place(fleet, validate(t.SliceSpec(tenant="t", **spec)), SCHEDULER)
    commit(fleet, choices)
    return choices


@pytest.mark.parametrize("layout", [
    ["1g.10gb"] * 7,
    ["4g.40gb", "3g.40gb"],
    ["2g.20gb"] * 3 + ["1g.10gb"],
    ["7g.80gb"],
    ["3g.40gb", "3g.40gb"],
    ["1g.20gb"] * 4,
])
def test_fill_h100_exactly_then_refuse(layout):
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    placed = [alloc(fleet, mig_profile=p)[0] for p in layout]
    layout_now = [(c.profile, c.start) for c in placed]
    assert gpumodels.placement_conflict(gpumodels.get_model("H100-80GB"), layout_now[:-1], *layout_now[-1]) is None
    with pytest.raises(errors.ResourceExhausted) as exc:
        alloc(fleet, mig_profile="1g.10gb")
    assert "no free 1g.10gb placement" in exc.value.reasons["H100-80GB"]


# best fit's own choices (the default profile's fragmentation gradient, with only this test's requests in its
# mix, may put the second slice on the empty GPU: what it packs depends on the mix it has learned)
@pytest.mark.parametrize("scheduler", ["bestfit"], indirect=True)
def test_memory_request_maps_to_smallest_profile_and_best_fit_packs():
    fleet = make_fleet(("n1", [("H100-80GB", True), ("H100-80GB", True)]))
    first = alloc(fleet, memory_bytes=15 * GiB)[0]
    assert first.profile == "1g.20gb"
    second = alloc(fleet, memory_bytes=5 * GiB)[0]
    assert (second.gpu_index, second.profile) == (first.gpu_index, "1g.10gb")  # packs onto the used GPU


def test_start_slot_keeps_room_for_large_profiles():
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    alloc(fleet, mig_profile="1g.10gb")
    # a 4g.40gb (start 0 only) must still fit after one 1g.10gb
    assert alloc(fleet, mig_profile="4g.40gb")[0].start == 0


def test_gang_same_node_is_all_or_nothing():
    fleet = make_fleet(("a", [("H100-80GB", True)] * 2), ("b", [("H100-80GB", True)] * 2))
    alloc(fleet, mig_profile="7g.80gb", gpu_model="H100-80GB")   # a/0 or similar
    before = {(s.node, s.gpu_index) for s in fleet.slices.values()}
    with pytest.raises(errors.ResourceExhausted):
        alloc(fleet, mig_profile="7g.80gb", count=3, topology=t.TOPOLOGY_SAME_NODE)
    assert {(s.node, s.gpu_index) for s in fleet.slices.values()} == before   # nothing half-placed
    got = alloc(fleet, mig_profile="7g.80gb", count=2, topology=t.TOPOLOGY_SAME_NODE)
    assert len({c.node for c in got}) == 1
    got = alloc(fleet, mig_profile="7g.80gb", count=1)
    assert len(fleet.slices) == 4


def test_gang_same_nvlink_domain():
    fleet = make_fleet(("a", [("A100-80GB", True)] * 4, [[0, 1], [2, 3]]))
    got = alloc(fleet, mig_profile="7g.80gb", count=2, topology=t.TOPOLOGY_SAME_NVLINK_DOMAIN)
    assert {c.gpu_index for c in got} in ({0, 1}, {2, 3})
    with pytest.raises(errors.ResourceExhausted):
        alloc(fleet, mig_profile="7g.80gb", count=3, topology=t.TOPOLOGY_SAME_NVLINK_DOMAIN)


def test_cordoned_and_not_ready_nodes_are_skipped_with_reasons():
    fleet = make_fleet(("a", [("H100-80GB", True)]), ("b", [("H100-80GB", True)]))
    fleet.nodes["a"].record.cordoned = True
    fleet.nodes["b"].ready = False
    with pytest.raises(errors.ResourceExhausted) as exc:
        alloc(fleet, mig_profile="1g.10gb")
    assert "node cordoned" in exc.value.reasons["H100-80GB"]
    assert "node not ready" in exc.value.reasons["H100-80GB"]


def test_model_constraint_and_mig_mode():
    fleet = make_fleet(("a", [("L4", False), ("H100-80GB", False)]))
    assert alloc(fleet, memory_bytes=4 * GiB, gpu_model="L4")[0].gpu_model == "L4"
    with pytest.raises(errors.ResourceExhausted) as exc:
        alloc(fleet, memory_bytes=4 * GiB, isolation=t.ISOLATION_MIG)
    assert "MIG mode is disabled" in exc.value.reasons["H100-80GB"]
    with pytest.raises(errors.ResourceExhausted) as exc:
        alloc(fleet, memory_bytes=4 * GiB, gpu_model="A100-40GB")
    assert "model is not A100-40GB" in exc.value.reasons["L4"]


def test_shared_isolations_account_memory_and_compute():
    fleet = make_fleet(("a", [("L4", False)]))
    alloc(fleet, memory_bytes=10 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.5)
    alloc(fleet, memory_bytes=10 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.5)
    with pytest.raises(errors.ResourceExhausted) as exc:      # compute used up
        alloc(fleet, memory_bytes=1 * GiB, isolation=t.ISOLATION_MPS, compute_share=0.1)
    assert "MPS compute shares used up" in exc.value.reasons["L4"]
    with pytest.raises(errors.ResourceExhausted) as exc:      # a GPU shares one way at a time
        alloc(fleet, memory_bytes=1 * GiB, isolation=t.ISOLATION_TIMESHARE)
    assert "GPU shared by mps" in exc.value.reasons["L4"]


@pytest.mark.parametrize("scheduler", ["bestfit"], indirect=True)      # best fit: the second share packs
def test_timeshare_memory_never_exceeds_gpu_and_exclusive_takes_all():
    fleet = make_fleet(("a", [("T4", False), ("T4", False)]))
    alloc(fleet, memory_bytes=10 * GiB, isolation=t.ISOLATION_TIMESHARE)
    alloc(fleet, memory_bytes=5 * GiB, isolation=t.ISOLATION_TIMESHARE)
    g = fleet.gpu("a", 0)
    assert g.allocated_memory <= g.memory_bytes
    ex = alloc(fleet, memory_bytes=1 * GiB, isolation=t.ISOLATION_EXCLUSIVE)[0]
    assert ex.gpu_index == 1 and ex.memory_bytes == fleet.gpu("a", 1).memory_bytes
    with pytest.raises(errors.ResourceExhausted):
        alloc(fleet, memory_bytes=1 * GiB, isolation=t.ISOLATION_EXCLUSIVE)

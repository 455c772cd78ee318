"""The scheduling cycle: gangs all or nothing, preemption, quotas, the queue, cached verdicts."""

from __future__ import annotations

import pytest

from controlplane import placement
from controlplane.scheduler import profiles
from controlplane.scheduler.queue import SchedulingQueue
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from tests.unit.test_placement import make_fleet
from tests.unit.test_scheduler_plugins import req

GiB = 1 << 30


def held(fleet, prio: int, alloc: str, node: str, gpu: int, profile: str = "", start: int = 0, share: float = 1.0):
    s = t.Slice(id=f"{alloc}-{node}-{gpu}-{start}", allocation_id=alloc, tenant="low", node=node, gpu_index=gpu,
                priority=prio, state=t.SLICE_STATE_READY, memory_bytes=GiB, compute_share=share,
                isolation=t.ISOLATION_MIG if profile else t.ISOLATION_EXCLUSIVE, profile=profile)
    if profile:
        s.placement.start, s.placement.size = start, 1
    fleet.put_slice(s)


@pytest.mark.parametrize("name,count,topology,want_nodes", [
    ("spread gang fits over two nodes", 4, t.TOPOLOGY_ANY, {"a", "b"}),
    ("spread gang too big: nothing", 5, t.TOPOLOGY_ANY, None),
    ("same-node gang of two", 2, t.TOPOLOGY_SAME_NODE, 1),
    ("same-node gang of three: no node has three", 3, t.TOPOLOGY_SAME_NODE, None),
    ("same-NVLink gang", 2, t.TOPOLOGY_SAME_NVLINK_DOMAIN, 1),
])
def test_gangs_are_all_or_nothing(name, count, topology, want_nodes):
    fleet = make_fleet(("a", [("L4", False)] * 2, [[0, 1]]), ("b", [("L4", False)] * 2, [[0, 1]]))
    before = {g.uuid: g.allocated_memory for n in fleet.nodes.values() for g in n.gpus}
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, count=count, topology=topology)
    if want_nodes is None:
        with pytest.raises(errors.ResourceExhausted):
            placement.place(fleet, r)
    else:
        choices = placement.place(fleet, r)
        assert len(choices) == count
        assert len({(c.node, c.gpu_index) for c in choices}) == count
        nodes = {c.node for c in choices}
        assert nodes == want_nodes if isinstance(want_nodes, set) else len(nodes) == want_nodes
    after = {g.uuid: g.allocated_memory for n in fleet.nodes.values() for g in n.gpus}
    assert after == before   # the cycle leaves the snapshot as it found it


def test_same_nvlink_gang_stays_in_one_domain():
    fleet = make_fleet(("a", [("H100-80GB", False)] * 4, [[0, 1], [2, 3]]))
    held(fleet, 0, "x", "a", 0)
    held(fleet, 0, "y", "a", 2)
    with pytest.raises(errors.ResourceExhausted):
        placement.place(fleet, req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, count=2,
                                   topology=t.TOPOLOGY_SAME_NVLINK_DOMAIN))
    fleet.drop_slice("y-a-2-0")
    choices = placement.place(fleet, req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, count=2,
                                         topology=t.TOPOLOGY_SAME_NVLINK_DOMAIN))
    assert sorted(c.gpu_index for c in choices) == [2, 3]


@pytest.mark.parametrize("name,held_prios,prio,preempt,enabled,want_victims", [
    ("fewest victims: one big beats two small", {"big": (1, [0, 1]), "s1": (0, [2]), "s2": (0, [3])},
     5, True, True, None),
    ("lowest priority first", {"p1": (1, [0]), "p2": (2, [1]), "hi": (9, [2, 3])}, 5, True, True, ["p1"]),
    ("never equal or higher priority", {"p5": (5, [0]), "p9": (9, [1, 2, 3])}, 5, True, True, []),
    ("not asked to preempt", {"p1": (1, [0]), "p2": (2, [1, 2, 3])}, 5, False, True, []),
    ("preemption disabled", {"p1": (1, [0]), "p2": (2, [1, 2, 3])}, 5, True, False, []),
])
def test_preemption(name, held_prios, prio, preempt, enabled, want_victims):
    fleet = make_fleet(("a", [("L4", False)] * 2), ("b", [("L4", False)] * 2))
    for alloc, (p, gpus) in held_prios.items():
        for gi in gpus:
            held(fleet, p, alloc, "a" if gi < 2 else "b", gi % 2)
    fw = profiles.build("default", preemption=enabled)
    d = fw.schedule(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, priority=prio, preempt=preempt), fleet)
    if want_victims == []:
        assert not d.ok
        return
    assert d.ok
    if want_victims is None:   # one victim of the two small ones, not the big gang
        assert len(d.victims) == 1 and d.victims[0] in ("s1", "s2")
    else:
        assert d.victims == want_victims
    # the victims' slices are back in the snapshot: the controller evicts them
    assert sum(len(g.slices) for n in fleet.nodes.values() for g in n.gpus) == \
        sum(len(v[1]) for v in held_prios.values())


def test_preemption_reprieves_victims_it_does_not_need():
    fleet = make_fleet(("a", [("H100-80GB", True)]))
    held(fleet, 1, "low1", "a", 0, "1g.10gb", 0)
    held(fleet, 2, "low2", "a", 0, "1g.10gb", 1)
    for st in range(2, 7):
        held(fleet, 9, f"hi{st}", "a", 0, "1g.10gb", st)
    d = profiles.build("default").schedule(req(mig_profile="1g.10gb", priority=5, preempt=True), fleet)
    assert d.ok and d.victims == ["low1"]


@pytest.mark.parametrize("name,held_prios,count,want_victims", [
    # a spread gang of 2 on two full 2-GPU nodes: the two lowest priorities, one on each node,
    # rather than both GPUs of one node (which would take a priority 3 victim)
    ("lowest priorities over two nodes", {"a0": (1, 0), "a1": (3, 1), "b0": (2, 2), "b1": (9, 3)}, 2,
     ["a0", "b0"]),
    # a gang of 4 needs every GPU; one holder outranks it: nothing
    ("a holder of higher priority blocks", {"a0": (1, 0), "a1": (1, 1), "b0": (2, 2), "b1": (9, 3)}, 4, None),
    # a gang of 4 over both nodes: victims on both, never more than needed
    ("victims on several nodes", {"a0": (1, 0), "a1": (2, 1), "b0": (3, 2), "b1": (4, 3)}, 4,
     ["a0", "a1", "b0", "b1"]),
])
def test_preemption_for_a_gang_spread_over_nodes(name, held_prios, count, want_victims):
    fleet = make_fleet(("a", [("L4", False)] * 2), ("b", [("L4", False)] * 2))
    for alloc, (p, gi) in held_prios.items():
        held(fleet, p, alloc, "a" if gi < 2 else "b", gi % 2)
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, count=count, topology=t.TOPOLOGY_ANY,
            priority=5, preempt=True)
    d = profiles.build("default").schedule(r, fleet)
    if want_victims is None:
        assert not d.ok
        return
    assert d.ok and sorted(d.victims) == want_victims
    assert len(d.choices) == count and len({(c.node, c.gpu_index) for c in d.choices}) == count
    freed = {(("a", "b")[held_prios[v][1] // 2], held_prios[v][1] % 2) for v in d.victims}
    taken = {(c.node, c.gpu_index) for c in d.choices}
    assert taken - freed <= {(n, i) for n in "ab" for i in range(2)} - \
        {(("a", "b")[gi // 2], gi % 2) for _, gi in held_prios.values()}   # only free or freed GPUs
    assert {c.node for c in d.choices} == {"a", "b"}
    # the snapshot is as it was: the controller evicts the victims
    assert sum(len(g.slices) for n in fleet.nodes.values() for g in n.gpus) == len(held_prios)


@pytest.mark.parametrize("profile", ["default", "fgd", "packing", "bestfit"])
def test_ties_go_to_the_smallest_node_name_whatever_the_fleet_order(profile):
    fleet = make_fleet(("n2", [("L4", False)] * 2), ("n1", [("L4", False)] * 2), ("n3", [("L4", False)] * 2))
    assert list(fleet.nodes) == ["n2", "n1", "n3"]   # registered out of name order
    c = profiles.build(profile).schedule(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE), fleet).choices[0]
    assert c.node == "n1"


def test_quota_refusal_names_the_quota():
    fleet = make_fleet(("a", [("L4", False)] * 2))
    fw = profiles.from_config({"args": {"TenantQuota": {"tenants": {"t": {"max_slices": 1}}}}})
    c = placement.place(fleet, req(memory_bytes=GiB), fw)[0]
    fleet.put_slice(t.Slice(id="s1", tenant="t", node=c.node, gpu_index=c.gpu_index, memory_bytes=c.memory_bytes,
                            compute_share=c.compute_share, isolation=t.ISOLATION_TIMESHARE))
    with pytest.raises(errors.ResourceExhausted, match="quota max_slices=1") as exc:
        placement.place(fleet, req(memory_bytes=GiB), fw)
    assert "quota" in exc.value.reasons
    placement.place(fleet, req(tenant="other", memory_bytes=GiB), fw)   # other tenants unaffected


def test_queue_pops_highest_priority_first_fifo_among_equals():
    q = SchedulingQueue()
    for name, prio in (("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -3)):
        q.add(name, prio)
    assert [q.pop() for _ in range(len(q))] == ["b", "d", "a", "c", "e"]


def test_cached_verdicts_follow_changes_on_the_node():
    fleet = make_fleet(("a", [("L4", False)]))
    fw = profiles.build("default")
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE)
    assert fw.schedule(r, fleet).ok
    held(fleet, 0, "x", "a", 0)
    assert not fw.schedule(r, fleet).ok
    fleet.nodes["a"].gpus[0].health = "unhealthy"
    fleet.drop_slice("x-a-0-0")
    assert not fw.schedule(r, fleet).ok
    fleet.nodes["a"].gpus[0].health = "healthy"
    assert fw.schedule(r, fleet).ok


def test_identical_nodes_share_one_verdict():
    fleet = make_fleet(*[(f"n{i}", [("L4", False)] * 2) for i in range(20)])
    fw = profiles.build("bestfit")
    fw.schedule(req(memory_bytes=GiB), fleet)
    assert fw.cached == 1


@pytest.mark.parametrize("profile", ["default", "packing", "bestfit"])
def test_spread_gang_honours_anti_affinity_among_its_own_slices(profile):
    # every slice of the gang carries the labels its rules name: no two may share a node
    fleet = make_fleet(("a", [("H100-80GB", False)] * 2), ("b", [("H100-80GB", False)] * 2))
    r = req(memory_bytes=GiB, isolation=t.ISOLATION_TIMESHARE, count=2, topology=t.TOPOLOGY_ANY,
            labels={"app": "x"}, anti_affinity={"app": "x"})
    choices = placement.place(fleet, r, profiles.build(profile))
    assert sorted(c.node for c in choices) == ["a", "b"]
    with pytest.raises(errors.ResourceExhausted):   # a third slice has no node of its own
        placement.place(fleet, req(memory_bytes=GiB, isolation=t.ISOLATION_TIMESHARE, count=3,
                                   topology=t.TOPOLOGY_ANY, labels={"app": "x"}, anti_affinity={"app": "x"}))
    assert not fleet.usage.get("t", [0])[0]   # the cycle's placeholders are gone again


@pytest.mark.parametrize("spec,match", [
    # a time-share slice holds its whole GPU (compute share 1.0), which the request does not name
    ({"memory_bytes": GiB, "isolation": t.ISOLATION_TIMESHARE, "count": 4}, "quota max_gpus=2 exceeded: uses 0, asks 4"),
    # a MIG profile names no memory: 7g.80gb holds 79 GiB each
    ({"mig_profile": "7g.80gb", "count": 2}, "quota max_memory_bytes=.* exceeded"),
])
def test_quota_is_checked_on_what_the_chosen_slices_take(spec, match):
    fw = profiles.from_config({"args": {"TenantQuota": {"tenants": {"t": {"max_gpus": 2,
                                                                           "max_memory_bytes": 20 * GiB}}}}})
    fleet = make_fleet(("a", [("H100-80GB", False)] * 4), ("b", [("H100-80GB", True)] * 4))
    with pytest.raises(errors.ResourceExhausted, match=match):
        placement.place(fleet, req(**spec), fw)
    # within the quota it places as before
    assert len(placement.place(fleet, req(memory_bytes=GiB, isolation=t.ISOLATION_TIMESHARE, count=2), fw)) == 2



@pytest.mark.parametrize("profile", ["default", "bestfit", "packing", "spread", "fgd"])
def test_avoid_nodes_keeps_a_slice_off_them_whatever_the_scores(profile):
    """A migration's target is placed off its source node by the request's `avoid_nodes`: its probes used to
    land back on a source node with room (packing scores prefer it) until PLACE_ATTEMPTS ran out."""
    import dataclasses
    fleet = make_fleet(("full", [("H100-80GB", True)] * 4), ("empty", [("H100-80GB", True)] * 4))
    fleet.put_slice(t.Slice(id="x", tenant="t", node="full", gpu_index=0, profile="1g.10gb",
                            isolation=t.ISOLATION_MIG, memory_bytes=10 * GiB))
    r = req(mig_profile="1g.10gb")
    fw = profiles.build(profile)
    for _ in range(3):                     # the verdict caches must not carry one request's answer to the other
        assert fw.schedule(dataclasses.replace(r, avoid_nodes=("full",)), fleet).choices[0].node == "empty"
        assert fw.schedule(dataclasses.replace(r, avoid_nodes=("empty",)), fleet).choices[0].node == "full"
    with pytest.raises(errors.ResourceExhausted, match="the node the slice moves off"):
        placement.place(fleet, dataclasses.replace(r, avoid_nodes=("full", "empty")), fw)


@pytest.mark.parametrize("profile", ["default", "bestfit", "packing", "spread", "fgd", "random"])
def test_only_gpu_places_a_slice_on_that_gpu_whatever_the_scores(profile):
    """A move pinned to the GPU a pack recommendation listed (`only_gpu`) lands there or nowhere: the scores would
    pick another GPU of the node (or another node), and nodes of one signature share cached verdicts, which must not
    carry the pin from one node or GPU to another."""
    import dataclasses
    fleet = make_fleet(("a", [("H100-80GB", False)] * 2), ("b", [("H100-80GB", False)] * 2))
    for node in ("a", "b"):
        fleet.put_slice(t.Slice(id=f"x-{node}", tenant="t", node=node, gpu_index=1, isolation=t.ISOLATION_MPS,
                                memory_bytes=60 * GiB, compute_share=0.1))
    r = req(memory_bytes=10 * GiB, compute_share=0.1, isolation=t.ISOLATION_MPS)
    fw = profiles.build(profile)
    for _ in range(3):
        for node in ("a", "b"):
            for index in (0, 1):
                got = fw.schedule(dataclasses.replace(r, only_gpu=(node, index)), fleet).choices[0]
                assert (got.node, got.gpu_index) == (node, index)
    big = dataclasses.replace(r, memory_bytes=30 * GiB, only_gpu=("b", 1))     # b/1 has about 20 GiB free
    with pytest.raises(errors.ResourceExhausted):
        placement.place(fleet, big, fw)
    with pytest.raises(errors.ResourceExhausted, match="no GPU b/7"):
        placement.place(fleet, dataclasses.replace(r, only_gpu=("b", 7)), fw)
    assert fw.schedule(dataclasses.replace(big, only_gpu=("b", 0)), fleet).choices[0].gpu_index == 0

"""NodeResourcesFit checks a request's memory_bytes against the GPU's memory in every non-MIG mode: an exclusive
slice used to be placed on any idle GPU whatever it asked for (40 GiB on a 24 GB L4), since it is given the whole
GPU; MPS and time-share slices must fit in what is free (the memory the card reports less what its slices hold).
A request no GPU can hold is refused naming memory_bytes and the largest GPU memory there is."""

from __future__ import annotations

import pytest

from controlplane import placement
from controlplane.scheduler import profiles
from controlplane.scheduler.framework import Code
from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2 as t
from mesh import errors, gpumodels
from mesh.slicespec import validate
from tests.unit.test_placement import commit, make_fleet

GiB = 1 << 30
EXCL, MPS, TS = t.ISOLATION_EXCLUSIVE, t.ISOLATION_MPS, t.ISOLATION_TIMESHARE


def req(**spec):
    return validate(t.SliceSpec(tenant=spec.pop("tenant", "t"), **spec))


def reported(fleet: Fleet, node: str, memory_bytes: int) -> None:
    """Let every GPU of `node` report `memory_bytes` (less than the catalog's, as real cards do)."""
    rec = t.Node()
    rec.CopyFrom(fleet.nodes[node].record)
    for g in rec.inventory.gpus:
        g.memory_bytes = memory_bytes
    fleet.upsert_node(rec)


@pytest.mark.parametrize("profile", ["default", "fgd-exact"])
@pytest.mark.parametrize("name,nodes,held,spec,want", [
    ("40 GiB exclusive never on a 24 GB L4", [("a-l4", [("L4", False)] * 2), ("b-a100", [("A100-80GB", False)])],
     [], {"memory_bytes": 40 * GiB, "isolation": EXCL}, "b-a100"),
    ("small exclusive still takes an L4 (best fit: the smaller card)",
     [("a-l4", [("L4", False)]), ("b-a100", [("A100-80GB", False)])], [], {"memory_bytes": 8 * GiB, "isolation": EXCL},
     None),
    ("40 GiB time-share never on a 24 GB L4", [("a-l4", [("L4", False)] * 2), ("b-h100", [("H100-80GB", False)])],
     [], {"memory_bytes": 40 * GiB, "isolation": TS}, "b-h100"),
    ("40 GiB MPS never on a 24 GB L4", [("a-l4", [("L4", False)] * 2), ("b-h100", [("H100-80GB", False)])],
     [], {"memory_bytes": 40 * GiB, "isolation": MPS}, "b-h100"),
    ("MPS: more than is free on the used L4 goes to the free one", [("a-l4", [("L4", False)]), ("b-l4", [("L4", False)])],
     [("a-l4", {"memory_bytes": 16 * GiB, "isolation": MPS, "compute_share": 0.25})],
     {"memory_bytes": 8 * GiB, "isolation": MPS, "compute_share": 0.25}, "b-l4"),
    ("time-share: more than is free on the used L4 goes to the free one",
     [("a-l4", [("L4", False)]), ("b-l4", [("L4", False)])],
     [("a-l4", {"memory_bytes": 16 * GiB, "isolation": TS})], {"memory_bytes": 8 * GiB, "isolation": TS}, "b-l4"),
])
def test_memory_bytes_fits_the_gpu(profile, name, nodes, held, spec, want):
    fleet = make_fleet(*nodes)
    fw = profiles.build(profile)
    for node, h in held:
        commit(fleet, placement.place(fleet, req(**h, gpu_model=fleet.nodes[node].gpus[0].model.name), fw))
        assert {s.node for s in fleet.slices.values()} == {node}
    choices = placement.place(fleet, req(**spec), fw)
    g = fleet.gpu(choices[0].node, choices[0].gpu_index)
    assert g.memory_bytes - g.allocated_memory >= spec["memory_bytes"]
    if want is not None:
        assert choices[0].node == want


@pytest.mark.parametrize("spec,why", [
    ({"memory_bytes": 40 * GiB, "isolation": EXCL}, f"memory_bytes={40 * GiB} is more than the GPU's"),
    ({"memory_bytes": 40 * GiB, "isolation": MPS}, f"memory_bytes={40 * GiB} is more than the GPU's"),
    ({"memory_bytes": 40 * GiB, "isolation": TS}, f"memory_bytes={40 * GiB} is more than the GPU's"),
])
def test_no_gpu_large_enough_is_refused_naming_the_largest(spec, why):
    fleet = make_fleet(("a", [("L4", False)] * 2), ("b", [("T4", False)]))
    l4 = gpumodels.get_model("L4").memory_mib << 20
    d = profiles.build("default").schedule(req(**spec), fleet)
    assert d.status.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert why in d.reasons["L4"] and why in d.reasons["T4"]
    assert f"the largest GPU memory available to {req(**spec).isolation} slices is {l4} bytes (L4 on a)" \
        in d.reasons["fleet"]
    with pytest.raises(errors.ResourceExhausted) as e:
        placement.place(fleet, req(**spec))
    assert f"memory_bytes={40 * GiB}" in str(e.value) and f"{l4} bytes" in str(e.value)


def test_the_memory_the_card_reports_counts_not_the_catalog():
    # an A100-40GB's catalog memory is exactly 40 GiB; a card reporting a little less cannot hold 40 GiB
    fleet = make_fleet(("a", [("A100-40GB", False)]), ("b", [("A100-80GB", False)]))
    reported(fleet, "a", 40 * GiB - 512 * (1 << 20))
    assert placement.place(fleet, req(memory_bytes=40 * GiB, isolation=EXCL))[0].node == "b"
    assert placement.place(fleet, req(memory_bytes=39 * GiB, isolation=EXCL))[0].node == "a"


def test_same_node_gang_of_exclusive_slices_uses_only_large_gpus():
    fleet = make_fleet(("n", [("L4", False), ("A100-80GB", False), ("L4", False), ("A100-80GB", False)]))
    choices = placement.place(fleet, req(memory_bytes=40 * GiB, isolation=EXCL, count=2,
                                         topology=t.TOPOLOGY_SAME_NODE))
    assert sorted(c.gpu_index for c in choices) == [1, 3]
    commit(fleet, choices)
    with pytest.raises(errors.ResourceExhausted, match="is more than the GPU's"):
        placement.place(fleet, req(memory_bytes=40 * GiB, isolation=EXCL))


def test_a_refusal_that_more_room_could_fix_does_not_blame_the_fleet():
    fleet = make_fleet(("a", [("A100-80GB", False)]))
    commit(fleet, placement.place(fleet, req(memory_bytes=GiB, isolation=EXCL)))
    d = profiles.build("default").schedule(req(memory_bytes=40 * GiB, isolation=EXCL), fleet)
    assert d.status.code == Code.UNSCHEDULABLE and "fleet" not in d.reasons
    assert "GPU is in use" in d.reasons["A100-80GB"]


def test_the_largest_gpu_named_is_one_the_request_may_use():
    # 40 GiB time-share: the H100 in MIG mode cannot take it, the A100-40GB lacks a little; with no
    # isolation named the MIG H100 counts (a 7g profile would do) and the refusal is not the fleet's
    fleet = make_fleet(("a", [("A100-40GB", False)]), ("h", [("H100-80GB", True)]))
    reported(fleet, "a", 40 * GiB - GiB)
    d = profiles.build("default").schedule(req(memory_bytes=40 * GiB, isolation=TS), fleet)
    assert f"available to timeshare slices is {39 * GiB} bytes (A100-40GB on a)" in d.reasons["fleet"]
    d = profiles.build("default").schedule(req(memory_bytes=40 * GiB, isolation=TS, gpu_model="A100-40GB"), fleet)
    assert f"is {39 * GiB} bytes (A100-40GB on a)" in d.reasons["fleet"]
    assert profiles.build("default").schedule(req(memory_bytes=40 * GiB), fleet).ok

"""mesh/fleetview.py: the MIG slots, levels and tenant symbols the fleet views draw."""

from __future__ import annotations

import pytest

from mesh import fleetview


def gpu(layout=(), node="n1", index=0, model="H100-80GB", total=80 << 30, **telemetry):
    return {"node": node, "index": index, "model": model, "mig_layout": list(layout), "memory_total_bytes": total,
            **telemetry}


def mig_slice(sid, tenant, profile, start, node="n1", index=0):
    return {"id": sid, "tenant": tenant, "node": node, "gpu_index": index, "profile": profile,
            "placement": {"start": start, "size": 0}, "state": "ready", "isolation": "mig"}


def holders(cells):
    return [c["slice"] if c else None for c in cells]


def test_mig_layout_slots_name_each_holder():
    g = gpu(["1g.10gb@0", "2g.20gb@2", "3g.40gb@4"])
    slices = [mig_slice("s-1", "a", "1g.10gb", 0), mig_slice("s-2", "b", "2g.20gb", 2),
              mig_slice("s-3", "a", "3g.40gb", 4)]
    slots = fleetview.gpu_slots(g, slices)
    assert holders(slots["memory"]) == ["s-1", None, "s-2", "s-2", "s-3", "s-3", "s-3", "s-3"]
    assert holders(slots["compute"]) == ["s-1", None, "s-2", "s-2", "s-3", "s-3", "s-3"]
    assert slots["memory"][2]["tenant"] == "b" and slots["memory"][4]["profile"] == "3g.40gb"


@pytest.mark.parametrize("layout, memory, compute", [
    (["7g.80gb@0"], 8, 7),
    (["4g.40gb@0"], 4, 4),
    (["1g.20gb@6"], 2, 1),
    (["1g.10gb@6"], 1, 1),
])
def test_every_profile_fills_its_memory_and_compute_slices(layout, memory, compute):
    slots = fleetview.gpu_slots(gpu(layout), [])
    assert sum(c is not None for c in slots["memory"]) == memory
    assert sum(c is not None for c in slots["compute"]) == compute


def test_carved_instance_without_a_visible_slice_is_unnamed():
    """Another tenant's slice (hidden from a tenant's token) or a warm instance: carved, no holder."""
    slots = fleetview.gpu_slots(gpu(["3g.40gb@0", "3g.40gb@4"]), [mig_slice("s-9", "b", "3g.40gb", 4)])
    assert slots["memory"][0] == {"profile": "3g.40gb", "start": 0, "slice": "", "tenant": "", "state": ""}
    assert slots["memory"][7]["slice"] == "s-9"


def test_slices_of_other_gpus_are_ignored():
    slots = fleetview.gpu_slots(gpu(["1g.10gb@0"]), [mig_slice("s-x", "a", "1g.10gb", 0, index=1)])
    assert slots["memory"][0]["slice"] == ""


def test_shared_gpu_fills_by_share():
    g = gpu(total=80 << 30)
    slices = [{"id": "s-a", "tenant": "a", "node": "n1", "gpu_index": 0, "profile": None, "isolation": "mps",
               "memory_bytes": 20 << 30, "compute_share": 0.5, "state": "ready"}]
    slots = fleetview.gpu_slots(g, slices)
    assert holders(slots["memory"]) == ["s-a", "s-a"] + [None] * 6
    assert sum(c is not None for c in slots["compute"]) == 4      # round(0.5 * 7)


@pytest.mark.parametrize("telemetry, want", [
    ({}, "ok"),
    ({"memory_pressure": "normal", "thermal_state": "normal", "health": "healthy"}, "ok"),
    ({"thermal_state": "warning"}, "warm"),
    ({"memory_pressure": "high", "thermal_state": "warning"}, "hot"),
    ({"memory_pressure": "critical"}, "critical"),
    ({"memory_pressure": "critical", "health": "quarantined"}, "unhealthy"),
])
def test_level_is_the_worst_condition(telemetry, want):
    assert fleetview.level(gpu(**telemetry)) == want


def test_tenant_symbols_are_stable_by_name():
    assert fleetview.tenant_symbols(["b", "a", "", "b"]) == {"a": "A", "b": "B"}

"""A node whose inventory changes (a re-registration after a reboot, MIG mode switched, a host label) keeps what
the health and telemetry controllers judged of its GPUs: only a control-plane start restores that from etcd."""

from __future__ import annotations

import pytest

from controlplane import placement
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from tests.unit.test_placement import make_fleet
from tests.unit.test_scheduler_plugins import req

GiB = 1 << 30


def _reregister(fleet, name, **changes):
    rec = t.Node()
    rec.CopyFrom(fleet.nodes[name].record)
    for k, v in changes.items():
        setattr(rec.inventory, k, v)
    fleet.upsert_node(rec)


def test_a_quarantined_gpu_stays_quarantined_when_its_node_re_registers():
    fleet = make_fleet(("n", [("L4", False)]))
    g = fleet.nodes["n"].gpus[0]
    g.health, g.memory_pressure, g.thermal_state = "quarantined", "high", "warning"
    _reregister(fleet, "n", memory_bytes=64 * GiB)          # the host's memory reads otherwise after a reboot
    g2 = fleet.nodes["n"].gpus[0]
    assert (g2.health, g2.memory_pressure, g2.thermal_state) == ("quarantined", "high", "warning")
    with pytest.raises(errors.ResourceExhausted, match="quarantined"):
        placement.place(fleet, req(memory_bytes=GiB))


def test_another_gpu_at_the_same_index_starts_healthy():
    fleet = make_fleet(("n", [("L4", False)]))
    fleet.nodes["n"].gpus[0].health = "quarantined"
    rec = t.Node()
    rec.CopyFrom(fleet.nodes["n"].record)
    rec.inventory.gpus[0].uuid = "GPU-replaced"               # the card was swapped
    fleet.upsert_node(rec)
    assert fleet.nodes["n"].gpus[0].health == "healthy"

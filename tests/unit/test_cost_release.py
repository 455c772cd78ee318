"""A released slice pays up to its release: the accountant charged each slice up to its last accounting while it
was in the fleet, so the time from there to its release (up to one `cost_interval_seconds`) was never charged,
and a slice created and released between two accountings was never charged at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.api.events import DELETED, EventHub
from controlplane.cost.accountant import CostAccountant
from controlplane.cost.ledger import CostLedger
from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2
from mesh.cost import PriceTable

PRICES = PriceTable.parse(["H100-80GB=2.40"])
GIB = 2**30
EIGHTH = 2.40 / 8 / 3600          # $ per second of a 1g.10gb slice of an H100 at $2.40/hour


class Cluster:
    """An in-memory fleet whose releases are published as the slice controller's `save` does (the slice leaves
    the fleet, then DELETED once its deletion is durable), a hand-moved clock and an accountant over both."""

    def __init__(self, tmp_path) -> None:
        self.fleet, self.hub, self.now = Fleet(), EventHub(), [1000.0]
        self.ledger = CostLedger(str(tmp_path / "h.db"))
        self.acc = CostAccountant(SimpleNamespace(fleet=self.fleet, events=self.hub), None, self.ledger, PRICES,
                                  interval=10, clock=lambda: self.now[0])

    def add(self, sid: str, at: float) -> None:
        s = types_pb2.Slice(id=sid, tenant="t1", node="n1", gpu_model="H100-80GB",
                            isolation=types_pb2.ISOLATION_MIG, profile="1g.10gb", memory_bytes=10 * GIB)
        s.created_at.FromNanoseconds(int(at * 1e9))
        self.fleet.slices[sid] = s

    def drop(self, sid: str, at: float) -> types_pb2.Slice:
        self.now[0] = at
        return self.fleet.slices.pop(sid)

    def published(self, s: types_pb2.Slice, at: float) -> None:
        self.now[0] = at
        self.hub.publish(DELETED, s, 1)

    def tick(self, at: float) -> dict[str, float]:
        self.now[0] = at
        charges, live, gone = self.acc.tick(at)
        self.ledger.write(charges, live, gone)
        return {ln.key: ln.slice_seconds for ln in self.ledger.query("slice", 0.0)}


def test_a_released_slice_is_charged_up_to_its_release(tmp_path):
    c = Cluster(tmp_path)
    c.add("s1", 1000.0)
    assert c.tick(1010.0) == {"s1": pytest.approx(10)}
    c.published(c.drop("s1", 1017.0), 1017.0)            # released 7 s after the last accounting
    assert c.tick(1020.0) == {"s1": pytest.approx(17)}
    assert c.tick(1030.0) == {"s1": pytest.approx(17)}   # once only
    dollars = {ln.key: ln.dollars for ln in c.ledger.query("slice", 0.0)}
    assert dollars["s1"] == pytest.approx(17 * EIGHTH)
    assert c.ledger.cursors() == {}


def test_a_slice_created_and_released_between_two_accountings_is_charged(tmp_path):
    c = Cluster(tmp_path)
    c.add("s1", 1000.0)
    c.tick(1010.0)
    c.add("s2", 1012.0)
    c.published(c.drop("s2", 1018.0), 1018.0)             # 6 s, never seen by an accounting
    assert c.tick(1020.0) == {"s1": pytest.approx(20), "s2": pytest.approx(6)}


def test_a_release_published_after_the_accounting_that_missed_the_slice(tmp_path):
    """The slice left the fleet, an accounting ran while its deletion was being written, then DELETED came: it is
    charged from its last cursor to then, not from its creation again."""
    c = Cluster(tmp_path)
    c.add("s1", 1000.0)
    c.tick(1010.0)
    s = c.drop("s1", 1015.0)
    assert c.tick(1020.0) == {"s1": pytest.approx(10)}    # gone from the fleet, its release not durable yet
    c.published(s, 1021.0)
    assert c.tick(1030.0) == {"s1": pytest.approx(21)}
    assert c.tick(1040.0) == {"s1": pytest.approx(21)}

"""A leader change to a control plane on another host charges no slice-second twice: each ledger is the host's own
(`<state_dir>/history.db`), so a new leader had no cursor for the live slices and charged each from its creation,
again, the time the old leader had charged; and a failback to the old host charged the other's time once more from
its own stale cursors. The leader's last accounting is in etcd now (`/gpumesh/v1/cost/accounted`), and a leader
starts no slice before it."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from controlplane.cost.accountant import CostAccountant
from controlplane.cost.ledger import CostLedger
from controlplane.state import keys
from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2
from mesh.cost import PriceTable

PRICES = PriceTable.parse(["H100-80GB=2.40"])


class Etcd:
    """The keys the accountant reads and writes, as the etcd store (get) and the leader's writer (write) do."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}

    async def get(self, key: bytes) -> bytes | None:
        return self.kv.get(key)

    async def write(self, ops, conds=()) -> int:
        for op in ops:
            self.kv[op.key] = op.value
        return 1


def leader(fleet, etcd, path, clock) -> CostAccountant:
    ctl = SimpleNamespace(fleet=fleet, store=etcd, writer=etcd)
    return CostAccountant(ctl, None, CostLedger(str(path)), PRICES, interval=10, clock=lambda: clock[0])


def seconds(path) -> float:
    return sum(ln.slice_seconds for ln in CostLedger(str(path)).query("slice", 0.0))


def test_a_new_leader_on_another_host_charges_from_the_old_leaders_last_accounting(tmp_path):
    fleet, etcd, clock = Fleet(), Etcd(), [1000.0]
    s = types_pb2.Slice(id="s1", tenant="t1", node="n1", gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                        profile="1g.10gb", memory_bytes=10 * 2**30)
    s.created_at.FromSeconds(1000)
    fleet.slices["s1"] = s
    host_a, host_b = tmp_path / "a.db", tmp_path / "b.db"

    async def lead(path, until: list[float]) -> None:
        """A leader on the host of ledger `path`: loads, accounts at each time of `until`, then dies (no stop)."""
        acc = leader(fleet, etcd, path, clock)
        await acc.load()
        for t in until:
            clock[0] = t
            await acc.account()
        acc.pool.shutdown(wait=True)

    asyncio.run(lead(host_a, [1010.0, 1020.0]))
    asyncio.run(lead(host_b, [1030.0]))               # host a died at 1020 + a bit; b took over
    assert seconds(host_a) == pytest.approx(20) and seconds(host_b) == pytest.approx(10)
    asyncio.run(lead(host_a, [1040.0]))               # failback: a's own cursor (1020) is older than b's work
    assert seconds(host_a) + seconds(host_b) == pytest.approx(40)      # the slice's life, once
    assert json.loads(etcd.kv[keys.COST_ACCOUNTED.encode()])["t"] == 1040.0


def test_an_unreadable_mark_is_no_start(tmp_path):
    """Not JSON, or no number: logged, and the slices are charged as before (from their cursor or creation)."""
    fleet, etcd, clock = Fleet(), Etcd(), [1010.0]
    etcd.kv[keys.COST_ACCOUNTED.encode()] = b"not json"
    acc = leader(fleet, etcd, tmp_path / "a.db", clock)
    asyncio.run(acc.load())
    assert acc.floor == 0.0
    acc.pool.shutdown(wait=True)

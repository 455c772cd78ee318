"""How the cost ledger reads: the query plan SQLite uses for GetCost's sums (a tenant's query searches that tenant's
rows, not every tenant's rows of the window), the index an existing ledger file gains when it is opened, and a
long read that does not hold up the accountant's writes (a reader connection of its own, on a thread of its own).

Plans are read with EXPLAIN QUERY PLAN on the SQL the ledger ran (caught with a trace callback on every connection
it opens); the stalls are a progress handler that waits inside a read: order of events is asserted, never times."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from types import SimpleNamespace

import pytest

from controlplane.cost import ledger as L
from controlplane.cost import service as S
from controlplane.cost.accountant import CostAccountant
from controlplane.cost.ledger import CostLedger
from gpumesh.v1 import cost_service_pb2 as C
from mesh.cost import PriceTable
from mesh.cost import accounting as acc

NOW = 100_000.0
STALL_S = 20.0          # how long a stalled read waits for the write before it gives up (only a failing test waits)
# the ledger's schema before the tenant index (an operator's history.db of an earlier release)
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_ledger (
    bucket REAL NOT NULL, slice TEXT NOT NULL, category TEXT NOT NULL, tenant TEXT NOT NULL,
    deployment TEXT NOT NULL, model TEXT NOT NULL, node TEXT NOT NULL, gpu_model TEXT NOT NULL,
    seconds REAL NOT NULL, gpu_seconds REAL NOT NULL, dollars REAL NOT NULL, tokens REAL NOT NULL,
    PRIMARY KEY (bucket, slice, category)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cost_ledger_bucket ON cost_ledger (bucket);
CREATE TABLE IF NOT EXISTS cost_cursor (slice TEXT PRIMARY KEY, t REAL NOT NULL) WITHOUT ROWID;
"""


def charges(tenants: int = 4, per_tenant: int = 5, at: float = NOW - 300) -> list[acc.Charge]:
    out = []
    for t in range(tenants):
        for i in range(per_tenant):
            f = acc.SliceFacts(f"s-{t}-{i}", f"t{t}", f"n{i % 2}", "H100-80GB", 0.125, 2.40, 0.0)
            out.append(acc.charge(f, at, at + 60))
    return out


@pytest.fixture
def traced(monkeypatch):
    """Every SQL statement run on a connection opened from here on, in order."""
    seen: list[str] = []
    connect = sqlite3.connect

    def tracing(*a, **kw):
        db = connect(*a, **kw)
        db.set_trace_callback(seen.append)
        return db
    monkeypatch.setattr(L.sqlite3, "connect", tracing)
    return seen


def plan(path: str, sql: str) -> str:
    db = sqlite3.connect(path)
    try:
        return " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql))
    finally:
        db.close()


def last_select(seen: list[str]) -> str:
    return [s for s in seen if s.lstrip().upper().startswith("SELECT") and "FROM cost_ledger" in s][-1]


@pytest.mark.parametrize("by", acc.GROUPS)
def test_a_tenants_query_searches_that_tenants_rows(tmp_path, traced, by):
    """A tenant's GetCost (every non-admin caller's) read every tenant's rows of the window and dropped the others
    one by one (`SEARCH ... USING PRIMARY KEY (bucket>?)`, then a filter on tenant): its cost grew with the whole
    fleet's. With the (tenant, bucket) index it searches its own rows only; its sums are the same."""
    path = str(tmp_path / "h.db")
    led = CostLedger(path)
    led.write(charges(), {}, set())
    got = led.query(by, NOW - 3600, tenant="t1", max_lines=100)
    p = plan(path, last_select(traced))
    assert "USING INDEX cost_ledger_tenant (tenant=? AND bucket>?)" in p, p
    assert "SCAN" not in p, p
    assert sum(ln.dollars for ln in got) == pytest.approx(sum(c.dollars for c in charges() if c.tenant == "t1"))
    assert {ln.key for ln in got} <= {"t1", "", "n0", "n1", "H100-80GB"} | {f"s-1-{i}" for i in range(5)}


@pytest.mark.parametrize("by", acc.GROUPS)
def test_the_fleets_query_searches_the_window_never_scans_the_ledger(tmp_path, traced, by):
    """An admin's query (every tenant) reads the window's rows by the primary key's leading bucket; the tenant
    index must not tempt SQLite into walking the whole ledger (all of cost_retention_days) in tenant order to
    save the GROUP BY's sort (it does, for `GROUP BY tenant`, unless the query keeps it from the index)."""
    path = str(tmp_path / "h.db")
    led = CostLedger(path)
    led.write(charges(), {}, set())
    led.query(by, NOW - 3600, max_lines=100)
    p = plan(path, last_select(traced))
    assert "SEARCH cost_ledger USING PRIMARY KEY (bucket>?)" in p, p
    assert "SCAN" not in p, p


def test_an_old_ledger_file_gains_the_index_when_opened(tmp_path, traced):
    """A history.db written with the schema before the index opens, keeps its rows and cursors, and is given the
    index once (opening it again changes nothing); the redundant (bucket) index, a copy of the primary key's
    order, goes."""
    path = str(tmp_path / "history.db")
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    rows = [(float(int(c.end // 60) * 60), c.slice_id, c.category, c.tenant, c.deployment, c.model, c.node,
             c.gpu_model, c.seconds, c.gpu_seconds, c.dollars, c.tokens) for c in charges()]
    old.executemany("INSERT INTO cost_ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    old.execute("INSERT INTO cost_cursor VALUES ('s-0-0', ?)", (NOW,))
    old.commit()
    old.close()
    for _ in range(2):
        led = CostLedger(path)
        names = {r[1] for r in led.db.execute("PRAGMA index_list(cost_ledger)")}
        assert "cost_ledger_tenant" in names and "cost_ledger_bucket" not in names, names
        assert led.cursors() == {"s-0-0": NOW}
        got = led.query("tenant", NOW - 3600, tenant="t2")
        assert [ln.key for ln in got] == ["t2"]
        assert got[0].dollars == pytest.approx(sum(c.dollars for c in charges() if c.tenant == "t2"))
        assert "USING INDEX cost_ledger_tenant" in plan(path, last_select(traced))
        led.close()


class Stall:
    """A progress handler on every connection the ledger opens: the first read that runs while armed waits inside
    SQLite (holding whatever the read holds) until `release` is set, or STALL_S."""

    def __init__(self, monkeypatch) -> None:
        self.armed = False
        self.stalled = threading.Event()
        self.release = threading.Event()
        connect = sqlite3.connect

        def stalling(*a, **kw):
            db = connect(*a, **kw)
            db.set_progress_handler(self._tick, 100)
            return db
        monkeypatch.setattr(L.sqlite3, "connect", stalling)

    def _tick(self) -> int:
        if self.armed:
            self.armed = False
            self.stalled.set()
            self.release.wait(STALL_S)
        return 0


def test_a_long_read_does_not_hold_up_a_write(tmp_path, monkeypatch):
    """The ledger's query ran on its one connection under the lock its writes take: a write waited for the whole
    scan of a long window. Now a read runs on a reader connection of its own (WAL: a writer commits while a
    reader holds its snapshot): the write lands while the read is inside SQLite, and the read answers what was
    there when it began."""
    stall = Stall(monkeypatch)
    led = CostLedger(str(tmp_path / "h.db"))
    led.write(charges(tenants=2), {}, set())
    order, out = [], []

    def read():
        out.extend(led.query("tenant", NOW - 3600))
        order.append("read")
    stall.armed = True
    t = threading.Thread(target=read)
    t.start()
    assert stall.stalled.wait(60)
    led.write(charges(tenants=3, at=NOW - 200), {"s-0-0": NOW}, set())
    order.append("write")
    stall.release.set()
    t.join(60)
    assert order == ["write", "read"]
    assert {ln.key for ln in out} == {"t0", "t1"}                       # its snapshot: before the write
    assert {ln.key for ln in led.query("tenant", NOW - 3600)} == {"t0", "t1", "t2"}
    assert led.cursors() == {"s-0-0": NOW}


def test_getcost_over_a_long_window_does_not_hold_up_the_accounting(tmp_path, monkeypatch):
    """GetCost's read ran on the accountant's one worker thread: the next accounting's write queued behind the
    whole scan. Now reads have threads of their own: an accounting completes while a GetCost is inside SQLite."""
    from controlplane.state.fleet import Fleet
    from gpumesh.v1 import types_pb2

    stall = Stall(monkeypatch)
    fleet = Fleet()
    s = types_pb2.Slice(id="s1", tenant="t1", node="n1", gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                        profile="1g.10gb", memory_bytes=10 * 2**30)
    s.created_at.FromSeconds(int(NOW - 600))
    fleet.slices["s1"] = s
    clock = [NOW]
    led = CostLedger(str(tmp_path / "h.db"))
    led.write(charges(), {}, set())
    a = CostAccountant(SimpleNamespace(fleet=fleet), None, led, PriceTable.parse(["H100-80GB=2.40"]),
                       interval=10, clock=lambda: clock[0])
    svc = S.CostService(a, None)
    order: list[str] = []

    async def go():
        loop = asyncio.get_running_loop()
        stall.armed = True
        q = asyncio.create_task(S.CostService.GetCost.__wrapped__(svc, C.GetCostRequest(by="slice",
                                                                                         since_seconds=3600), None))
        assert await loop.run_in_executor(None, stall.stalled.wait, 60)
        acct = asyncio.create_task(a.account())
        for task, name in ((acct, "accounted"), (q, "answered")):
            task.add_done_callback(lambda _t, n=name: order.append(n))
        await asyncio.wait({acct}, timeout=STALL_S / 2)
        stall.release.set()
        await acct
        out = await q
        await a.stop()
        return out
    out = asyncio.run(go())
    assert order == ["accounted", "answered"]
    assert len(out.lines) == 20                          # its snapshot: before the accounting's write
    assert CostLedger(str(tmp_path / "h.db")).cursors() == {"s1": NOW}

"""GetCost's answer limit bounds the work: the ledger stops reading once the query has more groups than one
answer holds (counted through an instrumented reader connection of the ledger), the refusal is the one it always was
(INVALID_ARGUMENT naming since_seconds and how to narrow the query), and building a large answer lets the
control plane's event loop serve other work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from types import SimpleNamespace

import pytest

from controlplane.cost import service as S
from controlplane.cost.ledger import CostLedger
from gpumesh.v1 import cost_service_pb2 as C
from mesh import errors
from mesh.cost import accounting as acc

NOW = 100_000.0


class Counting:
    """A sqlite3 connection whose query results count the rows read from them."""

    def __init__(self, db) -> None:
        self.db = db
        self.rows = 0

    def execute(self, *a):
        return _Cursor(self.db.execute(*a), self)

    def __getattr__(self, name):
        return getattr(self.db, name)


class _Cursor:
    def __init__(self, cur, owner: Counting) -> None:
        self.cur, self.owner = cur, owner

    def __iter__(self):
        for row in self.cur:
            self.owner.rows += 1
            yield row

    def fetchall(self):
        rows = self.cur.fetchall()
        self.owner.rows += len(rows)
        return rows

    def fetchone(self):
        row = self.cur.fetchone()
        self.owner.rows += row is not None
        return row

    def fetchmany(self, n=1):
        rows = self.cur.fetchmany(n)
        self.owner.rows += len(rows)
        return rows


def ledger(tmp_path, slices: int) -> CostLedger:
    """`slices` slices of two tenants, each charged for three minutes, busy and idle."""
    led = CostLedger(str(tmp_path / "h.db"))
    charges = []
    for i in range(slices):
        f = acc.SliceFacts(f"s-{i:05d}", f"t{i % 2}", "n1", "H100-80GB", 0.125, 2.40, 0.0)
        for m in range(3):
            c = acc.charge(f, NOW - 600 + 60 * m, NOW - 540 + 60 * m)
            charges.append(c if m else dataclasses.replace(c, category=acc.IDLE_WARM))
    led.write(charges, {}, set())
    return led


def service(led: CostLedger, runs: list | None = None) -> S.CostService:
    pool = concurrent.futures.ThreadPoolExecutor(1)

    async def _run(fn, *args):
        out = await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        if runs is not None:
            runs.append("query returned")
        return out
    accountant = SimpleNamespace(ledger=led, clock=lambda: NOW, interval=10.0, read=_run,
                                 rates_by=lambda by, tenant=None: {},
                                 slice_rates={})
    return S.CostService(accountant, None)


def get_cost(svc, **kw) -> C.GetCostResponse:
    return asyncio.run(S.CostService.GetCost.__wrapped__(svc, C.GetCostRequest(**kw), None))


def test_past_the_limit_the_ledger_reads_at_most_limit_plus_one_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "MAX_LINES", 100)
    led = ledger(tmp_path, 1000)
    counting = Counting(led._open_reader())
    monkeypatch.setattr(led, "_open_reader", lambda: counting)        # the connection queries read on
    with pytest.raises(errors.InvalidArgument) as e:
        get_cost(service(led), by="slice", since_seconds=3600)
    assert e.value.field == "since_seconds"
    assert "more than one answer holds" in str(e.value) and "a shorter window or a coarser `by`" in e.value.allowed
    assert "at most 100 lines" in e.value.allowed
    assert 0 < counting.rows <= 101


def test_within_the_limit_the_answer_is_whole_and_sorted(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "MAX_LINES", 1000)
    led = ledger(tmp_path, 300)
    got = get_cost(service(led), by="slice", since_seconds=3600)
    assert len(got.lines) == 300
    want = led.query("slice", NOW - 3600)
    assert [(ln.key, round(ln.dollars, 9)) for ln in got.lines] == [(ln.key, round(ln.dollars, 9)) for ln in want]
    assert all(ln.idle_warm_dollars > 0 and ln.idle_warm_dollars < ln.dollars for ln in got.lines)
    by_tenant = get_cost(service(led), by="tenant", since_seconds=3600)
    assert [ln.key for ln in by_tenant.lines] == ["t0", "t1"] or [ln.key for ln in by_tenant.lines] == ["t1", "t0"]
    assert by_tenant.total.dollars == pytest.approx(got.total.dollars)


def test_a_large_answer_is_built_letting_other_work_run(tmp_path, monkeypatch):
    """After the ledger's thread answers, the lines become the response a chunk at a time, yielding the event
    loop between chunks: another task makes progress while it is built (before, the whole build ran at once)."""
    monkeypatch.setattr(S, "MAX_LINES", 50_000)
    led = ledger(tmp_path, 3000)
    runs: list = []

    async def main():
        svc = service(led, runs)
        done = asyncio.Event()

        async def other():
            while not done.is_set():
                runs.append("other")
                await asyncio.sleep(0)
        t = asyncio.create_task(other())
        out = await S.CostService.GetCost.__wrapped__(svc, C.GetCostRequest(by="slice", since_seconds=3600), None)
        runs.append("answered")
        done.set()
        await t
        return out
    out = asyncio.run(main())
    assert len(out.lines) == 3000
    between = runs[runs.index("query returned"):runs.index("answered")]
    assert "other" in between

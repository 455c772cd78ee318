"""The cost ledger: charges per slice and minute, in SQLite beside the history store (`history.db` under the
control plane's state dir), with each live slice's cursor (how far it has been charged) in the same
transaction.

A flush writes the interval's charges and the cursors together, so a restart resumes every slice that still
exists from its last flushed cursor: the time the control plane was down is charged on the first
accounting after it, and at most one flush of charges of slices released meanwhile is lost.

Rows older than `raw_keep` seconds are folded into hourly buckets; rows older than `keep` are dropped.

Blocking (sqlite3). Writes (`write`, `compact`, `cursors`) go through one connection under a lock, from the
accountant's worker thread; `query` reads on a reader connection of its own (WAL: readers and the writer do not
wait for each other), so a GetCost summing a long window never holds up an accounting's write.

Plans (EXPLAIN QUERY PLAN, tests/unit/test_cost_ledger_reads.py): the fleet's sums search the window by the primary
key's leading `bucket`; one tenant's by the (tenant, bucket) index, that tenant's rows only. The index is added to
a ledger file of an earlier release when it is opened (`_migrate`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from mesh.cost.accounting import BUSY, CATEGORIES, GROUPS, IDLE_REPLICA, IDLE_WARM, Charge
from mesh.logs import log

logger = logging.getLogger(__name__)

BUCKET = 60.0
HOUR = 3600.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_ledger (
    bucket REAL NOT NULL, slice TEXT NOT NULL, category TEXT NOT NULL, tenant TEXT NOT NULL,
    deployment TEXT NOT NULL, model TEXT NOT NULL, node TEXT NOT NULL, gpu_model TEXT NOT NULL,
    seconds REAL NOT NULL, gpu_seconds REAL NOT NULL, dollars REAL NOT NULL, tokens REAL NOT NULL,
    PRIMARY KEY (bucket, slice, category)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cost_cursor (slice TEXT PRIMARY KEY, t REAL NOT NULL) WITHOUT ROWID;
"""
# Run at every open, idempotent: a ledger file of an earlier release gains the tenant index (one tenant's query
# searches its own rows) and loses the (bucket) index, a copy of the primary key's order that only cost writes.
INDEXES = """
CREATE INDEX IF NOT EXISTS cost_ledger_tenant ON cost_ledger (tenant, bucket);
DROP INDEX IF EXISTS cost_ledger_bucket;
"""
_ADD = """INSERT INTO cost_ledger (bucket, slice, category, tenant, deployment, model, node, gpu_model, seconds,
              gpu_seconds, dollars, tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
          ON CONFLICT (bucket, slice, category) DO UPDATE SET seconds = seconds + excluded.seconds,
              gpu_seconds = gpu_seconds + excluded.gpu_seconds, dollars = dollars + excluded.dollars,
              tokens = tokens + excluded.tokens"""


@dataclass
class Line:
    """One group's sums over a window."""

    key: str
    dollars: float = 0.0
    idle_warm_dollars: float = 0.0
    idle_replica_dollars: float = 0.0
    slice_seconds: float = 0.0
    gpu_seconds: float = 0.0
    tokens: float = 0.0
    categories: dict = field(default_factory=dict)


class CostLedger:
    def __init__(self, path: str, raw_keep: float = 86400.0, keep: float = 400 * 86400.0) -> None:
        self.path = path
        self.raw_keep = raw_keep
        self.keep = keep
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()
        self._readers: list[sqlite3.Connection] = []     # idle reader connections
        self._readers_lock = threading.Lock()
        self._closed = False

    def _migrate(self) -> None:
        have = {r[1] for r in self.db.execute("PRAGMA index_list(cost_ledger)")}
        if "cost_ledger_tenant" in have and "cost_ledger_bucket" not in have:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(None, (x.strip() for x in INDEXES.split(";"))):
                self.db.execute(stmt)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        log(logger, logging.INFO, "cost ledger: index added", path=self.path, index="cost_ledger_tenant (tenant, "
            "bucket)", dropped=sorted(have & {"cost_ledger_bucket"}))

    def _open_reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA query_only=1")
        return db

    @contextmanager
    def _reader(self):
        """An idle reader connection (or a new one) for one query; put back after it, closed if the ledger was."""
        with self._readers_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the cost ledger is closed")
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = self._open_reader()
        try:
            yield db
        finally:
            with self._readers_lock:
                if self._closed:
                    db.close()
                else:
                    self._readers.append(db)

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()
        with self._lock:
            self.db.close()

    def cursors(self) -> dict[str, float]:
        with self._lock:
            return dict(self.db.execute("SELECT slice, t FROM cost_cursor").fetchall())

    def write(self, charges: list[Charge], cursors: dict[str, float], gone: set[str]) -> int:
        """The charges, the live slices' cursors and the removal of released slices' cursors, in one
        transaction."""
        rows = [(float(int(c.end // BUCKET) * BUCKET), c.slice_id, c.category, c.tenant, c.deployment, c.model,
                 c.node, c.gpu_model, c.seconds, c.gpu_seconds, c.dollars, c.tokens) for c in charges]
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany(_ADD, rows)
                self.db.executemany("INSERT OR REPLACE INTO cost_cursor (slice, t) VALUES (?, ?)", cursors.items())
                self.db.executemany("DELETE FROM cost_cursor WHERE slice = ?", [(s,) for s in gone])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return len(rows)

    def compact(self, now: float) -> None:
        """Fold minute rows older than raw_keep into hourly ones; drop rows older than keep."""
        cutoff = (now - self.raw_keep) // HOUR * HOUR
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.execute(
                    """CREATE TEMP TABLE IF NOT EXISTS folded AS SELECT * FROM cost_ledger WHERE 0""")
                self.db.execute("DELETE FROM folded")
                self.db.execute(
                    """INSERT INTO folded SELECT CAST(bucket / ? AS INTEGER) * ?, slice, category, tenant, deployment,
                       model, node, gpu_model, SUM(seconds), SUM(gpu_seconds), SUM(dollars), SUM(tokens)
                       FROM cost_ledger WHERE bucket < ? AND bucket != CAST(bucket / ? AS INTEGER) * ?
                       GROUP BY CAST(bucket / ? AS INTEGER), slice, category""",
                    (HOUR, HOUR, cutoff, HOUR, HOUR, HOUR))
                self.db.execute("DELETE FROM cost_ledger WHERE bucket < ? AND "
                                "bucket != CAST(bucket / ? AS INTEGER) * ?",
                                (cutoff, HOUR, HOUR))
                self.db.execute(_ADD.replace("VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                             "SELECT * FROM folded WHERE 1"))
                self.db.execute("DELETE FROM cost_ledger WHERE bucket < ?", (now - self.keep,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def query(self, by: str, since: float, until: float | None = None, tenant: str | None = None,
              max_lines: int | None = None) -> list[Line]:
        """Sums per group of charges that ended in [since, until) (to the minute; older rows to the hour),
        of one tenant's slices when `tenant` is not None, highest dollars first. With `max_lines`, at most
        max_lines + 1 groups are read: more than max_lines lines means the query had more (the caller refuses
        it) and the rest were never read. On a reader connection: it holds nothing a write waits for."""
        if by not in GROUPS:
            raise ValueError(f"by: {by!r} is not one of {', '.join(GROUPS)}")
        q, args = _select(by, since, until, tenant, max_lines)
        lines: list[Line] = []
        with self._reader() as db:
            for key, dollars, seconds, gpu_seconds, tokens, *per in db.execute(q, args):
                cats = {c: d for c, d in zip(CATEGORIES, per) if d is not None}
                lines.append(Line(key, dollars, cats.get(IDLE_WARM, 0.0), cats.get(IDLE_REPLICA, 0.0),
                                  seconds, gpu_seconds, tokens, cats))
        return sorted(lines, key=lambda ln: (-ln.dollars, ln.key))


def _select(by: str, since: float, until: float | None, tenant: str | None, max_lines: int | None) -> tuple[str, tuple]:
    """The SQL of `query` and its arguments. Only the terms that apply are written (`tenant = ?` as a plain term, so
    one tenant's query searches the tenant index), and the grouping column is `+col`: without it SQLite walks the
    whole (tenant, bucket) index, every row the ledger keeps, to group by tenant without a sort."""
    per_category = ", ".join("SUM(CASE WHEN category = ? THEN dollars END)" for _ in CATEGORIES)
    where, args = ["bucket >= ?"], [since // BUCKET * BUCKET]
    if until is not None:
        where.append("bucket < ?")
        args.append(until)
    if tenant is not None:
        where.append("tenant = ?")
        args.append(tenant)
    q = (f"SELECT {by}, SUM(dollars), SUM(seconds), SUM(gpu_seconds), SUM(tokens), {per_category} "
         f"FROM cost_ledger WHERE {' AND '.join(where)} GROUP BY +{by}")
    if max_lines is not None:
        q += " LIMIT ?"
        args.append(max_lines + 1)
    return q, (*CATEGORIES, *args)


__all__ = ["BUCKET", "BUSY", "CATEGORIES", "CostLedger", "Line"]

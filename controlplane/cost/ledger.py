"""The cost ledger: charges per slice and minute, in SQLite beside the history store (`history.db` under the
control plane's state dir), with each live slice's cursor (how far it has been charged) in the same
transaction.

A flush writes the interval's charges and the cursors together, so a restart resumes every slice that still
exists from its last flushed cursor: the time the control plane was down is charged on the first
accounting after it, and at most one flush of charges of slices released meanwhile is lost.

Rows older than `raw_keep` seconds are folded into hourly buckets; rows older than `keep` are dropped.
Blocking (sqlite3): the accountant calls it from one worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field

from mesh.cost.accounting import BUSY, CATEGORIES, GROUPS, IDLE_REPLICA, IDLE_WARM, Charge

BUCKET = 60.0
HOUR = 3600.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_ledger (
    bucket REAL NOT NULL, slice TEXT NOT NULL, category TEXT NOT NULL, tenant TEXT NOT NULL,
    deployment TEXT NOT NULL, model TEXT NOT NULL, node TEXT NOT NULL, gpu_model TEXT NOT NULL,
    seconds REAL NOT NULL, gpu_seconds REAL NOT NULL, dollars REAL NOT NULL, tokens REAL NOT NULL,
    PRIMARY KEY (bucket, slice, category)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cost_ledger_bucket ON cost_ledger (bucket);
CREATE TABLE IF NOT EXISTS cost_cursor (slice TEXT PRIMARY KEY, t REAL NOT NULL) WITHOUT ROWID;
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

    def close(self) -> None:
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
        it) and the rest were never read."""
        if by not in GROUPS:
            raise ValueError(f"by: {by!r} is not one of {', '.join(GROUPS)}")
        col = "slice" if by == "slice" else by
        per_category = ", ".join("SUM(CASE WHEN category = ? THEN dollars END)" for _ in CATEGORIES)
        q = (f"SELECT {col}, SUM(dollars), SUM(seconds), SUM(gpu_seconds), SUM(tokens), {per_category} "
             "FROM cost_ledger "
             "WHERE bucket >= ? AND (? IS NULL OR bucket < ?) AND (? IS NULL OR tenant = ?) "
             f"GROUP BY {col}" + ("" if max_lines is None else " LIMIT ?"))
        limit = () if max_lines is None else (max_lines + 1,)
        args = (*CATEGORIES, since // BUCKET * BUCKET, until, until, tenant, tenant, *limit)
        lines: list[Line] = []
        with self._lock:
            for key, dollars, seconds, gpu_seconds, tokens, *per in self.db.execute(q, args):
                cats = {c: d for c, d in zip(CATEGORIES, per) if d is not None}
                lines.append(Line(key, dollars, cats.get(IDLE_WARM, 0.0), cats.get(IDLE_REPLICA, 0.0),
                                  seconds, gpu_seconds, tokens, cats))
        return sorted(lines, key=lambda ln: (-ln.dollars, ln.key))


__all__ = ["BUCKET", "BUSY", "CATEGORIES", "CostLedger", "Line"]

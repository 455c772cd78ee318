"""Seed 000's interaction log in the history database: per workload, its application context (the labels
the client gave: `app-type`, `phase`, all of them), the hardware it ran on (fingerprint) and when, with
its resource use over time kept as the history's `workload/<id>` series (utilization, memory_used).

Bounded: `expire(now, keep, max_entries)` drops entries that ended (or were last seen) more than `keep`
seconds ago and, past `max_entries`, the oldest; their use series age out with the history's tiers.
Blocking (sqlite3): called on the history's thread, sharing the store's connection and lock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from controlplane.forecast.fleet_series import Interaction
from controlplane.forecast.history import HistoryStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    workload TEXT PRIMARY KEY, tenant TEXT NOT NULL, app_type TEXT NOT NULL, phase TEXT NOT NULL,
    labels TEXT NOT NULL, fingerprint TEXT NOT NULL, node TEXT NOT NULL, slice TEXT NOT NULL,
    state TEXT NOT NULL, started REAL NOT NULL, ended REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS interactions_app ON interactions (app_type, started);
"""
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Query:
    app_type: str = ""
    tenant: str | None = None       # None: every tenant
    workload: str = ""
    since: float = 0.0              # entries started at or after
    limit: int = 100
    max_samples: int = 120          # use samples per entry at most (evenly thinned); 0: none read


class InteractionLog:
    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        with store._lock:
            store.db.executescript(SCHEMA)

    def upsert(self, entries: list[Interaction]) -> int:
        """Insert or update entries by workload ID (an empty fingerprint field never overwrites a known one)."""
        if not entries:
            return 0
        with self.store._lock:
            db = self.store.db
            db.execute("BEGIN")
            try:
                for e in entries:
                    old = db.execute("SELECT fingerprint FROM interactions WHERE workload=?", (e.workload,)).fetchone()
                    row = list(e.row())
                    if old:
                        fp = json.loads(old[0])
                        fp.update({k: v for k, v in e.fingerprint.items() if v not in ("", None)})
                        row[5] = json.dumps(fp, sort_keys=True)
                    db.execute("INSERT OR REPLACE INTO interactions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return len(entries)

    def expire(self, now: float, keep: float, max_entries: int = MAX_ENTRIES) -> int:
        """Drop entries that ended or were last updated before now - keep, then the oldest past max_entries."""
        with self.store._lock:
            db = self.store.db
            n = db.execute("DELETE FROM interactions WHERE MAX(ended, updated) < ?", (now - keep,)).rowcount
            n += db.execute("DELETE FROM interactions WHERE workload IN (SELECT workload FROM interactions "
                            "ORDER BY started DESC LIMIT -1 OFFSET ?)", (max_entries,)).rowcount
        return n

    def list(self, q: Query) -> list[Interaction]:
        """Entries matching `q`, newest first, each with its use samples (thinned to q.max_samples)."""
        sql = ("SELECT * FROM interactions WHERE (? = '' OR app_type = ?) AND (? IS NULL OR tenant = ?) "
               "AND (? = '' OR workload = ?) AND started >= ? ORDER BY started DESC, workload LIMIT ?")
        with self.store._lock:
            rows = self.store.db.execute(sql, (q.app_type, q.app_type, q.tenant, q.tenant, q.workload, q.workload,
                                               q.since, q.limit)).fetchall()
        out = []
        for r in rows:
            e = Interaction(workload=r[0], tenant=r[1], app_type=r[2], phase=r[3], labels=json.loads(r[4]),
                            fingerprint=json.loads(r[5]), node=r[6], slice_id=r[7], state=r[8], started=r[9],
                            ended=r[10], updated=r[11])
            if q.max_samples:
                e.usage = thin(self.usage(e.workload), q.max_samples)
            out.append(e)
        return out

    def usage(self, workload: str) -> list[tuple[float, float, float]]:
        """(t, utilization, memory_used) of a workload, oldest first (a metric missing at t is NaN)."""
        util = dict(self.store.read("workload", workload, "utilization"))
        mem = dict(self.store.read("workload", workload, "memory_used"))
        return [(t, util.get(t, float("nan")), mem.get(t, float("nan"))) for t in sorted(set(util) | set(mem))]

    def app_types(self) -> dict[str, int]:
        with self.store._lock:
            return dict(self.store.db.execute(
                "SELECT app_type, COUNT(*) FROM interactions GROUP BY app_type ORDER BY app_type").fetchall())


def thin(rows: list, n: int) -> list:
    """At most n rows, evenly spaced, the first and last kept."""
    if len(rows) <= n or n <= 0:
        return rows
    if n == 1:
        return [rows[-1]]
    step = (len(rows) - 1) / (n - 1)
    return [rows[round(i * step)] for i in range(n)]

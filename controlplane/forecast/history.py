"""The embedded history store: time series of what the control plane sees, in SQLite under its state dir.

A series is (kind, name, metric): kind one of KINDS (gpu `node/index`, slice, node, deployment, tenant,
fleet), plus the tenant that owns it ("" for the fleet's own series, which only admins and viewers read).
Samples age through tiers (`Tier`: a resolution and how long samples are kept at it): the first tier keeps
raw samples; each later one keeps means over buckets of its resolution, weighted by how many raw samples
each mean stands for. `compact(now)` folds samples older than a tier's retention into the next tier and
drops what is older than the last tier's retention, so the file stays bounded.

Blocking (sqlite3): the recorder (controlplane/forecast/recorder.py) calls it from one worker thread.
WAL journal, one transaction per batch: a crash loses at most the samples not yet flushed.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from dataclasses import dataclass

from mesh.config import ConfigError

KINDS = ("gpu", "slice", "node", "workload", "deployment", "tenant", "fleet")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_duration(text: str, field: str) -> float:
    """`90s`, `1m`, `1h`, `30d` -> seconds, or ConfigError naming `field`."""
    m = _DURATION.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{field}: {text!r} is not a duration (a positive number with s, m, h or d: 90s, 1h, 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Tier:
    resolution: float      # seconds per bucket; 0 = raw samples
    keep: float            # seconds samples stay in this tier


DEFAULT_TIERS = ("raw:1h", "1m:1d", "10m:30d")


def parse_tiers(specs, field: str = "history_tiers") -> tuple[Tier, ...]:
    """["raw:1h", "1m:1d", "10m:30d"] -> tiers; the first raw, resolutions increasing (each a multiple of
    the one before), every retention longer than its resolution."""
    specs = list(specs)
    if not specs:
        raise ConfigError(f"{field}: at least one tier (RESOLUTION:KEEP, the first raw: raw:1h)")
    tiers = []
    for i, spec in enumerate(specs):
        res_s, sep, keep_s = str(spec).partition(":")
        if not sep:
            raise ConfigError(f"{field}: {spec!r} is not RESOLUTION:KEEP (raw:1h, 1m:1d, 10m:30d)")
        if i == 0:
            if res_s.strip() != "raw":
                raise ConfigError(f"{field}: the first tier must keep raw samples (raw:KEEP), got {spec!r}")
            res = 0.0
        else:
            res = parse_duration(res_s, field)
        keep = parse_duration(keep_s, field)
        if res and keep <= res:
            raise ConfigError(f"{field}: {spec!r} keeps samples for less than one bucket of its resolution")
        if tiers and tiers[-1].resolution and (res <= tiers[-1].resolution
                                               or not math.isclose(res / tiers[-1].resolution,
                                                                   round(res / tiers[-1].resolution))):
            raise ConfigError(f"{field}: {spec!r}: each tier's resolution must be a larger multiple of the one "
                              f"before ({tiers[-1].resolution:g}s)")
        tiers.append(Tier(res, keep))
    return tuple(tiers)


SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, metric TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '', UNIQUE (kind, name, metric));
CREATE TABLE IF NOT EXISTS samples (
    series INTEGER NOT NULL, tier INTEGER NOT NULL, t REAL NOT NULL, v REAL NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (series, tier, t)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SeriesInfo:
    kind: str
    name: str
    metric: str
    tenant: str
    count: int
    first: float
    last: float


class HistoryStore:
    def __init__(self, path: str, tiers: tuple[Tier, ...] = parse_tiers(DEFAULT_TIERS)) -> None:
        self.path = path
        self.tiers = tiers
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._ids: dict[tuple[str, str, str], tuple[int, str]] = {}     # -> (id, owner)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _id(self, kind: str, name: str, metric: str, tenant: str) -> tuple[int, bool]:
        """The series' id, and whether its samples were dropped now. Its owner becomes `tenant` when that changed
        (a warm slice, carved for no tenant, keeps its id when a tenant claims it: its series stayed the fleet's,
        read by every viewer and not by the tenant whose slice it is). A series that leaves a tenant's hands (a
        deployment's name taken by another tenant's, a slice given back to the warm pool) loses the samples of
        that tenant's, which its new owner may not read."""
        key = (kind, name, metric)
        got = self._ids.get(key)
        if got is None:
            self.db.execute("INSERT OR IGNORE INTO series (kind, name, metric, tenant) VALUES (?, ?, ?, ?)",
                            (kind, name, metric, tenant))
            got = tuple(self.db.execute("SELECT id, tenant FROM series WHERE kind=? AND name=? AND metric=?",
                                        key).fetchone())
        dropped = False
        if got[1] != tenant:
            if got[1]:
                self.db.execute("DELETE FROM samples WHERE series=?", (got[0],))
                dropped = True
            self.db.execute("UPDATE series SET tenant=? WHERE id=?", (tenant, got[0]))
            got = (got[0], tenant)
        self._ids[key] = got
        return got[0], dropped

    def write(self, samples) -> int:
        """samples: iterable of (kind, name, metric, tenant, t, v), stored raw in one transaction.
        A second sample of a series at the same time replaces the first."""
        return self._insert(samples, "INSERT OR REPLACE INTO samples (series, tier, t, v, n) VALUES (?, 0, ?, ?, 1)")

    def add_counts(self, samples) -> int:
        """`write`, adding each value to the one stored at that time (a count of part of a minute, written by a
        control plane that stopped or started within it)."""
        return self._insert(samples, "INSERT INTO samples (series, tier, t, v, n) VALUES (?, 0, ?, ?, 1) "
                                     "ON CONFLICT (series, tier, t) DO UPDATE SET v = samples.v + excluded.v")

    def _insert(self, samples, sql: str) -> int:
        """The finite samples' rows through `sql`, in one transaction (the series ids it made are forgotten when
        it rolls back)."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                rows = []
                for k, n, m, tn, t, v in samples:
                    if not math.isfinite(v):
                        continue
                    sid, dropped = self._id(k, n, m, tn)
                    if dropped:         # the earlier owner's rows of this batch go too
                        rows = [r for r in rows if r[0] != sid]
                    rows.append((sid, float(t), float(v)))
                self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                self._ids.clear()
                raise
        return len(rows)

    def compact(self, now: float) -> None:
        """Fold samples past each tier's retention into the next tier's buckets; drop what ages out of the last."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                for i, tier in enumerate(self.tiers):
                    cutoff = now - tier.keep
                    if i + 1 < len(self.tiers):
                        res = self.tiers[i + 1].resolution
                        cutoff = math.floor(cutoff / res) * res         # whole buckets only
                        self.db.execute(
                            """INSERT INTO samples (series, tier, t, v, n)
                               SELECT series, ?, CAST(t / ? AS INTEGER) * ?, SUM(v * n) / SUM(n), SUM(n)
                               FROM samples WHERE tier = ? AND t < ? GROUP BY series, CAST(t / ? AS INTEGER)
                               ON CONFLICT (series, tier, t) DO UPDATE SET
                                 v = (samples.v * samples.n + excluded.v * excluded.n) / (samples.n + excluded.n),
                                 n = samples.n + excluded.n""",
                            (i + 1, res, res, i, cutoff, res))
                    self.db.execute("DELETE FROM samples WHERE tier = ? AND t < ?", (i, cutoff))
                self.db.execute("DELETE FROM series WHERE id NOT IN (SELECT DISTINCT series FROM samples)")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._ids.clear()

    def find(self, kind: str, name: str, metric: str) -> tuple[int, str] | None:
        """(series id, tenant) or None."""
        with self._lock:
            row = self.db.execute("SELECT id, tenant FROM series WHERE kind=? AND name=? AND metric=?",
                                  (kind, name, metric)).fetchone()
        return (row[0], row[1]) if row else None

    def read(self, kind: str, name: str, metric: str, since: float = 0.0) -> list[tuple[float, float]]:
        """[(time, value)] oldest first, every tier merged (older parts at coarser resolution)."""
        with self._lock:
            return self.db.execute(
                """SELECT s.t, s.v FROM samples s JOIN series x ON x.id = s.series
                   WHERE x.kind=? AND x.name=? AND x.metric=? AND s.t >= ? ORDER BY s.t""",
                (kind, name, metric, since)).fetchall()

    def tail(self, kind: str, name: str, metric: str, seconds: float,
             since: float = 0.0) -> list[tuple[float, float]]:
        """`read` of the samples within `seconds` of the series' last one (all of it when shorter), none before
        `since`."""
        with self._lock:
            return self.db.execute(
                """SELECT s.t, s.v FROM samples s JOIN series x ON x.id = s.series
                   WHERE x.kind=? AND x.name=? AND x.metric=? AND s.t >= ?
                     AND s.t >= (SELECT MAX(t) FROM samples WHERE series = x.id) - ? ORDER BY s.t""",
                (kind, name, metric, since, seconds)).fetchall()

    def tier_counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self.db.execute("SELECT tier, COUNT(*) FROM samples GROUP BY tier").fetchall())

    def list(self, kind: str = "", tenant: str | None = None,
             since: dict[tuple[str, str], float] | None = None) -> list[SeriesInfo]:
        """Every series (of `kind`, of `tenant` when not None) with its sample count and time span. `since`:
        (kind, name) -> a time the series of that object start at (a deployment's creation: what its name's
        series hold from before is an earlier deployment's); one with no sample from then is not listed."""
        q = ("SELECT x.kind, x.name, x.metric, x.tenant, COUNT(*), MIN(s.t), MAX(s.t) FROM series x "
             "JOIN samples s ON s.series = x.id WHERE (? = '' OR x.kind = ?) AND (? IS NULL OR x.tenant = ?) "
             "GROUP BY x.id ORDER BY x.kind, x.name, x.metric")
        since = since or {}
        out = []
        with self._lock:
            for r in self.db.execute(q, (kind, kind, tenant, tenant)).fetchall():
                start = since.get((r[0], r[1]), 0.0)
                if start > r[5]:
                    n, first, last = self.db.execute(
                        "SELECT COUNT(*), MIN(s.t), MAX(s.t) FROM samples s JOIN series x ON x.id = s.series "
                        "WHERE x.kind=? AND x.name=? AND x.metric=? AND s.t >= ?", (*r[:3], start)).fetchone()
                    if not n:
                        continue
                    r = (*r[:4], n, first, last)
                out.append(SeriesInfo(*r))
        return out

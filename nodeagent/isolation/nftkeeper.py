"""Keeps the agent's nftables tables as it applied them: the workloads' egress guard (egress.py) and the
isolated workloads' bridge firewall (bridge.py).

Both are tables the agent applies once, and the host's own firewall tooling may take them away: reloading
`nftables.service` runs the distribution's `/etc/nftables.conf`, whose first line is `flush ruleset`, and
`nft flush ruleset` / `nft delete table` by hand do the same. Without its table the guard fails open (a
tenant's workload reaches etcd; an isolated workload reaches every service of the host). So the agent keeps
what it applied: after applying a table it records how nftables lists it, and each `check` (before an
isolated workload's attach, and every `CHECK_INTERVAL_S` seconds on a thread of the agent process) lists it
again; a table that is gone or listed differently (a rule deleted, a chain flushed) is applied again from
its script, with a WARNING naming the table. Metrics: `gpumesh_agent_firewall_intact{table}` (1 when the
last check found the table as applied, 0 when it had to apply it again or could not) and
`gpumesh_agent_firewall_reapplied_total{table}`.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Callable

from mesh.logs import log
from nodeagent.metrics import FIREWALL_INTACT, FIREWALL_REAPPLIED

logger = logging.getLogger(__name__)
CHECK_INTERVAL_S = 10.0
_COUNTERS = re.compile(r"counter packets \d+ bytes \d+")


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    return subprocess.run([nft, *args], input=script, capture_output=True, text=True, timeout=30)


def listing(table: str) -> str | None:
    """How nftables lists `inet <table>` now (counters' values left out), None when it is not there."""
    try:
        p = _nft("list", "table", "inet", table)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _COUNTERS.sub("counter", p.stdout).strip() if p.returncode == 0 else None


class TableKeeper:
    """The tables one agent process keeps (`watch`), checked on demand (`check`) and on a timer."""

    def __init__(self, interval: float = CHECK_INTERVAL_S) -> None:
        self.interval = interval
        self._tables: dict[str, tuple[Callable[[], str], str]] = {}     # table -> (its script, its listing)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, table: str, script: Callable[[], str]) -> None:
        """Keep `table`, which the caller has just applied with `script()` (the script replaces the table
        atomically: `table inet T` / `delete table inet T` / the table)."""
        seen = listing(table)
        with self._lock:
            self._tables[table] = (script, seen or "")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="nft-keeper")
                self._thread.start()
        FIREWALL_INTACT.labels(table=table).set(1 if seen else 0)

    def forget(self, table: str) -> None:
        with self._lock:
            self._tables.pop(table, None)

    def watching(self, table: str) -> bool:
        with self._lock:
            return table in self._tables

    def check(self, table: str) -> bool:
        """True when `table` is as applied (or not kept); else it is applied again and the answer is False
        (when that fails too, an ERROR is logged and the metric stays 0)."""
        with self._lock:
            entry = self._tables.get(table)
        if entry is None:
            return True
        script, expected = entry
        now = listing(table)
        if now is not None and now == expected:
            FIREWALL_INTACT.labels(table=table).set(1)
            return True
        p = None
        try:
            p = _nft("-f", "-", script=script())
        except (OSError, subprocess.TimeoutExpired) as e:
            err = str(e)
        else:
            err = p.stderr.strip() if p.returncode else ""
        FIREWALL_INTACT.labels(table=table).set(0)
        if err:
            log(logger, logging.ERROR, "nftables table of the workloads' confinement is gone and cannot be applied "
                "again: workloads are not confined by it", table=table, error=err)
            return False
        FIREWALL_REAPPLIED.labels(table=table).inc()
        with self._lock:
            if table in self._tables:
                self._tables[table] = (script, listing(table) or "")
        log(logger, logging.WARNING, "nftables table of the workloads' confinement was "
            + ("missing" if now is None else "changed") + " (an nftables reload or `flush ruleset`?): applied again",
            table=table)
        return False

    def check_all(self) -> None:
        with self._lock:
            tables = list(self._tables)
        for t in tables:
            self.check(t)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_all()
            except Exception as e:        # noqa: BLE001 - the keeper must outlive one bad check
                log(logger, logging.ERROR, "nftables keeper: check failed", error=str(e))

    def stop(self) -> None:
        self._stop.set()


KEEPER = TableKeeper()        # the agent process's

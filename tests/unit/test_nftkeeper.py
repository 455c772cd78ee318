"""The agent keeps its nftables tables (nodeagent/isolation/nftkeeper.py): the workloads' egress guard,
taken away by an nftables reload (`flush ruleset`) or by hand, is applied again by the agent process's keeper
without anything else happening, with a WARNING; the isolated workloads' bridge table is tested in
test_workload_bridge.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest

from nodeagent.isolation import egress
from nodeagent.isolation.nftkeeper import KEEPER
from nodeagent.isolation.setup import egress_guard
from nodeagent.isolation.users import TenantUsers


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "nftables needs root"
    return "" if shutil.which("nft") else "nft not installed"


def _table(table: str) -> str | None:
    p = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_the_egress_guard_is_applied_again_after_it_was_deleted(tmp_path, caplog):
    from prometheus_client import REGISTRY
    cfg = SimpleNamespace(workload_egress_deny="local:2379,10.9.0.0/16:80", metrics_listen="", state_dir=str(tmp_path))
    host = SimpleNamespace(users=TenantUsers((300000, 300100), {}, str(tmp_path / "ids.json")))
    table = egress.table_name(str(tmp_path))
    caplog.set_level("WARNING")
    try:
        assert egress_guard(cfg, host) == "guarded"
        applied = _table(table)
        assert applied and "dport 2379" in applied
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)      # as `flush ruleset` does
        deadline = time.monotonic() + 180       # the keeper's timer (CHECK_INTERVAL_S), however slow the host
        while _table(table) is None:
            assert time.monotonic() < deadline, "the egress guard was not applied again"
            time.sleep(0.1)
        assert _table(table) == applied
        # the keeper logs and counts after it applied the table: wait for the line too
        while not any(r.levelname == "WARNING" and "applied again" in r.getMessage()
                      and r.fields.get("table") == table for r in caplog.records):
            assert time.monotonic() < deadline, "no WARNING that the egress guard was applied again"
            time.sleep(0.1)
        while REGISTRY.get_sample_value("gpumesh_agent_firewall_reapplied_total", {"table": table}) != 1:
            assert time.monotonic() < deadline, "the re-application was not counted"
            time.sleep(0.1)
        assert REGISTRY.get_sample_value("gpumesh_agent_firewall_reapplied_total", {"table": table}) == 1
    finally:
        KEEPER.forget(table)
        egress.remove(str(tmp_path))


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_an_agent_starting_deletes_the_guards_whose_state_directory_is_gone(tmp_path, monkeypatch):
    """`gone` is gone for this process's sweep only: the directory stays, so an agent starting meanwhile elsewhere
    on the host (another test worker's) leaves its guard alone and the sweep here is the one that deletes it."""
    endpoints = egress.parse("local:2379")
    gone, live, bare = tmp_path / "gone-agent", tmp_path / "live-agent", tmp_path / "old-agent"
    for d in (gone, live, bare):
        d.mkdir()
    uids = [(300000, 300100)]
    try:
        egress.install(str(gone), uids, endpoints)
        egress.install(str(live), uids, endpoints)
        # a guard made before tables named their state directory: no comment, never judged
        bare_table = egress.table_name(str(bare))
        subprocess.run(["nft", "-f", "-"], input=egress.ruleset(bare_table, uids, endpoints), text=True,
                       check=True)
        bare.rmdir()
        real_stat, gone_path = os.stat, str(gone.resolve())

        def stat_(p, *a, **kw):
            if str(p) == gone_path:
                raise FileNotFoundError(2, "No such file or directory", str(p))
            return real_stat(p, *a, **kw)
        monkeypatch.setattr(os, "stat", stat_)
        swept = egress.sweep_orphans()
        assert (egress.table_name(str(gone)), str(gone.resolve())) in swept
        assert _table(egress.table_name(str(gone))) is None
        assert _table(egress.table_name(str(live))) is not None
        assert _table(bare_table) is not None
        assert all(t != egress.table_name(str(live)) for t, _ in egress.sweep_orphans())
        # a guard of an agent in another mount namespace (a container sharing the host's network): its directory
        # is nothing this process can see, so it is never judged gone
        other = egress.table_name(str(tmp_path / "elsewhere"))
        script = egress.ruleset(other, uids, endpoints, str(tmp_path / "elsewhere"))
        assert f"mnt={egress.mount_namespace()} " in script
        subprocess.run(["nft", "-f", "-"], text=True, check=True,
                       input=script.replace(f"mnt={egress.mount_namespace()} ", "mnt=1 "))
        assert all(t != other for t, _ in egress.sweep_orphans())
        assert _table(other) is not None
        subprocess.run(["nft", "delete", "table", "inet", other], check=True)
    finally:
        for d in (gone, live, bare):
            egress.remove(str(d))


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_a_guard_whose_state_directory_cannot_be_looked_into_is_kept(tmp_path, monkeypatch):
    """A state directory this process may not stat (EACCES: another user's 0700 home, NFS with root squashed) may
    belong to an agent running now: its guard is what keeps that agent's tenants off etcd, so it stays. Before,
    `os.path.isdir` said False for it and the sweep deleted a live agent's guard."""
    endpoints = egress.parse("local:2379")
    hidden = tmp_path / "hidden-agent"
    hidden.mkdir()
    real_stat, hidden_path = os.stat, str(hidden.resolve())

    def stat_(p, *a, **kw):
        if str(p) == hidden_path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *a, **kw)
    try:
        egress.install(str(hidden), [(300000, 300100)], endpoints)
        monkeypatch.setattr(os, "stat", stat_)
        assert all(t != egress.table_name(str(hidden)) for t, _ in egress.sweep_orphans())
        assert _table(egress.table_name(str(hidden))) is not None
    finally:
        monkeypatch.undo()
        egress.remove(str(hidden))

"""The embedded etcd compacts its history (without it the database grows with every heartbeat and event until
etcd refuses writes), and the control plane's alive watch survives a compaction: a watch cannot resume from a
compacted revision, so it re-reads the leases and marks lost the nodes whose key went while it was away."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.config import ControlPlaneConfig
from controlplane.controllers.nodes import NodeManager
from controlplane.state import keys
from controlplane.state.etcdconn import ETCD_ERRORS
from controlplane.state.etcdserver import EtcdServer
from controlplane.state.store import EtcdStore
from mesh.config import ConfigError


def test_the_embedded_etcd_compacts_periodically_unless_told_not_to(tmp_path):
    cmd = EtcdServer(tmp_path / "a").command()
    i = cmd.index("--auto-compaction-retention")
    assert cmd[i + 1] == "1h" and cmd[cmd.index("--auto-compaction-mode") + 1] == "periodic"
    assert "--auto-compaction-retention" not in EtcdServer(tmp_path / "b", compaction_retention="").command()


@pytest.mark.parametrize("value,ok", [("30m", True), ("2h30m", True), ("24", True), ("", True),
                                      ("1 hour", False), ("-1h", False), ("h", False)])
def test_the_retention_is_validated_naming_the_option(tmp_path, value, ok):
    cfg = ControlPlaneConfig(state_dir=str(tmp_path / "cp"), insecure=True, etcd_compaction_retention=value)
    if ok:
        cfg.check()
    else:
        with pytest.raises(ConfigError, match="etcd_compaction_retention"):
            cfg.check()


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd of this test's own: compacting the session's shared one would cut other tests' watches."""
    server = EtcdServer(tmp_path / "data", fast=True).start()
    yield server
    server.stop()


class _Node:
    def __init__(self):
        self.ready, self.lease_id = True, 1
        self.record = SimpleNamespace(message="")


@pytest.mark.asyncio
async def test_the_alive_watch_rereads_the_leases_after_a_compaction(own_etcd):
    store = EtcdStore([own_etcd.endpoint])
    await store.connect()
    try:
        for name in ("n1", "n2"):
            await store.client.put(keys.alive(name), b"1")
        old = (await store.client.get_prefix(b"/")).header.revision
        await store.client.delete(keys.alive("n2"))        # n2's lease ends while nobody watches
        for i in range(3):
            await store.client.put(b"/gpumesh/other", str(i).encode())
        now = (await store.client.get_prefix(b"/")).header.revision
        await store.client.compact(now)
        with pytest.raises(ETCD_ERRORS):                               # resuming is impossible now
            async for _ in await store.watch_prefix(keys.ALIVE, old + 1):
                break
        lost: list[str] = []
        fleet = SimpleNamespace(nodes={"n1": _Node(), "n2": _Node()})

        async def mark_node_lost(name, why):
            lost.append(name)
        ctl = SimpleNamespace(fleet=fleet, store=store, sessions={}, mark_node_lost=mark_node_lost,
                              recorder=SimpleNamespace(emit=lambda *a, **k: None))
        start = await NodeManager(ctl)._relist_alive()
        assert start == now + 1
        assert lost == ["n2"] and not fleet.nodes["n2"].ready and fleet.nodes["n1"].ready
        # and the watch from there sees what happens next
        watch = await store.watch_prefix(keys.ALIVE, start)
        await store.client.delete(keys.alive("n1"))
        async def first():
            async for ev in watch:
                return ev
        ev = await asyncio.wait_for(first(), 30)
        assert ev.kind == "DELETE" and keys.name_of(ev.kv.key, keys.ALIVE) == "n1"
        await watch.cancel()
    finally:
        await store.close()

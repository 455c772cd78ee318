"""`meshctl bench alloc` for real, briefly: its own cluster with etcd on disk, on tmpfs and secured
(TLS, mTLS agents, tokens), and a running secured cluster through the usual credential flags."""

from __future__ import annotations

import json

import pytest

from tools.meshctl import bench_cluster
from tools.meshctl.main import main

pytestmark = pytest.mark.integration
HAS_SHM = bench_cluster.shm_dir() is not None

FIELDS = {"allocations", "allocations_per_s", "p50_ms", "p99_ms", "errors", "etcd_storage", "etcd_data_dir",
          "etcd_fs", "tls", "token", "hosts", "gpus"}


@pytest.mark.parametrize("flags,storage,secure", [([], "disk", False), (["--tmpfs"], "tmpfs", False),
                                                   (["--secure"], "disk", True)])
def test_short_real_run(capsys, flags, storage, secure):
    if "--tmpfs" in flags and not HAS_SHM:
        pytest.skip("no writable /dev/shm here")
    assert main(["bench", "alloc", "--sim-hosts", "2", "--gpus-per-host", "2", "--clients", "2",
                 "--duration", "1", "-o", "json", *flags]) == 0
    r = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(r)
    assert r["etcd_storage"] == storage and r["tls"] is secure and r["token"] is secure
    assert r["allocations"] > 0 and r["errors"] == {}, r


def test_against_a_running_secured_cluster(tmp_path, capsys):
    from tests.integration import secure
    from tools.localcluster import sim_hosts
    c = secure.start(tmp_path, sim_hosts(2, 2))
    try:
        base = ["bench", "alloc", "--endpoint", c.endpoint, "--clients", "2", "--duration", "1", "-o", "json"]
        assert main(base + ["--ca", str(c.tls_dir / "ca.crt"), "--token", secure.TOKENS["team-b"],
                            "--tenant", "team-b"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["allocations"] > 0 and r["errors"] == {} and r["tls"] and r["token"], r
        assert main(base + ["--ca", str(c.tls_dir / "ca.crt"), "--token", secure.TOKENS["team-a"],
                            "--tenant", "team-b"]) == 0   # another tenant's name: every call refused
        r = json.loads(capsys.readouterr().out)
        assert r["allocations"] == 0 and set(r["errors"]) == {"PERMISSION_DENIED"}, r
    finally:
        c.stop()

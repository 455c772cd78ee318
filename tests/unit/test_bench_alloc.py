"""`meshctl bench alloc`'s options: etcd's data on disk by default (--tmpfs as before), the facts the JSON
reports, and a secured cluster (--secure, or a running one with the usual TLS/token flags). The short
real runs: tests/integration/test_bench_alloc.py."""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from controlplane.api.tenantsfile import load_tenants
from tools.meshctl import bench_cluster
from tools.meshctl.bench_cluster import BenchCluster, fs_type
from tools.meshctl.common import CliError
from tools.meshctl.main import build_parser

HAS_SHM = bench_cluster.shm_dir() is not None


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "alloc", *argv])


def test_defaults_keep_etcd_on_disk_without_security():
    a = parse()
    assert (a.tmpfs, a.data_dir, a.secure, a.tenant) == (False, None, False, None)
    a = parse("--tmpfs", "--secure", "--data-dir", "/x", "--tenant", "team-a")
    assert (a.tmpfs, a.data_dir, a.secure, a.tenant) == (True, "/x", True, "team-a")


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm here")
def test_fs_type_tells_tmpfs_from_disk(tmp_path):
    assert fs_type("/dev/shm") == "tmpfs"
    assert fs_type("/dev/shm/does/not/exist") == "tmpfs"
    assert fs_type("/") != ""   # whatever / is, /proc/mounts names its type


def _storage(*argv: str) -> BenchCluster:
    bc = BenchCluster(parse(*argv))
    bc._storage()
    return bc


def _disk_dir(tmp_path) -> str:
    if fs_type(tmp_path) == "tmpfs":
        pytest.skip("tmp_path is on a tmpfs here: no disk directory to test with")
    return str(tmp_path)


def test_default_puts_the_state_dir_on_disk_and_says_so(tmp_path):
    bc = _storage("--data-dir", _disk_dir(tmp_path))
    try:
        assert bc.state_dir.startswith(str(tmp_path))
        assert bc.facts["etcd_storage"] == "disk" and bc.facts["etcd_fs"] not in ("", "tmpfs")
        assert bc.facts["etcd_data_dir"] == os.path.join(bc.state_dir, "controlplane", "etcd")
        if HAS_SHM:   # only the simulated GPUs' state files (hardware stand-ins) stay on tmpfs
            assert os.path.islink(os.path.join(bc.state_dir, "agents"))
            assert bc.facts["sim_state_fs"] == "tmpfs"
    finally:
        bc.stop()
    assert not os.path.exists(bc.state_dir) and not (bc.shm_state and os.path.exists(bc.shm_state))


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm here")
def test_tmpfs_flag_keeps_the_old_behaviour():
    bc = _storage("--tmpfs")
    try:
        assert bc.state_dir.startswith("/dev/shm/")
        assert bc.facts["etcd_storage"] == "tmpfs" and bc.facts["etcd_fs"] == "tmpfs"
    finally:
        bc.stop()


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm here")
def test_a_tmpfs_data_dir_is_refused_without_the_flag():
    with pytest.raises(CliError, match="--data-dir: /dev/shm is a tmpfs, not a disk"):
        _storage("--data-dir", "/dev/shm")


def test_secure_writes_a_tenants_file_with_a_token_per_client_tenant(tmp_path):
    args = parse("--secure", "--clients", "3", "--data-dir", str(tmp_path))
    bc = BenchCluster(args, state_dir=str(tmp_path))
    kw = bc._security()
    tenants = load_tenants(kw["tenants_file"])           # the control plane's own reader accepts it
    assert stat.S_IMODE(os.stat(kw["tenants_file"]).st_mode) == 0o600
    assert bc.tenants == ["bench-000", "bench-001", "bench-002"] and set(tenants.quotas) == set(bc.tenants)
    assert len({c.token for c in bc.client_creds}) == 3 and bc.admin.token not in {c.token for c in bc.client_creds}
    assert all(c.tls and c.ca.endswith("ca.crt") for c in bc.client_creds)
    assert bc.facts["tls"] and bc.facts["token"]


def test_secure_needs_one_host_per_agent_process():
    with pytest.raises(CliError, match="--agents-per-process must be 1"):
        BenchCluster.start(parse("--secure", "--agents-per-process", "2"))


def test_an_existing_cluster_takes_the_usual_credentials_not_the_start_flags(tmp_path):
    args = parse("--endpoint", "127.0.0.1:1", "--ca", "ca.crt", "--token", "t0k", "--tenant", "team-a")
    bc = BenchCluster.existing(args, "127.0.0.1:1")
    assert bc.admin.auth() == {"ca": "ca.crt", "token": "t0k"} and bc.tenants == ["team-a"] * args.clients
    assert bc.facts["etcd_storage"].startswith("unknown") and bc.facts["tls"] and bc.facts["token"]
    with pytest.raises(CliError, match="--secure, --tmpfs and --data-dir are for the cluster bench alloc starts"):
        BenchCluster.existing(parse("--endpoint", "127.0.0.1:1", "--tmpfs"), "127.0.0.1:1")


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm here")
def test_default_data_dir_passes_over_a_tmpfs_tmpdir(monkeypatch):
    monkeypatch.setenv("TMPDIR", "/dev/shm")
    d = bench_cluster.default_data_dir()
    assert fs_type(d) != "tmpfs"

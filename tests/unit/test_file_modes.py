"""The modes of what the agent, the control plane and the local cluster write (mesh/fsmodes.py): their user's
alone (0700/0600) whatever the umask, 0711 where a tenant's uid passes through to its own directory, 0755
where tenants' processes must enter (MPS pipes, cgroups that `criu restore` checks as the tenant).
tests/integration/test_isolation_files.py attacks the same files from another tenant's workload."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from mesh import fsmodes
from nodeagent import mps
from nodeagent.isolation import cgroups as cg
from nodeagent.isolation.plan import IsolationRefused
from tests.unit.test_checkpoint_store_auth import KEY, store
from tests.unit.test_isolation_units import _isolator, _workload, root_only


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def tree_modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): mode(p) for p in [root, *root.rglob("*")]}


@pytest.fixture
def server():
    from mesh.checkpoint.transfer import TransferServer
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


@pytest.mark.parametrize("key", [KEY, None], ids=["sealed", "plain"])
def test_a_stored_checkpoint_is_the_agents_alone_whatever_the_umask(server, tmp_path, key):
    """Before: the checkpoint directory 0755 and its manifest and entry files 0644 under the usual umask."""
    with umask(0o022):
        path = Path(store(server, tmp_path, "ta", "ck-1", key=key))
    assert (path / "manifest.json").is_file() and list((path / "data").iterdir())
    modes = tree_modes(path)
    assert all(m == 0o700 for p, m in modes.items() if (path / p).is_dir()), modes
    assert all(m == 0o600 for p, m in modes.items() if (path / p).is_file()), modes


def test_the_agent_makes_its_state_dir_a_passage_and_its_checkpoint_store_private(tmp_path):
    """An existing store (0755, a 0644 checkpoint of an older agent inside) is closed at start; the state directory
    lets tenants pass through to their own workload directories but list nothing."""
    from nodeagent.config import AgentConfig
    from nodeagent.isolation.setup import isolation_host
    state, store_dir = tmp_path / "state", tmp_path / "store"
    (store_dir / "ta" / "w" / "ck-old").mkdir(parents=True)
    (store_dir / "ta" / "w" / "ck-old" / "manifest.json").write_text("{}")
    os.chmod(store_dir, 0o755)
    state.mkdir(mode=0o755)
    keys = tmp_path / "keys.yaml"
    keys.write_text("ta: x\n")
    cfg = AgentConfig(state_dir=str(state), checkpoint_dir=str(store_dir), checkpoint_keys_file=str(keys))
    host = isolation_host(cfg)
    assert mode(state) == 0o711 and mode(store_dir) == 0o700
    assert str(keys) in host.settings.secret_files
    fresh = tmp_path / "fresh-store"
    isolation_host(AgentConfig(state_dir=str(state), checkpoint_dir=str(fresh)))
    assert mode(fresh) == 0o700                  # made at start, not later under someone's umask


@root_only
def test_a_criu_workload_is_refused_while_a_key_of_the_agents_is_readable_by_every_user(tmp_path):
    """Without a mount namespace a `gpumesh.io/isolation=criu` workload sees the host's files with its uid's
    permissions: a world-readable checkpoint keys file (or TLS key) would give it every tenant's key."""
    (tmp_path / "state").mkdir()
    keys = tmp_path / "keys.yaml"
    keys.write_text("ta: x\n")
    os.chmod(keys, 0o644)
    iso = _isolator(tmp_path)
    iso.settings.secret_files = [str(keys)]
    criu = _workload(**{"gpumesh.io/isolation": "criu"})
    with pytest.raises(IsolationRefused, match=r"keys.yaml .*readable by every user.*chmod 600"):
        iso.plan(criu, None, gpu_index=0, gi_id=None, ci_id=None, workdir=str(tmp_path / "w"))
    ns = iso.plan(_workload(), None, gpu_index=0, gi_id=None, ci_id=None, workdir=str(tmp_path / "w"))
    assert ns.spec["namespaces"]          # a namespaced workload runs: the file is hidden from it (the mask)
    os.chmod(keys, 0o600)
    ok = iso.plan(criu, None, gpu_index=0, gi_id=None, ci_id=None, workdir=str(tmp_path / "w"))
    assert ok.spec["namespaces"] == []


def test_mps_pipe_and_log_directories_stay_open_to_clients_under_the_agents_umask(tmp_path):
    """The daemon's clients are every tenant's workloads: the pipe and log directories 0755 as before, the GPU's
    directory above them a passage."""
    pipe, log = tmp_path / "mps" / "0" / "pipe", tmp_path / "mps" / "0" / "log"
    with umask(fsmodes.PRIVATE_UMASK):
        mps.SimMps().start(0, str(pipe), str(log))
    assert mode(pipe) == 0o755 and mode(log) == 0o755 and mode(pipe.parent) == 0o711
    assert mode(pipe / "sim-mps.json") == 0o600          # the stand-in daemon's own state


def test_cgroup_directories_are_0755_under_the_agents_umask(tmp_path):
    """`criu restore` (real uid: the tenant's) checks the workload's cgroup directories with access(2)."""
    d = tmp_path / "pids" / "gpumesh" / "n1" / "w-1"
    with umask(fsmodes.PRIVATE_UMASK):
        cg._makedirs(str(d))
        cg._makedirs(str(d))           # again: nothing to do
    assert [mode(p) for p in (d, d.parent, d.parent.parent)] == [0o755] * 3


def test_the_agent_and_the_control_plane_run_with_a_private_umask(monkeypatch):
    from controlplane import main as cp_main
    from nodeagent import main as agent_main
    for main in (agent_main.main, cp_main.main):
        with umask(0o022):
            assert main(["--log-level", "no-such-level"]) == 2          # refused at configuration, after the umask
            assert os.umask(0o022) == fsmodes.PRIVATE_UMASK


def test_the_local_clusters_files_are_private_and_agents_a_passage(tmp_path):
    """Before: logs, host files, cluster.json 0644 in 0755 directories of a state directory anyone could list."""
    from tools.localcluster import LocalCluster
    with umask(0o022):
        c = LocalCluster(tmp_path / "mesh", [{"node": "n1", "gpus": [{"model": "H100-80GB", "count": 1}]}])
        c.save_state()
        agents, logs = c._dir("agents"), c._dir("logs")
    assert mode(c.state_dir) == 0o711 and mode(agents) == 0o711 and mode(logs) == 0o700
    assert mode(c.state_dir / "hosts") == 0o700 and mode(c.state_dir / "hosts" / "n1.yaml") == 0o600
    assert mode(c.state_dir / "cluster.json") == 0o600


def test_fsmodes_change_only_this_users_directories_and_never_a_sticky_one(tmp_path):
    sticky = tmp_path / "shared"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    assert not fsmodes.set_dir_mode(sticky, 0o711) and mode(sticky) == 0o1777
    leaf = fsmodes.passage(tmp_path / "top", tmp_path / "top" / "a" / "b")
    assert [mode(p) for p in (tmp_path / "top", tmp_path / "top" / "a", Path(leaf))] == [0o711] * 3
    with pytest.raises(ValueError, match="not below"):
        fsmodes.passage(tmp_path / "top", tmp_path / "elsewhere")
    src = tmp_path / "src.log"
    src.write_bytes(b"x" * 3000)
    os.chmod(src, 0o644)
    with umask(0):
        fsmodes.copy_private(src, tmp_path / "dst.log")
    assert (tmp_path / "dst.log").read_bytes() == b"x" * 3000 and mode(tmp_path / "dst.log") == 0o600
    os.symlink(src, tmp_path / "link")
    with pytest.raises(OSError):
        fsmodes.private_file(tmp_path / "link")          # never written through a link
    assert fsmodes.others_may_read(src) and not fsmodes.others_may_read(tmp_path / "dst.log")

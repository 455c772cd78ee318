"""A transparent (CRIU) restore on another host makes the workload's working directory as a fresh start makes the
workload's own directory: owned by the tenant's uid and gid, mode 0700, below passages (0711). CRIU restores the
working directory by the path it had on the source, and the target host may keep its state elsewhere; the target
made that path as root (0700 under the agent's umask), so the restored process, which runs as the tenant's uid,
could not use its own working directory.

Both "hosts" are this one: the source's runner directory is one this (target) agent does not have (another state
directory), and a stand-in for `criu restore --restore-detached --pidfile` starts a detached `sleep`."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh.checkpoint.criu import LOG_ENTRY
from nodeagent import workloads as wl
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers
from nodeagent.migrate import MigrationAgent
from nodeagent.migrate_base import Job
from tests.unit._shims import kill_shims

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the restored workload runs as a tenant's uid: root")


@pytest.fixture
def hosts():
    """A directory the tenant's uid may pass through (pytest's own are root's alone), as a host's state dir."""
    d = tempfile.mkdtemp(prefix="gpumesh-restore-")
    os.chmod(d, 0o711)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def target(tmp_path, hosts):
    umask = os.umask(0o077)            # the agent's (nodeagent/main.py)
    agent = types.SimpleNamespace(node="n-b", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                                  claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()), slicer=object())
    agent.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY)}
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")), None,
                   NvidiaDevices(str(tmp_path), str(tmp_path / "mig")), node="n-b", scope=str(tmp_path))
    r = wl.WorkloadRunner(agent, str(hosts / "host-b" / "workloads"), isolator=iso)
    m = MigrationAgent(agent, r)
    try:
        yield m, r
    finally:
        pid = r.workloads["w-1"].pid if "w-1" in r.workloads else 0
        kill_shims(r)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.umask(umask)


@root_only
@pytest.mark.parametrize("below", ["", "data/run"])
def test_a_restore_on_another_host_makes_the_working_directory_the_tenants(target, hosts, tmp_path, monkeypatch,
                                                                           below):
    m, r = target
    source_workdir = str(hosts / "host-a" / "workloads" / "w-1.d")      # the source's state directory
    cwd = os.path.join(source_workdir, below) if below else source_workdir
    assert not os.path.exists(hosts / "host-a")
    images = tmp_path / "images"
    images.mkdir()
    (images / LOG_ENTRY).write_bytes(b"before the move\n")
    pidfile = str(images / "restored.pid")
    restore = [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(['sleep', '30'], "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
               "open(sys.argv[1], 'w').write(str(p.pid))", pidfile]
    monkeypatch.setattr(m, "_restore_argv", lambda images, log_key, leave_stopped: (restore, pidfile))
    m.jobs[("m-1", "target")] = Job("m-1", "w-1", server=object())      # its receiver is listening
    ident = r.isolator.users.identity("acme")
    spec = t.Workload(id="w-1", slice_id="s-1", tenant="acme", command=["python", "loop.py"],
                      labels={"gpumesh.io/isolation": "criu"})
    answer = m._restore_target(spec, "m-1", images, {"log_key": "x", "cwd": cwd, "workdir": source_workdir,
                                                     "uid": ident.uid})
    assert answer["pid"] > 0 and r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING, r.workloads["w-1"].message
    for d in ([source_workdir, cwd] if below else [cwd]):
        st = os.stat(d)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ident.uid, ident.gid, 0o700), d
    for d in (hosts / "host-a", hosts / "host-a" / "workloads"):     # like the state dir: passages
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o711, d
    # the restored process, as the tenant's uid, works in its working directory (by its absolute path too)
    probe = subprocess.run(["/bin/sh", "-c", 'cd "$1" && echo ok > out.txt && ls', "sh", cwd],
                           user=ident.uid, group=ident.gid, extra_groups=[], capture_output=True, text=True, cwd="/")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["out.txt"]

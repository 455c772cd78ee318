"""What the node agent's workload runner takes from outside and acts on as root: a tenant's environment
never names a file the agent moves (the migration target's transfer secret), and the secret is handed
over without following anything the tenant left in its directory."""

from __future__ import annotations

import os
import signal
import types

import pytest

from controlplane.controllers.workloads import validate_run
from gpumesh.v1 import node_service_pb2, workload_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, new_secret, read_secret_file, write_secret_file
from nodeagent import workloads as wl
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers
from nodeagent.workload_confine import SECRET_FILE_NAME

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to a tenant's uid needs root")


def fake_agent():
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()), slicer=object())
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    return a


@pytest.fixture
def runner(tmp_path):
    """The real runner, confining its workloads with the real Isolator (permissive: no namespaces or
    cgroups needed on this host), tenants under uids 310000-310010."""
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True), TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   None, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(fake_agent(), str(tmp_path / "w"), isolator=iso)
    yield r
    for meta in r.meta.values():            # every shim the test started
        if meta.get("shim_pid"):
            try:
                os.killpg(meta["shim_pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _victim(path, text=b"root:$6$secret-hash:19000::::::\n"):
    path.write_bytes(text)
    os.chmod(path, 0o600)
    return path


def _spec(wid="w-1", **env):
    return t.Workload(id=wid, slice_id="s-1", tenant="ta", command=["sleep", "30"], env=env)


@root_only
def test_a_tenants_environment_cannot_make_the_agent_move_a_file_to_it(runner, tmp_path):
    victim = _victim(tmp_path / "shadow")
    w = runner.start(_spec(**{SECRET_FILE_ENV: str(victim)}))
    workdir = runner.path(w.id, "d")
    assert victim.read_bytes().startswith(b"root:") and os.stat(victim).st_uid == 0
    assert not os.path.lexists(os.path.join(workdir, SECRET_FILE_NAME))


@root_only
def test_the_agents_secret_is_handed_over_without_following_a_link_the_tenant_left(runner, tmp_path):
    victim = _victim(tmp_path / "shadow")
    wid = "w-2"
    workdir = runner.path(wid, "d")
    os.makedirs(workdir)
    os.symlink(victim, os.path.join(workdir, SECRET_FILE_NAME))     # left by an earlier run of the tenant
    secret = new_secret()
    src = write_secret_file(runner.path(wid, "transfer-secret"), secret)
    w = runner.start(_spec(wid), secret_file=src)
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    uid = runner.meta[wid]["uid"]
    dst = os.path.join(workdir, SECRET_FILE_NAME)
    st = os.lstat(dst)
    assert not os.path.islink(dst) and st.st_uid == uid and st.st_mode & 0o777 == 0o600
    assert read_secret_file(dst, remove=False) == secret
    assert not os.path.exists(src)                                       # moved, not copied
    assert victim.read_bytes().startswith(b"root:") and os.stat(victim).st_uid == 0


def test_run_refuses_the_variables_the_agent_sets():
    for name in (SECRET_FILE_ENV, "GPUMESH_CHECKPOINT_SOCKET"):
        req = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", command=["x"], env={name: "/etc/shadow"})
        with pytest.raises(errors.InvalidArgument) as e:
            validate_run(req)
        assert e.value.field == f"env[{name}]"

"""What the node agent's workload runner takes from outside and acts on as root: a tenant's environment
never names a file the agent moves (the migration target's transfer secret), and the secret is handed
over without following anything the tenant left in its directory; IDs from the control plane never
name a file, directory or cgroup outside the agent's own (nodeagent/ids.py)."""

from __future__ import annotations

import asyncio
import os
import types

import pytest

from controlplane.controllers.workloads import validate_run
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, workload_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, new_secret, read_secret_file, write_secret_file
from nodeagent import workloads as wl
from nodeagent.ids import BadId, check_id
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationRefused, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers
from nodeagent.migrate import MigrationAgent
from nodeagent.workload_confine import SECRET_FILE_NAME
from tests.unit._shims import kill_shims
from tests.unit._fake_cgroups import StepRemoval

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
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   None, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(fake_agent(), str(tmp_path / "w"), isolator=iso)
    yield r
    kill_shims(r)


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


def test_run_bounds_the_number_of_variables_and_labels():
    ok = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", command=["x"], env={f"V{i}": "1" for i in range(256)},
                                                 labels={f"l{i}": "" for i in range(64)})
    validate_run(ok)
    for field, req in (("env", workload_service_pb2.RunWorkloadRequest(slice_id="s-1", command=["x"],
                                                                        env={f"V{i}": "1" for i in range(257)})),
                       ("labels", workload_service_pb2.RunWorkloadRequest(slice_id="s-1", command=["x"],
                                                                           labels={f"l{i}": "" for i in range(65)}))):
        with pytest.raises(errors.InvalidArgument) as e:
            validate_run(req)
        assert e.value.field == field and "at most" in e.value.message


@pytest.mark.parametrize("value, ok", [
    ("w-3f2a9c", True), ("s-1", True), ("w-1~m-2", True), ("r1", True), ("a" * 128, True),
    ("../../system.slice/sshd.service", False), ("..", False), ("w-1..x", False), ("w/1", False),
    (".hidden", False), ("", False), ("w-1\n", False), ("a" * 129, False)])
def test_ids_the_agent_builds_paths_from(value, ok):
    if ok:
        assert check_id(value, "workload.id") == value
    else:
        with pytest.raises(BadId, match=r"workload.id: .* is not a valid ID \(allowed: "):
            check_id(value, "workload.id")


def _command(runner, cmd):
    q = asyncio.Queue()
    asyncio.run(runner.on_command(cmd, q))
    return [w for m in _drain(q) for w in m.workloads.workloads]


def _drain(q):
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


@root_only
def test_a_workload_id_or_slice_id_that_leaves_the_runners_directory_is_refused(runner, tmp_path):
    victim = _victim(tmp_path / "victim.log")
    (tmp_path / "victim.d").mkdir()
    (tmp_path / "victim.d" / "keep").write_text("x")
    bad = [t.Workload(id="../escaped", slice_id="s-1", tenant="ta", command=["sleep", "30"]),
           t.Workload(id="w-5", slice_id="../../s-1", tenant="ta", command=["sleep", "30"])]
    got = _command(runner, node_service_pb2.WorkloadCommand(start=bad, forget=["../victim"]))
    assert [(w.id, w.state) for w in got] == [(b.id, t.WORKLOAD_STATE_FAILED) for b in bad]
    assert "workload.id" in got[0].message and "workload.slice_id" in got[1].message
    assert not runner.workloads and not runner.meta
    assert set(os.listdir(tmp_path)) <= {"w", "ids.json", "shm", "victim.log", "victim.d"}   # nothing escaped
    assert victim.read_bytes().startswith(b"root:") and (tmp_path / "victim.d" / "keep").exists()
    assert os.listdir(runner.dir) == []


class FakeCgroups(StepRemoval):
    version, confines_devices = 1, True

    def __init__(self):
        self.touched: list[str] = []

    def create(self, name, limits):
        self.touched.append(name)
        return [f"/fake/{name}/cgroup.procs"]

    def remove(self, name):
        self.touched.append(name)


@root_only
def test_the_isolation_plan_never_names_a_cgroup_outside_the_agents(tmp_path):
    cgs = FakeCgroups()
    iso = Isolator(IsolationSettings(mode="permissive", shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True, namespaces=["mount"]),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")), cgs,
                   NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    for w in (t.Workload(id="../../system.slice/sshd.service", slice_id="s-1", tenant="ta"),
              t.Workload(id="w-1", slice_id="../../../etc", tenant="ta")):
        with pytest.raises(IsolationRefused, match="is not a valid ID"):
            iso.plan(w, None, gpu_index=-1, gi_id=None, ci_id=None, workdir=str(tmp_path / "wd"))
    assert cgs.touched == [] and not (tmp_path / "wd").exists()
    with pytest.raises(BadId):
        iso.slice_shm_dir("../x", 310000, 310000)


@root_only
def test_a_migration_command_with_an_id_that_leaves_the_runners_directory_is_refused(runner, tmp_path):
    victim = _victim(tmp_path / "victim.transfer-secret")
    ma = MigrationAgent(runner.agent, runner)
    q = asyncio.Queue()
    for cmd in (M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.STOP_TARGET, workload_id="w-1",
                                   alias="../victim"),
                M.MigrationCommand(migration_id="m-2", action=M.MigrationCommand.START_TARGET,
                                   workload=t.Workload(id="../victim", slice_id="s-1", tenant="ta", command=["true"]))):
        asyncio.run(ma.on_command(cmd, q))
    reports = [m.migration for m in _drain(q)]
    assert [(r.migration_id, r.event) for r in reports] == [("m-1", M.MigrationReport.FAILED),
                                                           ("m-2", M.MigrationReport.FAILED)]
    assert "alias: '../victim' is not a valid ID" in reports[0].message
    assert "workload.id: '../victim' is not a valid ID" in reports[1].message
    assert victim.read_bytes().startswith(b"root:") and not runner.workloads


def test_two_threads_saving_one_workloads_record_at_once_both_succeed(runner, monkeypatch):
    """A workload's start runs in a thread (it saves the record RUNNING) while the event loop saves the same
    record (a stop asked meanwhile): both wrote the one `<id>.json.tmp` and renamed it, so the second rename
    found no file (FileNotFoundError in the start thread: the workload's start lost) or renamed a file the other
    was still writing (a torn record, unreadable at the agent's next start). Each save is whole and one at a
    time; the record on disk is the last one saved."""
    import json
    import threading

    from nodeagent import workload_records
    runner.workloads["w-1"] = t.Workload(id="w-1", state=t.WORKLOAD_STATE_PENDING)
    real_dump, both_writing = json.dump, threading.Barrier(2, timeout=2)

    def slow_dump(doc, f):
        try:
            both_writing.wait()         # the two saves overlap (with one save at a time this times out: fine)
        except threading.BrokenBarrierError:
            pass
        real_dump(doc, f)
    monkeypatch.setattr(workload_records.json, "dump", slow_dump)
    errors_seen = []

    def save():
        try:
            runner.save("w-1")
        except Exception as e:  # noqa: BLE001 - asserted below
            errors_seen.append(e)
    threads = [threading.Thread(target=save) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert errors_seen == []
    with open(runner.path("w-1", "json"), encoding="utf-8") as f:
        assert json.load(f)["workload"]["id"] == "w-1"
    assert not os.path.exists(runner.path("w-1", "json.tmp"))

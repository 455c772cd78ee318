"""The pieces of workload confinement (nodeagent/isolation) and the MPS daemon's limits."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gpumesh.v1 import types_pb2
from mesh.config import ConfigError
from nodeagent import mps
from nodeagent.isolation import cgroups as cg
from nodeagent.isolation.devices import (NVIDIA_MAJOR, DeviceError, NvidiaDevices, make_sim_nodes,
                                         mig_minors_text, parse_mig_minors)
from nodeagent.isolation.plan import Isolator, IsolationRefused, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import Identity, IdentityError, TenantUsers, parse_map, parse_range
from tests.unit._fake_cgroups import StepRemoval

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")


def test_uid_range_and_map_are_validated():
    assert parse_range("200000-200010") == (200000, 200010)
    for bad in ("0-10", "10-5", "x", "5"):
        with pytest.raises(ConfigError, match="workload_uid_range"):
            parse_range(bad)
    assert parse_map("a=3000:3001, b=4000") == {"a": Identity(3000, 3001), "b": Identity(4000, 4000)}
    with pytest.raises(ConfigError, match="never root"):
        parse_map("a=0")


def test_tenants_get_distinct_ids_that_are_never_root_nor_the_agents_and_keep_them(tmp_path):
    state = str(tmp_path / "ids.json")
    users = TenantUsers((200000, 200002), {}, state, agent_uid=200000, agent_gid=200000)
    a, b = users.identity("a"), users.identity("b")
    assert a != b and 200000 not in (a.uid, b.uid) and 0 not in (a.uid, a.gid, b.uid, b.gid)
    again = TenantUsers((200000, 200002), {}, state, agent_uid=200000, agent_gid=200000)
    assert again.identity("a") == a                       # remembered across agent restarts
    assert oct(os.stat(state).st_mode & 0o777) == "0o600"
    with pytest.raises(IdentityError, match="exhausted"):
        again.identity("c")
    with pytest.raises(ConfigError, match="agent's own"):
        TenantUsers((1, 2), {"x": Identity(5, 5)}, state, agent_uid=5, agent_gid=5)


def test_mig_minors_numbering_matches_the_driver():
    caps = parse_mig_minors(mig_minors_text(2))
    assert caps["config"] == 1 and caps["monitor"] == 2
    assert caps["gpu0/gi0/access"] == 3 and caps["gpu0/gi0/ci0/access"] == 4 and caps["gpu0/gi1/access"] == 12
    assert caps["gpu1/gi0/access"] == 3 + 15 * 9


@root_only
def test_sim_device_nodes_are_character_devices_like_the_drivers(tmp_path):
    d = make_sim_nodes(str(tmp_path / "dev"), 2)
    st = os.stat(os.path.join(d, "nvidia1"))
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR and os.minor(st.st_rdev) == 1
    nodes = NvidiaDevices(d, os.path.join(d, "mig-minors")).for_slice(1, gi_id=1, ci_id=0)
    names = [n.name for n in nodes]
    assert names[:2] == ["nvidia1", "nvidiactl"] and "nvidia-uvm" in names
    g = parse_mig_minors(mig_minors_text(2))
    assert f"nvidia-caps/nvidia-cap{g['gpu1/gi1/access']}" in names
    assert f"nvidia-caps/nvidia-cap{g['gpu1/gi1/ci0/access']}" in names
    assert "nvidia0" not in names
    with pytest.raises(DeviceError, match="nvidia7"):
        NvidiaDevices(d, os.path.join(d, "mig-minors")).for_slice(7)


class FakeCgroups(StepRemoval):
    version, confines_devices = 1, True

    def __init__(self):
        self.made: dict[str, cg.Limits] = {}

    def create(self, name, limits):
        self.made[name] = limits
        return [f"/fake/{name}/cgroup.procs"]

    def remove(self, name):
        self.made.pop(name, None)

    def exists(self, name):
        return name in self.made


def _isolator(tmp_path, features=None, mode="secure", cgroups=None, shm_root=None):
    full = HostFeatures(setuid=True, no_new_privs=True, namespaces=["mount", "ipc", "pid"], cgroup_version=1,
                        cgroup_controllers=["memory", "cpu", "pids", "devices"], seccomp=True)
    users = TenantUsers((300000, 300010), {}, str(tmp_path / "ids.json"))
    dev = make_sim_nodes(str(tmp_path / "dev"), 2) if os.geteuid() == 0 else str(tmp_path)
    return Isolator(IsolationSettings(mode=mode, mask=[str(tmp_path / "state")],
                                      shm_root=shm_root or str(tmp_path / "shm")),
                    features or full, users, cgroups if cgroups is not None else FakeCgroups(),
                    NvidiaDevices(dev, os.path.join(dev, "mig-minors")), node="n1", scope=str(tmp_path))


def _workload(**labels):
    return types_pb2.Workload(id="w-1", slice_id="s-1", tenant="ta", command=["true"], labels=labels)


@root_only
def test_secure_mode_refuses_naming_what_the_host_lacks(tmp_path):
    weak = HostFeatures(setuid=False, no_new_privs=True, namespaces=[], cgroup_version=0)
    iso = _isolator(tmp_path, features=weak)
    with pytest.raises(IsolationRefused) as e:
        iso.plan(_workload(), None, gpu_index=0, gi_id=None, ci_id=None, workdir=str(tmp_path / "w"))
    assert "unprivileged uid" in str(e.value) and "memory cgroup" in str(e.value) and "device confinement" in str(e.value)


@root_only
def test_plan_limits_come_from_the_slice_and_the_request(tmp_path):
    cgs = FakeCgroups()
    (tmp_path / "state").mkdir()
    iso = _isolator(tmp_path, cgroups=cgs)
    s = types_pb2.Slice(id="s-1", tenant="ta", host_memory_bytes=1 << 30, cpu_milli=2000)
    plan = iso.plan(_workload(**{"gpumesh.io/memory-bytes": str(256 << 20)}), s, gpu_index=0, gi_id=0, ci_id=0,
                    workdir=str(tmp_path / "w"))
    limits = cgs.made["n1/w-1"]
    assert limits.memory_bytes == 256 << 20 and limits.cpu_milli == 2000 and limits.pids_max == 4096
    assert {d.name for d in limits.devices} >= {"nvidia0", "nvidiactl"}
    assert plan.uid >= 300000 and plan.spec["uid"] == plan.uid and plan.spec["namespaces"]
    assert str(tmp_path / "state") in plan.spec["mask"]
    assert os.stat(tmp_path / "w").st_uid == plan.uid and oct(os.stat(tmp_path / "w").st_mode & 0o777) == "0o700"
    with pytest.raises(IsolationRefused, match="gpumesh.io/memory-bytes: .* exceeds the host memory"):
        iso.plan(_workload(**{"gpumesh.io/memory-bytes": str(2 << 30)}), s, gpu_index=0, gi_id=None,
                 ci_id=None, workdir=str(tmp_path / "w"))
    with pytest.raises(IsolationRefused, match="gpumesh.io/pids"):
        iso.plan(_workload(**{"gpumesh.io/pids": "-1"}), s, gpu_index=0, gi_id=None, ci_id=None,
                 workdir=str(tmp_path / "w"))
    criu = iso.plan(_workload(**{"gpumesh.io/isolation": "criu"}), s, gpu_index=0, gi_id=None, ci_id=None,
                    workdir=str(tmp_path / "w"))
    assert criu.spec["namespaces"] == [] and criu.spec["cgroup_procs"]


@root_only
def test_a_model_servers_artifact_is_bound_read_only_into_its_workload(tmp_path):
    # the artifact may lie under /tmp, which the workload replaces with its own directory (a demo's or a
    # test's state dir); only a backend's own artifact is bound, read-only, and nothing for other workloads
    model = tmp_path / "models" / "m-bf16"
    model.mkdir(parents=True)
    iso = _isolator(tmp_path)
    s = types_pb2.Slice(id="s-1", tenant="ta", host_memory_bytes=1 << 30, cpu_milli=2000)
    w = _workload()
    w.backend.kind, w.backend.artifact = "vllm", f"file://{model}"
    binds = iso.plan(w, s, gpu_index=0, gi_id=0, ci_id=0, workdir=str(tmp_path / "w")).spec["binds"]
    assert {"source": str(model), "target": str(model), "readonly": True} in binds
    plain = iso.plan(_workload(), s, gpu_index=0, gi_id=0, ci_id=0, workdir=str(tmp_path / "w2")).spec["binds"]
    assert not [b for b in plain if b["source"] == str(model)]


@root_only
def test_a_mesh_segment_is_shared_into_its_slice_only(tmp_path):
    import shutil
    import tempfile
    shm_root = tempfile.mkdtemp(prefix="gpumesh.unit.", dir="/dev/shm")     # links need the same filesystem
    iso = _isolator(tmp_path, shm_root=shm_root)
    name = f"gpumesh-unit-test-{os.getpid()}"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"x" * 64)
    try:
        iso.share_segment("s-1", "ta", name)
        link = os.path.join(iso.shm_root, "s-1", name)
        ident = iso.users.identity("ta")
        assert os.stat(link).st_ino == os.stat(f"/dev/shm/{name}").st_ino      # the same segment, same name
        assert os.stat(link).st_uid == ident.uid and oct(os.stat(link).st_mode & 0o777) == "0o600"
        assert not os.path.exists(os.path.join(iso.shm_root, "s-2", name))
        iso.unshare_segment("s-1", name)
        assert not os.path.exists(link)
    finally:
        os.unlink(f"/dev/shm/{name}")
        shutil.rmtree(shm_root, ignore_errors=True)


@root_only
def test_sharing_a_segment_never_follows_what_the_tenant_put_at_its_name(tmp_path):
    """The slice's /dev/shm directory is the tenant's: a symlink its workload put at the segment's name (to a
    host file) is replaced by the segment's link; the host file keeps its owner and mode (no chown/chmod
    through a path the tenant controls); a file in its place is replaced too."""
    import shutil
    import tempfile
    shm_root = tempfile.mkdtemp(prefix="gpumesh.unit.", dir="/dev/shm")
    iso = _isolator(tmp_path, shm_root=shm_root)
    ident = iso.users.identity("ta")
    name = f"gpumesh-unit-test-{os.getpid()}"
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(victim, 0o644)
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"x" * 64)
    try:
        d = iso.slice_shm_dir("s-1", ident.uid, ident.gid)
        for planted in ("symlink", "file"):
            link = os.path.join(d, name)
            if os.path.lexists(link):
                os.unlink(link)
            if planted == "symlink":
                os.symlink(victim, link)
            else:
                with open(link, "wb") as f:
                    f.write(b"the tenant's own")
            iso.share_segment("s-1", "ta", name)
            st = os.lstat(link)
            assert stat.S_ISREG(st.st_mode) and st.st_ino == os.stat(f"/dev/shm/{name}").st_ino, planted
            assert st.st_uid == ident.uid and stat.S_IMODE(st.st_mode) == 0o600
            v = os.stat(victim)
            assert (v.st_uid, stat.S_IMODE(v.st_mode)) == (0, 0o644), planted
    finally:
        os.unlink(f"/dev/shm/{name}")
        shutil.rmtree(shm_root, ignore_errors=True)


def test_cgroup_v1_and_v2_write_the_limits(tmp_path):
    root = tmp_path / "cg"
    for c in ("memory", "cpu", "pids", "devices"):
        (root / c).mkdir(parents=True)
    limits = cg.Limits(memory_bytes=1 << 30, cpu_milli=1500, pids_max=64)
    v1 = cg.CgroupV1("gpumesh", str(root))
    procs = v1.create("n/w", limits)
    assert len(procs) == 4
    assert (root / "memory/gpumesh/n/w/memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (root / "cpu/gpumesh/n/w/cpu.cfs_quota_us").read_text() == "150000"
    assert (root / "pids/gpumesh/n/w/pids.max").read_text() == "64"
    assert (root / "devices/gpumesh/n/w/devices.deny").read_text() == "a"
    v2root = tmp_path / "cg2"
    v2root.mkdir()
    (v2root / "cgroup.controllers").write_text("cpu memory pids")
    (v2root / "cgroup.subtree_control").write_text("")
    v2 = cg.CgroupV2("gpumesh", str(v2root))
    assert v2.create("n/w", limits) == [str(v2root / "gpumesh/n/w/cgroup.procs")]
    assert (v2root / "gpumesh/n/w/memory.max").read_text() == str(1 << 30)
    assert (v2root / "gpumesh/n/w/cpu.max").read_text() == "150000 100000"
    assert (v2root / "gpumesh/n/w/pids.max").read_text() == "64"


def test_sim_mps_follows_the_control_commands_and_refuses_a_client_over_its_limit(tmp_path):
    d = mps.SimMps()
    pipe, log = str(tmp_path / "pipe"), str(tmp_path / "log")
    d.start(0, pipe, log, "GPU-x")
    d.set_limits(pipe, 300001, 512 << 20, 50)
    servers = d.control(pipe, "get_server_list").split()
    assert len(servers) == 1 and d.control(pipe, f"get_device_pinned_mem_limit {servers[0]}") == "512M"
    d.add_client(pipe, os.getpid(), uid=300001, memory_bytes=256 << 20)
    with pytest.raises(mps.MpsError, match="exceed its pinned device memory limit"):
        d.add_client(pipe, os.getppid(), uid=300001, memory_bytes=300 << 20)
    with pytest.raises(mps.MpsError, match="no server with pid"):
        d.control(pipe, "set_active_thread_percentage 1 50")
    with pytest.raises(mps.MpsError, match="outside 1..100"):
        d.control(pipe, f"set_active_thread_percentage {servers[0]} 500")
    assert "set_device_pinned_mem_limit" in open(os.path.join(log, "control.log")).read()
    assert json.load(open(os.path.join(pipe, "sim-mps.json")))["servers"][servers[0]]["pct"] == 50


def test_real_mps_sends_the_documented_commands():
    cmds = mps.limit_commands(4242, 4 << 30, 25)
    assert cmds == ["set_default_device_pinned_mem_limit 0 4096M", "set_default_active_thread_percentage 25",
                    "set_device_pinned_mem_limit 4242 0 4096M", "set_active_thread_percentage 4242 25"]


def test_a_clusters_end_removes_its_slices_shm_directories_and_no_others(tmp_path):
    """`meshctl down` (localprocs.stop_workloads) removes the slices' private /dev/shm directories of the
    cluster's agents, found the way the agent names them; another cluster's stay."""
    from nodeagent.isolation.plan import node_shm_root
    from tools.localprocs import remove_slice_shm_dirs
    root = tmp_path / "shm"
    mine = tmp_path / "cluster" / "agents" / "a0" / "workloads" / "sim-node-01"
    other = tmp_path / "other" / "agents" / "a0" / "workloads" / "sim-node-01"
    dirs = []
    for runner in (mine, other):
        runner.mkdir(parents=True)
        d = Path(node_shm_root(runner.name, str(runner), str(root))) / "s-1"
        d.mkdir(parents=True)
        dirs.append(d.parent)
    remove_slice_shm_dirs(tmp_path / "cluster", str(root))
    assert not dirs[0].exists() and dirs[1].exists()


def test_a_clusters_end_unlinks_its_agents_mesh_segments_and_no_others(tmp_path):
    """Mesh buffer segments outlive an agent (a restarted agent re-adopts them, mesh/transport/shm.py) but not
    the cluster: `stop_workloads` unlinks those its agents' records name, and those without a record that carry
    one of its agents' owner tag (a killed run's); another cluster's stay."""
    from mesh.transport.shm import ShmRegion, owner_tag, segment_exists, unlink_segment
    from nodeagent.meshrecords import BufferRecords
    from tools.localprocs import remove_mesh_segments
    dirs = [str(tmp_path / c / "agents" / "a0" / "mesh" / "sim-node-01") for c in ("mine", "other")]
    regions = [ShmRegion(f"b-test{os.getpid()}x{i}", 4096, 7, outlive_process=True,
                         owner=owner_tag("sim-node-01", dirs[i % 2])) for i in range(4)]
    try:
        for region, d in zip(regions[:2], dirs):
            BufferRecords(d).save(
                {"buffer_id": region.buffer_id, "connection_id": "m-1", "slice_id": "s-1", "transport": "shm",
                 "size": 4096, "shm_name": region.name, "address": 0})
        for region in regions[2:]:
            region.detach()              # no record, its process "dead" to the sweep: a killed run's leftover
        assert remove_mesh_segments(tmp_path / "mine") == 2
        assert [segment_exists(r.name) for r in regions] == [False, True, False, True]
    finally:
        for region in regions[:2]:
            region.revoke()
        for region in regions[2:]:
            unlink_segment(region.name)

"""Per-tenant disk quotas (nodeagent/isolation/quotactl.py, diskquota.py): the quotactl structures and
command words as the kernel reads them, the error each errno becomes, the limits set on every identity the
agent gives and cleared when it no longer gives it, the refusal to start without user quota, the gauges.
The kernel's enforcement itself: test_disk_quota_ext4.py."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat

import pytest

from mesh.config import ConfigError
from nodeagent.isolation import quotactl as q
from nodeagent.isolation.diskquota import DiskQuotas
from nodeagent.isolation.users import Identity, IdentityError, TenantUsers


def test_the_structures_and_command_words_are_the_kernels():
    # include/uapi/linux/quota.h: struct if_dqblk is 8 __u64 then a __u32 (72 bytes with the tail padding),
    # struct if_dqinfo 2 __u64 and 2 __u32
    assert ctypes.sizeof(q.DqBlk) == 72 and q.DqBlk.dqb_valid.offset == 64
    assert q.DqBlk.dqb_curspace.offset == 16 and q.DqBlk.dqb_curinodes.offset == 40
    assert ctypes.sizeof(q.DqInfo) == 24 and q.DqInfo.dqi_valid.offset == 20
    # QCMD(Q_SETQUOTA, USRQUOTA) = 0x80000800, which as the C int quotactl takes is negative
    assert q.qcmd(q.Q_SETQUOTA) == 0x80000800 - (1 << 32)
    assert q.qcmd(q.Q_GETINFO, 1) == 0x80000501 - (1 << 32)


def test_limits_are_whole_kib_blocks_hard_and_soft_and_zero_clears():
    b = q.limits_block(50 << 30, 1000)
    assert (b.dqb_bhardlimit, b.dqb_bsoftlimit) == ((50 << 30) // 1024,) * 2
    assert (b.dqb_ihardlimit, b.dqb_isoftlimit) == (1000, 1000)
    assert b.dqb_valid == q.QIF_BLIMITS | q.QIF_ILIMITS       # usage and grace times left alone
    assert q.limits_block(1025, 0).dqb_bhardlimit == 2        # rounded up: never less than asked
    clear = q.limits_block(0, 0)
    assert (clear.dqb_bhardlimit, clear.dqb_ihardlimit, clear.dqb_valid) == (0, 0, q.QIF_BLIMITS | q.QIF_ILIMITS)
    with pytest.raises(ValueError):
        q.limits_block(-1, 0)
    u = q.usage_of(q.DqBlk(dqb_curspace=4096, dqb_curinodes=3, dqb_bhardlimit=8, dqb_ihardlimit=9))
    assert u == q.Usage(bytes=4096, inodes=3, bytes_limit=8192, inodes_limit=9)


@pytest.mark.parametrize("err, words", [
    (errno.ESRCH, ["not enabled", "usrquota", "uquota", "-O quota"]),
    (errno.ENOTBLK, ["not a block device", "ext4 or XFS"]),
    (errno.ENOENT, ["not a block device"]),
    (errno.ENOSYS, ["no user quota support", "CONFIG_QFMT_V2"]),
    (errno.EPERM, ["CAP_SYS_ADMIN"]),
    (errno.EIO, [os.strerror(errno.EIO)]),
])
def test_each_errno_says_what_to_do(err, words):
    e = q.explain(err, "/dev/sdz1", "Q_GETINFO")
    assert isinstance(e, OSError) and e.errno == err
    assert str(e).startswith("quotactl Q_GETINFO: ") and "/dev/sdz1" in str(e)
    for w in words:
        assert w in str(e)


class FakeCall:
    """libc quotactl: records the calls, fills Q_GETQUOTA's answer, fails with `fail_errno`."""

    def __init__(self):
        self.calls, self.fail_errno = [], 0

    def __call__(self, cmd, special, ident, arg):
        obj = arg._obj
        self.calls.append((cmd, special, ident, bytes(obj)))
        if self.fail_errno:
            ctypes.set_errno(self.fail_errno)
            return -1
        if cmd == q.qcmd(q.Q_GETQUOTA):
            obj.dqb_curspace, obj.dqb_curinodes, obj.dqb_bhardlimit = 2048, 2, 4
        return 0


def test_quotactl_passes_the_device_uid_and_structure_and_maps_its_errno():
    call = FakeCall()
    ctl = q.Quotactl("/dev/vdb", call)
    ctl.set_limits(200001, 3 << 20, 10)
    cmd, special, ident, raw = call.calls[-1]
    assert (cmd, special, ident) == (q.qcmd(q.Q_SETQUOTA), b"/dev/vdb", 200001)
    sent = q.DqBlk.from_buffer_copy(raw)
    assert (sent.dqb_bhardlimit, sent.dqb_ihardlimit, sent.dqb_valid) == (3072, 10, 5)
    assert ctl.usage(200001) == q.Usage(2048, 2, 4096, 0)
    call.fail_errno = errno.ESRCH
    with pytest.raises(q.QuotaError, match="not enabled on the filesystem of /dev/vdb") as e:
        ctl.info()
    assert e.value.errno == errno.ESRCH


def test_the_device_is_the_mount_of_the_paths_device_deepest_first(tmp_path):
    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    info = tmp_path / "mountinfo"
    # the root of the same device, a deeper mount of another device over a sibling, a bind with a space
    info.write_text(f"1 0 {dev} / / rw - ext4 /dev/fake-root rw\n"
                    f"2 1 9999:1 / {tmp_path}/other rw - xfs /dev/other rw\n"
                    f"3 1 {dev} /sub {str(tmp_path).replace(' ', chr(92) + '040')} rw - ext4 /dev/my\\040disk rw\n")
    nosys = str(tmp_path / "no-sysfs")
    assert q.device_of(str(tmp_path / "mountinfo"), str(info), nosys) == ("/dev/my disk", str(tmp_path), "ext4")
    info.write_text("1 0 9999:1 / / rw - xfs /dev/other rw\n")
    with pytest.raises(q.QuotaError, match="no mount of device"):
        q.device_of(str(tmp_path), str(info))


def test_a_source_that_names_no_node_is_found_by_the_kernels_name(tmp_path):
    """A root mounted from `/dev/root` (no such node) on a host without udev's /dev/block links: the device is
    /dev/NAME from /sys/dev/block/MAJ:MIN/uevent (before, quotactl got `/dev/root` and the agent refused to start
    saying it was no block device)."""
    sysfs = tmp_path / "sys"
    (sysfs / "8:1").mkdir(parents=True)
    (sysfs / "8:1" / "uevent").write_text("MAJOR=8\nMINOR=1\nDEVNAME=sda1\nDEVTYPE=partition\n")
    assert q._sysfs_devname("8:1", str(sysfs)) == "/dev/sda1"
    assert q._sysfs_devname("8:2", str(sysfs)) == ""
    # end to end with a block device this host has: its mount source given as /dev/root
    blocks = [(d.name, f"/dev/{n}") for d in os.scandir("/sys/dev/block")
              for n in [q._sysfs_devname(d.name)[5:]] if n and os.path.exists(f"/dev/{n}")
              and stat.S_ISBLK(os.stat(f"/dev/{n}").st_mode)] if os.path.isdir("/sys/dev/block") else []
    if not blocks:
        pytest.skip("this host has no block device in /sys/dev/block with its /dev node")
    majmin, node = blocks[0]
    info = tmp_path / "mountinfo"
    info.write_text(f"1 0 {majmin} / / rw - ext4 /dev/root rw\n")
    real_stat = os.stat

    class Dev:                      # the path lies on that device, as the host's root would
        def __init__(self, st):
            self.st = st

        def __getattr__(self, k):
            return os.makedev(*map(int, majmin.split(":"))) if k == "st_dev" else getattr(self.st, k)
    import unittest.mock
    with unittest.mock.patch.object(q.os, "stat", lambda p, *a, **kw: Dev(real_stat(p, *a, **kw))
                                    if str(p) == str(tmp_path) else real_stat(p, *a, **kw)):
        device, point, fstype = q.device_of(str(tmp_path), str(info))
    assert (os.path.realpath(device), point, fstype) == (os.path.realpath(node), "/", "ext4")  # or udev's link to it


class FakeCtl:
    def __init__(self, fail_on=()):
        self.device, self.limits, self.fail_on = "/dev/fake", {}, set(fail_on)

    def info(self):
        return q.DqInfo()

    def set_limits(self, uid, max_bytes, max_inodes):
        if uid in self.fail_on:
            raise q.explain(errno.EIO, self.device, f"Q_SETQUOTA uid {uid}")
        self.limits[uid] = (max_bytes, max_inodes)

    def usage(self, uid):
        return q.Usage(100, 1, *self.limits.get(uid, (0, 0)))


def _record(tmp_path):
    return json.loads((tmp_path / "isolation" / "disk-quotas.json").read_text())


def test_every_identity_given_out_gets_the_limit_once_and_is_recorded(tmp_path):
    ctl = FakeCtl()
    quotas = DiskQuotas(str(tmp_path), 1 << 30, 500, ctl=ctl)
    users = TenantUsers((200000, 200100), {"mapped": Identity(300000, 300000)}, str(tmp_path / "ids.json"))
    users.quotas = quotas
    a = users.identity("acme")
    users.identity("mapped")
    assert ctl.limits == {a.uid: (1 << 30, 500), 300000: (1 << 30, 500)}
    assert _record(tmp_path) == sorted([a.uid, 300000])
    ctl.limits.clear()
    users.identity("acme")
    assert ctl.limits == {}                     # once per agent process (the kernel keeps it)
    ctl.fail_on = {users._identity("other").uid}
    with pytest.raises(IdentityError, match="disk quota is not set.*Q_SETQUOTA"):
        users.identity("other")                 # no workload runs without its quota


def test_a_restart_sets_the_known_identities_and_clears_the_ones_it_no_longer_gives(tmp_path):
    ctl = FakeCtl()
    DiskQuotas(str(tmp_path), 1 << 20, ctl=ctl).sync({5001, 5002})
    assert ctl.limits == {5001: (1 << 20, 0), 5002: (1 << 20, 0)} and _record(tmp_path) == [5001, 5002]
    # restarted with a bigger quota and 5002 no longer mapped
    DiskQuotas(str(tmp_path), 2 << 20, ctl=ctl).sync({5001})
    assert ctl.limits == {5001: (2 << 20, 0), 5002: (0, 0)} and _record(tmp_path) == [5001]
    again = DiskQuotas(str(tmp_path), 2 << 20, ctl=ctl)
    again.apply(5002)
    again.sync({5001})                          # cleared in this process: given out again, set again
    again.apply(5002)
    assert ctl.limits[5002] == (2 << 20, 0) and _record(tmp_path) == [5001, 5002]
    # a limit the agent cannot clear stays recorded for the next start
    ctl.fail_on = {5001}
    DiskQuotas(str(tmp_path), 0, ctl=ctl).sync({5001})
    assert _record(tmp_path) == [5001]
    ctl.fail_on = set()
    off = DiskQuotas(str(tmp_path), 0, ctl=ctl)
    off.sync({5001})                            # turned off: every limit it set is cleared
    assert ctl.limits[5001] == (0, 0) and not (tmp_path / "isolation" / "disk-quotas.json").exists()
    off.apply(5001)
    assert ctl.limits[5001] == (0, 0)           # off: identities get no limit


def test_the_option_takes_sizes_and_names_itself_when_wrong():
    from nodeagent.config import AgentConfig
    assert AgentConfig(insecure=True).disk_quota_bytes() == 0
    assert AgentConfig(insecure=True, workload_disk_quota="50GiB").disk_quota_bytes() == 50 << 30
    with pytest.raises(ConfigError, match=r"workload_disk_quota: invalid size '50 gigs'.*GiB"):
        AgentConfig(insecure=True, workload_disk_quota="50 gigs").check()


def test_the_agent_does_not_start_with_a_quota_its_state_directory_cannot_hold(tmp_path):
    """A real quotactl(Q_GETINFO) on the filesystem of a temporary directory (this host's: no user quota on)."""
    from nodeagent.config import AgentConfig
    from nodeagent.isolation.setup import isolation_host
    try:
        q.Quotactl(q.device_of(str(tmp_path))[0]).info()
        pytest.skip("user quota is on for the temporary directory's filesystem here")
    except q.QuotaError:
        pass
    cfg = AgentConfig(insecure=True, state_dir=str(tmp_path / "state"), workload_disk_quota="1GiB")
    with pytest.raises(ConfigError, match=r"workload_disk_quota: the state directory .* cannot hold per-tenant "
                                          r"quotas: quotactl Q_GETINFO: .*usrquota"):
        isolation_host(cfg)
    isolation_host(AgentConfig(insecure=True, state_dir=str(tmp_path / "state")))      # off: starts as before


def test_the_gauges_show_each_tenants_use_and_limit():
    from prometheus_client import generate_latest

    from nodeagent import metrics
    ctl = FakeCtl()
    ctl.limits[7001] = (4096, 0)
    try:
        metrics.TENANT_DISK.source = lambda: [("acme", ctl.usage(7001))]
        text = generate_latest().decode()
    finally:
        metrics.TENANT_DISK.source = None
    assert 'gpumesh_agent_tenant_disk_bytes{tenant="acme"} 100.0' in text
    assert 'gpumesh_agent_tenant_disk_limit_bytes{tenant="acme"} 4096.0' in text
    assert 'gpumesh_agent_tenant_disk_inodes{tenant="acme"} 1.0' in text
    assert "tenant_disk" not in generate_latest().decode()      # off: no series

"""The kernel enforces the tenants' disk quota the agent sets (nodeagent/isolation/diskquota.py): a loop-mounted
ext4 image made with the quota feature and mounted with usrquota, a 1 MiB quota on one uid set through the
agent's quotactl; that uid's writes stop at EDQUOT past it, another uid's (no quota) go through.

Needs root, mkfs.ext4, losetup with a free loop device, setpriv, and a kernel with CONFIG_QFMT_V2 (the mount with
usrquota fails without it): skips, naming which is missing, otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from nodeagent.isolation.diskquota import DiskQuotas
from nodeagent.isolation.quotactl import device_of

UID_LIMITED, UID_FREE = 300171, 300172
LIMIT = 1 << 20


def _run(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check)


def _needs():
    if os.geteuid() != 0:
        return "loop devices and mounts need root"
    for tool in ("mkfs.ext4", "losetup", "mount", "umount", "setpriv", "dd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if _run("losetup", "-f", check=False).returncode != 0:
        return "no free loop device (losetup -f)"
    return ""


def _make_image(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    if _run("mkfs.ext4", "-q", "-O", "quota", "-F", path, check=False).returncode != 0:
        _run("mkfs.ext4", "-q", "-F", path)             # an older e2fsprogs: add the feature afterwards
        _run("tune2fs", "-O", "quota", path)


def _write_as(uid: int, path: str) -> subprocess.CompletedProcess:
    """2 MiB written (and synced) by `uid`."""
    return _run("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "dd", "if=/dev/zero",
                f"of={path}", "bs=64k", "count=32", "conv=fsync", check=False)


@pytest.mark.skipif(bool(_needs()), reason=_needs() or "-")
def test_a_tenant_uid_gets_edquot_past_its_quota_and_another_uid_does_not(tmp_path):
    img = str(tmp_path / "ext4.img")
    # the test uids must reach the mount point: not under pytest's 0700 directories
    mnt = Path(tempfile.mkdtemp(prefix="gpumesh-quota-"))
    os.chmod(mnt, 0o711)
    _make_image(img)
    loop = _run("losetup", "-f", "--show", img).stdout.strip()
    mounted = False
    try:
        m = _run("mount", "-o", "usrquota", loop, str(mnt), check=False)
        if m.returncode != 0:
            dmesg = _run("dmesg", check=False).stdout.strip().splitlines()[-1:]
            pytest.skip(f"ext4 with usrquota does not mount here (a kernel without CONFIG_QFMT_V2?): "
                        f"{m.stderr.strip()} {' '.join(dmesg)}")
        mounted = True
        os.chmod(mnt, 0o1777)
        state = mnt / "state"
        assert device_of(str(mnt))[0] == loop
        quotas = DiskQuotas(str(state), LIMIT, 0)
        quotas.check()                                  # user quota on: the agent starts
        quotas.apply(UID_LIMITED)
        assert quotas.usage(UID_LIMITED).bytes_limit == LIMIT

        over = _write_as(UID_LIMITED, str(mnt / "limited"))
        assert over.returncode != 0 and "Disk quota exceeded" in over.stderr, over.stderr
        used = quotas.usage(UID_LIMITED)
        assert 0 < used.bytes <= LIMIT and used.inodes == 1

        free = _write_as(UID_FREE, str(mnt / "free"))
        assert free.returncode == 0, free.stderr
        assert os.path.getsize(mnt / "free") == 2 << 20

        quotas.sync(set())                              # the identity gone: its limit cleared
        assert quotas.usage(UID_LIMITED).bytes_limit == 0
        again = _write_as(UID_LIMITED, str(mnt / "limited"))
        assert again.returncode == 0, again.stderr
    finally:
        if mounted:
            _run("umount", str(mnt), check=False)
        _run("losetup", "-d", loop, check=False)
        if not os.path.ismount(mnt):
            shutil.rmtree(mnt, ignore_errors=True)

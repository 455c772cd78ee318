"""quotactl(2) through ctypes: user quotas (USRQUOTA) on the block device of a filesystem.

The structures are the kernel's `if_dqinfo` and `if_dqblk` (include/uapi/linux/quota.h); block limits are
counted in QIF_DQBLKSIZE (1 KiB) units, the space in use in bytes. Every failure is a `QuotaError` whose
message names the device and what to do (`explain`): ESRCH is "user quota is not on for this filesystem"
(the mount option), ENOTBLK or ENOENT "no block device" (tmpfs, overlayfs), ENOSYS "not built into this
kernel" or "this filesystem has no quotas", EPERM "the agent lacks CAP_SYS_ADMIN".
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

USRQUOTA = 0
SUBCMDSHIFT = 8
Q_GETFMT, Q_GETINFO, Q_GETQUOTA, Q_SETQUOTA = 0x800004, 0x800005, 0x800007, 0x800008
QIF_BLIMITS, QIF_SPACE, QIF_ILIMITS, QIF_INODES = 1, 2, 4, 8
QIF_DQBLKSIZE = 1024
ENABLE_HINT = ("mount it with the user quota on: ext4 made with `mkfs.ext4 -O quota` (or `tune2fs -O quota` "
               "while unmounted) and mounted with `-o usrquota`, or XFS mounted with `-o uquota` (the kernel "
               "needs CONFIG_QUOTA with CONFIG_QFMT_V2 for ext4, CONFIG_XFS_QUOTA for XFS)")


def qcmd(cmd: int, qtype: int = USRQUOTA) -> int:
    """QCMD(cmd, type): the command word quotactl takes (a C int: the top bit of Q_* makes it negative)."""
    word = (cmd << SUBCMDSHIFT) | (qtype & 0xff)
    return ctypes.c_int(word & 0xffffffff).value


class DqInfo(ctypes.Structure):
    _fields_ = [("dqi_bgrace", ctypes.c_uint64), ("dqi_igrace", ctypes.c_uint64),
                ("dqi_flags", ctypes.c_uint32), ("dqi_valid", ctypes.c_uint32)]


class DqBlk(ctypes.Structure):
    _fields_ = [("dqb_bhardlimit", ctypes.c_uint64), ("dqb_bsoftlimit", ctypes.c_uint64),
                ("dqb_curspace", ctypes.c_uint64), ("dqb_ihardlimit", ctypes.c_uint64),
                ("dqb_isoftlimit", ctypes.c_uint64), ("dqb_curinodes", ctypes.c_uint64),
                ("dqb_btime", ctypes.c_uint64), ("dqb_itime", ctypes.c_uint64),
                ("dqb_valid", ctypes.c_uint32)]


@dataclass(frozen=True)
class Usage:
    bytes: int
    inodes: int
    bytes_limit: int        # 0: none
    inodes_limit: int       # 0: none


def limits_block(max_bytes: int, max_inodes: int) -> DqBlk:
    """The Q_SETQUOTA argument for hard limits of `max_bytes` (rounded up to whole KiB) and `max_inodes`;
    0 is no limit, so (0, 0) clears them. Soft limits are the same (no grace period to run past them)."""
    if max_bytes < 0 or max_inodes < 0:
        raise ValueError("quota limits must not be negative")
    blocks = -(-max_bytes // QIF_DQBLKSIZE)
    return DqBlk(dqb_bhardlimit=blocks, dqb_bsoftlimit=blocks, dqb_ihardlimit=max_inodes,
                 dqb_isoftlimit=max_inodes, dqb_valid=QIF_BLIMITS | QIF_ILIMITS)


def usage_of(d: DqBlk) -> Usage:
    return Usage(bytes=d.dqb_curspace, inodes=d.dqb_curinodes, bytes_limit=d.dqb_bhardlimit * QIF_DQBLKSIZE,
                 inodes_limit=d.dqb_ihardlimit)


class QuotaError(OSError):
    """A quotactl call failed; str() says on which device and what to do (errno: the call's)."""

    def __str__(self) -> str:
        return str(self.strerror)


def explain(err: int, device: str, what: str) -> QuotaError:
    """The error of a failed quotactl(`what`) on `device` with errno `err`."""
    if err == errno.ESRCH:
        why = f"user quota is not enabled on the filesystem of {device}: {ENABLE_HINT}"
    elif err in (errno.ENOTBLK, errno.ENOENT, errno.ENODEV):
        why = (f"{device} is not a block device with quotas (tmpfs, overlayfs, a network filesystem): put the "
               f"state directory on ext4 or XFS and {ENABLE_HINT}")
    elif err in (errno.ENOSYS, errno.EOPNOTSUPP):
        why = f"the kernel or the filesystem of {device} has no user quota support: {ENABLE_HINT}"
    elif err == errno.EPERM:
        why = f"setting quotas on {device} needs CAP_SYS_ADMIN (the agent runs as root in secure mode)"
    else:
        why = f"{device}: {os.strerror(err)}"
    return QuotaError(err, f"quotactl {what}: {why}")


class Quotactl:
    """USRQUOTA calls on one block device. `call` stands in for libc's quotactl in tests."""

    def __init__(self, device: str, call=None) -> None:
        self.device = device
        if call is None:
            libc = ctypes.CDLL(None, use_errno=True)
            call = libc.quotactl
            call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
            call.restype = ctypes.c_int
        self._call = call

    def _do(self, cmd: int, what: str, ident: int, arg) -> None:
        ctypes.set_errno(0)
        if self._call(qcmd(cmd), os.fsencode(self.device), ident, ctypes.byref(arg)) != 0:
            raise explain(ctypes.get_errno() or errno.EIO, self.device, what)

    def info(self) -> DqInfo:
        """Q_GETINFO: fails (ESRCH) unless user quota is on for the filesystem."""
        out = DqInfo()
        self._do(Q_GETINFO, "Q_GETINFO", 0, out)
        return out

    def set_limits(self, uid: int, max_bytes: int, max_inodes: int) -> None:
        self._do(Q_SETQUOTA, f"Q_SETQUOTA uid {uid}", uid, limits_block(max_bytes, max_inodes))

    def usage(self, uid: int) -> Usage:
        out = DqBlk()
        self._do(Q_GETQUOTA, f"Q_GETQUOTA uid {uid}", uid, out)
        return usage_of(out)


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space) decoded."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def device_of(path: str, mountinfo: str = "/proc/self/mountinfo",
              sysfs: str = "/sys/dev/block") -> tuple[str, str, str]:
    """(block device, mount point, filesystem type) of the filesystem holding `path`: the mount whose
    device number is the path's, deepest mount point first. The device is the mount's source when that is
    a block device node, else /dev/block/MAJ:MIN (udev's link) when there is one, else /dev/NAME with the
    kernel's name of MAJ:MIN (/sys/dev/block/MAJ:MIN/uevent; a root mounted from `/dev/root`, which names no
    node), else the source as is (quotactl then fails with ENOTBLK or ENOENT: `explain`)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    best: tuple[str, str, str] | None = None
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 2 or fields[2] != want:
                continue
            point = _unescape(fields[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and (best is None or len(point) >= len(best[1])):
                best = (_unescape(tail[1]), point, tail[0])
    if best is None:
        raise QuotaError(errno.ENOENT, f"no mount of device {want} holds {real} in {mountinfo}")
    source, point, fstype = best
    for candidate in (source, f"/dev/block/{want}", _sysfs_devname(want, sysfs)):
        if not candidate:
            continue
        try:
            if stat.S_ISBLK(os.stat(candidate).st_mode):
                return candidate, point, fstype
        except OSError:
            continue
    return source, point, fstype


def _sysfs_devname(majmin: str, sysfs: str = "/sys/dev/block") -> str:
    """/dev/NAME of block device MAJ:MIN as the kernel names it (its uevent's DEVNAME), or ""."""
    try:
        with open(os.path.join(sysfs, majmin, "uevent"), encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "DEVNAME" and value:
                    return os.path.join("/dev", value)
    except OSError:
        pass
    return ""

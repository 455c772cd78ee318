"""Per-workload cgroups: memory, CPU and process-count limits (and, on v1, the devices list).

`CgroupDriver` is the small protocol the agent uses; `CgroupV1` (one hierarchy per controller,
as on this development machine) and `CgroupV2` (the unified hierarchy of current GPU hosts)
implement it, and `for_host` picks the one the host mounts. The workload's init writes itself
into every `procs_files` entry before it starts anything, so the whole tree is accounted.

Cgroup v2 has no devices file (device access is an eBPF program there): on v2 the private /dev
of the mount namespace and the missing CAP_MKNOD of the unprivileged workload confine devices.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.isolation.devices import DeviceNode

ROOT = "/sys/fs/cgroup"
REMOVE_TRIES, REMOVE_PAUSE = 50, 0.05     # a waiting `remove`: attempts, and seconds between two
CPU_PERIOD_US = 100_000
# Character devices every workload may use: null, zero, full, random, urandom, tty, ptmx, pts.
BASE_DEVICE_RULES = ("c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm",
                     "c 5:2 rwm", "c 136:* rwm")


class CgroupError(RuntimeError):
    """A workload's cgroup could not be made or limited."""


@dataclass
class Limits:
    memory_bytes: int = 0          # 0: no limit
    cpu_milli: int = 0             # 0: no limit
    pids_max: int = 0              # 0: no limit
    devices: list[DeviceNode] = field(default_factory=list)   # besides BASE_DEVICE_RULES


class CgroupDriver(Protocol):
    version: int
    confines_devices: bool

    def create(self, name: str, limits: Limits) -> list[str]:
        """Make the group `name` with `limits`; answer the files a process writes "0" into to join."""

    def remove(self, name: str) -> None:
        """Kill what is left in the group and remove it (no error when it is gone already). Waits for its
        processes to leave: never on the event loop."""

    def begin_remove(self, name: str) -> None:
        """The start of a removal: the group's processes may not fork, and are killed."""

    def remove_step(self, name: str) -> bool:
        """One attempt at removing the group, without waiting: True once it is gone (or was)."""

    def exists(self, name: str) -> bool:
        ...


def _makedirs(path: str) -> None:
    """Make a cgroup directory and its missing parents 0755 whatever the agent's umask (0077): `criu restore`
    checks them with access(2), as the tenant's real uid (nodeagent/isolation/criu_ids.py)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        os.chmod(d, 0o755)


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def _deny_forks(group: str) -> None:
    """Set the group's pids.max to 0 before its processes are killed: a workload that forks a child and exits
    (a new pid after every read of cgroup.procs) cannot outrun the kill loop. Best effort: a group without the
    pids controller is killed as before."""
    try:
        with open(os.path.join(group, "pids.max"), "w", encoding="ascii") as f:
            f.write("0")
    except OSError:
        pass


def _remove_step(path: str, procs: str) -> bool:
    """One attempt at removing the group `path` (and then its parent, the node's group, once its last workload is
    gone): True when it is gone; else SIGKILL to every process it still lists, and the caller tries again later."""
    if not os.path.isdir(path):
        return True
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:         # EBUSY: processes are still in it (killed, not yet gone)
        try:
            with open(os.path.join(path, procs), encoding="ascii") as f:
                for pid in f.read().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except OSError:
            pass
        return False
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
    return True


class _Removal:
    """`remove` from the drivers' two steps: `begin_remove` once, then `remove_step` until the group is gone.
    `remove` waits (up to REMOVE_TRIES * REMOVE_PAUSE s) and so runs in a thread, never on the agent's event loop:
    there the runner calls the steps itself, one per monitor pass (nodeagent/workload_release.py)."""

    def remove(self, name: str) -> None:
        self.begin_remove(name)
        for _ in range(REMOVE_TRIES):
            if self.remove_step(name):
                return
            time.sleep(REMOVE_PAUSE)


class CgroupV1(_Removal):
    version = 1
    confines_devices = True
    CONTROLLERS = ("memory", "cpu", "pids", "devices")

    def __init__(self, base: str = "gpumesh", root: str = ROOT) -> None:
        self.base, self.root = base, root

    def _dir(self, controller: str, name: str) -> str:
        return os.path.join(self.root, controller, self.base, name)

    def exists(self, name: str) -> bool:
        return os.path.isdir(self._dir("memory", name))

    def create(self, name: str, limits: Limits) -> list[str]:
        procs = []
        for c in self.CONTROLLERS:
            d = self._dir(c, name)
            try:
                _makedirs(d)
            except OSError as e:
                raise CgroupError(f"cannot create the {c} cgroup {d}: {e.strerror}") from None
            procs.append(os.path.join(d, "cgroup.procs"))
        mem = self._dir("memory", name)
        if limits.memory_bytes:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes))
            if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):   # no escape into swap
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
        if limits.cpu_milli:
            cpu = self._dir("cpu", name)
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(max(1000, limits.cpu_milli * CPU_PERIOD_US // 1000)))
        if limits.pids_max:
            _write(os.path.join(self._dir("pids", name), "pids.max"), str(limits.pids_max))
        dev = self._dir("devices", name)
        _write(os.path.join(dev, "devices.deny"), "a")
        for rule in (*BASE_DEVICE_RULES, *(f"c {n.major}:{n.minor} rwm" for n in limits.devices)):
            _write(os.path.join(dev, "devices.allow"), rule)
        return procs

    def begin_remove(self, name: str) -> None:
        _deny_forks(self._dir("pids", name))

    def remove_step(self, name: str) -> bool:
        return all([_remove_step(self._dir(c, name), "cgroup.procs") for c in self.CONTROLLERS])   # each one


class CgroupV2(_Removal):
    version = 2
    confines_devices = False      # eBPF device programs: not done here, the private /dev confines
    CONTROLLERS = ("memory", "cpu", "pids")

    def __init__(self, base: str = "gpumesh", root: str = ROOT) -> None:
        self.base, self.root = base, root

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, self.base, name)

    def exists(self, name: str) -> bool:
        return os.path.isdir(self._dir(name))

    def _enable(self) -> None:
        base = os.path.join(self.root, self.base)
        _makedirs(base)
        for d in (self.root, base):
            try:
                with open(os.path.join(d, "cgroup.controllers"), encoding="ascii") as f:
                    avail = f.read().split()
            except OSError:
                continue
            want = " ".join(f"+{c}" for c in self.CONTROLLERS if c in avail)
            if want:
                _write(os.path.join(d, "cgroup.subtree_control"), want)

    def create(self, name: str, limits: Limits) -> list[str]:
        self._enable()
        d = self._dir(name)
        try:
            _makedirs(d)
        except OSError as e:
            raise CgroupError(f"cannot create the cgroup {d}: {e.strerror}") from None
        if limits.memory_bytes:
            _write(os.path.join(d, "memory.max"), str(limits.memory_bytes))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")
        if limits.cpu_milli:
            _write(os.path.join(d, "cpu.max"), f"{max(1000, limits.cpu_milli * CPU_PERIOD_US // 1000)} {CPU_PERIOD_US}")
        if limits.pids_max:
            _write(os.path.join(d, "pids.max"), str(limits.pids_max))
        return [os.path.join(d, "cgroup.procs")]

    def begin_remove(self, name: str) -> None:
        _deny_forks(self._dir(name))
        _kill_all(self._dir(name))

    def remove_step(self, name: str) -> bool:
        return _remove_step(self._dir(name), "cgroup.procs")


def _kill_all(group: str) -> None:
    """cgroup v2's `cgroup.kill` (Linux 5.14+): SIGKILL to every process of the group and its descendants at
    once, forks in flight included, so the removal's rmdir seldom has to wait (it runs on the agent's event
    loop). Best effort: an older kernel has no such file and the kill loop does it."""
    try:
        with open(os.path.join(group, "cgroup.kill"), "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        pass


def for_host(version: int, base: str = "gpumesh", root: str = ROOT) -> CgroupDriver | None:
    return {1: CgroupV1, 2: CgroupV2}.get(version, lambda *a, **k: None)(base, root)

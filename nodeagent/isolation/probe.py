"""What this host's kernel offers for confining workloads, found by trying.

`probe()` answers once per agent start; the agent logs it (`isolation features`) and, in secure
mode, refuses to start workloads when `missing()` names something (the minimum: switching to an
unprivileged uid, no_new_privs, memory and pids cgroups, and a way to confine device nodes: a
devices cgroup (v1) or a private /dev in a mount namespace).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {"mount": CLONE_NEWNS, "ipc": CLONE_NEWIPC, "pid": CLONE_NEWPID, "net": CLONE_NEWNET}
PR_GET_NO_NEW_PRIVS = 39
CAP_SETUID, CAP_SETGID, CAP_SYS_ADMIN = 7, 6, 21
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass
class HostFeatures:
    setuid: bool = False                 # may switch to another uid/gid (root or CAP_SETUID+CAP_SETGID)
    no_new_privs: bool = False
    namespaces: list[str] = field(default_factory=list)      # of mount, ipc, pid, net (gpumesh.io/network=none)
    cgroup_version: int = 0              # 1, 2, or 0 (none usable)
    cgroup_controllers: list[str] = field(default_factory=list)   # usable: memory, cpu, pids, devices
    dmem: bool = False                   # cgroup v2 dmem controller (kernel-enforced device memory)
    seccomp: bool = False                # a seccomp filter can be installed (kernel + libseccomp)
    problems: list[str] = field(default_factory=list)

    def missing(self) -> list[str]:
        """What secure mode needs and this host lacks, each named with why it matters."""
        out = []
        if not self.setuid:
            out.append("switching to an unprivileged uid/gid (the agent needs root or CAP_SETUID+CAP_SETGID)")
        if not self.no_new_privs:
            out.append("prctl(PR_SET_NO_NEW_PRIVS) (kernel 3.5+)")
        for c in ("memory", "pids"):
            if c not in self.cgroup_controllers:
                out.append(f"a writable {c} cgroup controller (per-workload {c} limits)")
        if "devices" not in self.cgroup_controllers and "mount" not in self.namespaces:
            out.append("device confinement: a devices cgroup (v1) or a mount namespace for a private /dev")
        if not self.seccomp:
            out.append("a seccomp filter (kernel seccomp and libseccomp2: denies ptrace, namespaces, bpf, ...)")
        return out

    def summary(self) -> dict:
        return asdict(self)


def _caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _try_unshare(flag: int) -> bool:
    """unshare(flag) in a throwaway child (the agent itself stays where it is)."""
    code = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
            f"sys.exit(0 if libc.unshare({flag}) == 0 else 1)")
    try:
        return subprocess.run([sys.executable, "-I", "-S", "-c", code], timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return 2
    if os.path.isdir(os.path.join(root, "memory")) or os.path.isdir(os.path.join(root, "pids")):
        return 1
    return 0


def _writable_controllers(version: int, root: str, probe_name: str) -> tuple[list[str], bool, list[str]]:
    found, problems, dmem = [], [], False
    if version == 1:
        for c in ("memory", "cpu", "pids", "devices"):
            d = os.path.join(root, c, probe_name)
            try:
                os.makedirs(d, exist_ok=True)
                os.rmdir(d)
                found.append(c)
            except OSError as e:
                problems.append(f"cgroup v1 {c}: {e.strerror}")
    elif version == 2:
        try:
            with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as f:
                avail = f.read().split()
        except OSError as e:
            return [], False, [f"cgroup v2: {e.strerror}"]
        dmem = "dmem" in avail
        d = os.path.join(root, probe_name)
        try:
            os.makedirs(d, exist_ok=True)
            os.rmdir(d)
            found = [c for c in ("memory", "cpu", "pids") if c in avail]
        except OSError as e:
            problems.append(f"cgroup v2: cannot create a group under {root}: {e.strerror}")
    return found, dmem, problems


def probe(cgroup_root: str = CGROUP_ROOT, probe_name: str = "gpumesh-probe") -> HostFeatures:
    f = HostFeatures()
    caps = _caps()
    f.setuid = os.geteuid() == 0 or bool(caps & (1 << CAP_SETUID) and caps & (1 << CAP_SETGID))
    libc = ctypes.CDLL(None, use_errno=True)
    f.no_new_privs = libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0
    f.namespaces = [name for name, flag in NAMESPACE_FLAGS.items() if _try_unshare(flag)]
    f.cgroup_version = cgroup_version(cgroup_root)
    f.cgroup_controllers, f.dmem, f.problems = _writable_controllers(f.cgroup_version, cgroup_root, probe_name)
    f.seccomp = _try_seccomp()
    return f


def _try_seccomp() -> bool:
    """Install the workload filter (syscallfilter.py) in a throwaway child and check it denies unshare."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syscallfilter.py")
    code = ("import ctypes, importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('f', {path!r}); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); m.install(); libc = ctypes.CDLL(None, use_errno=True); "
            "sys.exit(0 if libc.unshare(0x10000000) != 0 and ctypes.get_errno() == 1 else 1)")
    try:
        return subprocess.run([sys.executable, "-I", "-S", "-c", code], timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


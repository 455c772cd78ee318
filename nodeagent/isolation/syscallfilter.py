"""The workload's seccomp filter: the system calls a tenant's workload has no use for and an attacker has.

Installed by the workload's init (confine.py) after it dropped privileges, so it covers the init and the
command it starts; the kernel keeps it across fork and exec and no process can remove it. Built with
libseccomp (the library runc, Docker and systemd use), called through ctypes so that it also works in the
init, which runs with the standard library only. A denied call fails with EPERM; nothing is killed, so
programs that probe a call (glibc, Python, CUDA) carry on.

What is denied (a deny list over Docker's default allow list, whose spirit it follows: a workload keeps
everything an ordinary program, Python, PyTorch, llama.cpp or vLLM uses):

- reading or writing another process's memory or state: ptrace, process_vm_readv/writev, kcmp,
  process_madvise, pidfd_getfd;
- new namespaces (unprivileged user namespaces are the way to most kernel privilege escalations):
  unshare, setns, and clone with any CLONE_NEW* flag; clone3 answers ENOSYS, as under Docker, so libc
  falls back to clone, whose flags the filter can read;
- the kernel and the host: kernel modules, kexec, reboot, swapon/off, mount and friends, pivot_root,
  chroot, the clock, acct, quotactl, syslog, ioperm/iopl, lookup_dcookie, the new mount API (fsopen,
  fsmount, move_mount, open_tree, mount_setattr, fspick);
- kernel attack surface no workload needs: bpf, perf_event_open, userfaultfd, keyctl, add_key,
  request_key, open_by_handle_at/name_to_handle_at (the classic container escape), vm86,
  io_uring (outside Docker's default since 2023).

Filter it with `WorkloadIsolation.seccomp` (on by default where libseccomp is present; secure mode refuses
to start a workload without it when the host has it, and logs its absence otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "process_madvise", "pidfd_getfd",
    "unshare", "setns",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
    "acct", "quotactl", "quotactl_fd", "syslog", "ioperm", "iopl", "lookup_dcookie",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at", "vm86", "vm86old", "nfsservctl",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
# every CLONE_NEW* flag: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME(0x80)
CLONE_NEW_MASK = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class FilterError(RuntimeError):
    pass


def load_library():
    """libseccomp, or None when the host has none."""
    for name in ("libseccomp.so.2", ctypes.util.find_library("seccomp")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.restype = ctypes.c_int
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(ArgCmp)]
        lib.seccomp_load.restype = ctypes.c_int
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        return lib
    return None


def install(lib=None) -> list[str]:
    """Install the filter on the calling thread (and what it forks and execs); returns the denied calls this
    kernel's architecture has (a name it lacks, such as vm86 on x86-64, is skipped)."""
    lib = lib or load_library()
    if lib is None:
        raise FilterError("libseccomp is not installed (Debian/Ubuntu: libseccomp2)")
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise FilterError("seccomp_init failed")
    eperm = scmp_act_errno(errno.EPERM)
    denied: list[str] = []
    try:
        def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return False
            arr = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if rc != 0:
                raise FilterError(f"seccomp_rule_add({name}): {errno.errorcode.get(-rc, rc)}")
            return True

        for name in DENIED:
            if rule(eperm, name):
                denied.append(name)
        # clone: flags are its first argument on x86-64 and arm64; any namespace flag is refused
        for bit in _bits(CLONE_NEW_MASK):
            rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, bit, bit))
        denied.append("clone(CLONE_NEW*)")
        if rule(scmp_act_errno(errno.ENOSYS), "clone3"):
            denied.append("clone3 (ENOSYS)")
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            raise FilterError(f"seccomp_load: {errno.errorcode.get(-rc, rc)}")
    finally:
        lib.seccomp_release(ctx)
    return denied


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(64) if mask >> i & 1]

"""The workload's init: builds its private view, drops privileges, runs the command.

    python -I -S confine.py [--env-fd E] --status-fd N SPEC.json -- CMD ARGS...

Started by the shim (nodeagent/shim.py) as root, after the shim unshared a PID namespace, so
this process is PID 1 of the workload's namespace. In order:

1. joins the workload's cgroups (writes "0" to each `cgroup_procs` file), so all it starts counts;
2. unshares its mount (and IPC) namespace, makes every mount private, mounts a fresh /proc; with
   `net` in the spec's namespaces (gpumesh.io/network=none) also a network namespace, whose only
   interface, loopback, it brings up (127.0.0.1 and ::1 work inside; nothing of the host is reachable);
   with `"network": "isolated"` it then waits for the agent to give it `eth0` (its bridge address);
3. builds a private /dev (tmpfs: null, zero, full, random, urandom, tty, the slice's GPU nodes bound
   in from the host or the simulated host's stand-ins) and a private /dev/shm (the slice's shm
   directory, into which the agent links the slice's mesh segments);
4. hides the agent's state directory, the checkpoint store and its key file, the agent user's
   home (empty tmpfs or /dev/null over them) and binds in only what the workload needs: the
   runtimes the operator exposes (read-only, at their own path, e.g. a Python under the hidden
   home), its own directory as /tmp, the MPS pipe directory inside it;
5. switches to the tenant's uid/gid with no supplementary groups and sets no_new_privs, then installs
   the seccomp filter (syscallfilter.py, loaded by path before the mounts change) when the spec says so;
6. forks the command, reaps every orphan of the namespace, and when the command ends writes
   `{"exit_code", "signal"}` (or `"error"`) to the status fd and exits: the kernel then kills
   whatever the command left behind in the namespace.

The command runs with the environment in descriptor E (the workload's, as JSON, from the shim); this init
itself runs with the agent's (it is root until the switch: a tenant's LD_PRELOAD never reaches it).

Signals from the agent (SIGTERM to the process group) reach the command directly; this init
keeps a handler for them so it survives to report how the command ended.

Standard library only (it runs by path, with -I -S, before the package is importable).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import warnings  # noqa: F401 - os.execvpe imports it, after the uid switch (the stdlib may be unreadable then)

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
BASE_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
LIBC = ctypes.CDLL(None, use_errno=True)


class ConfineError(RuntimeError):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)}")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(LIBC.mount(src.encode() if src else None, target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None), f"mount {src} on {target}")


def _touch(path: str, directory: bool) -> None:
    if directory:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _bind_fd(fd: int, target: str, directory: bool, rdonly: bool = False) -> None:
    _touch(target, directory)
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    if rdonly:
        mount(None, target, None, MS_BIND | 0x20 | MS_RDONLY | MS_NOSUID)      # 0x20: MS_REMOUNT


def setup_mounts(spec: dict) -> None:
    ns = spec.get("namespaces", [])
    flags = ((CLONE_NEWNS if "mount" in ns else 0) | (CLONE_NEWIPC if "ipc" in ns else 0)
             | (CLONE_NEWNET if "net" in ns else 0))
    if flags:
        _check(LIBC.unshare(flags), "unshare")
    if "net" in ns:
        loopback_up()
        if spec.get("network") == "isolated":
            wait_for_interface("eth0", float(spec.get("network_wait_seconds", 60)))
    if "mount" not in ns:
        return
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if "pid" in ns:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # what stays visible, opened before anything covers it
    opened: list[tuple[int, str, bool]] = []
    for name in BASE_DEVICES:
        if os.path.exists(f"/dev/{name}"):
            opened.append((os.open(f"/dev/{name}", os.O_PATH), f"/dev/{name}", False))
    for dev in spec.get("devices", []):
        opened.append((os.open(dev["source"], os.O_PATH), "/dev/" + dev["name"], False))
    shm = spec.get("shm_dir")
    shm_fd = os.open(shm, os.O_PATH | os.O_DIRECTORY) if shm else -1
    binds = [(os.open(b["source"], os.O_PATH), b["target"], os.path.isdir(b["source"]), bool(b.get("readonly")))
             for b in spec.get("binds", [])]
    # the private /dev
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    for fd, target, is_dir in opened:
        _bind_fd(fd, target, is_dir)
        os.close(fd)
    os.makedirs("/dev/shm", exist_ok=True)
    if shm_fd >= 0:
        mount(f"/proc/self/fd/{shm_fd}", "/dev/shm", None, MS_BIND)
        mount(None, "/dev/shm", None, MS_BIND | 0x20 | MS_NOSUID | MS_NODEV)
        os.close(shm_fd)
    else:
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for link, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"/dev/{link}")
    # hide the agent's files
    for path in spec.get("mask", []):
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
        elif os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)
    for fd, target, is_dir, rdonly in binds:
        _bind_fd(fd, target, is_dir, rdonly)
        os.close(fd)
    # a bound-in runtime may contain something masked (a state dir under the exposed code): mask it again
    bound = [b["target"].rstrip("/") + "/" for b in spec.get("binds", [])]
    for path in spec.get("mask", []):
        if any(path.startswith(b) for b in bound):
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
            elif os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)


def loopback_up() -> None:
    """Bring up `lo` of the (new, empty) network namespace: SIOCSIFFLAGS with IFF_UP, as `ip link set lo
    up` does; the kernel then gives it 127.0.0.1/8 and ::1."""
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH", req[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def wait_for_interface(name: str, timeout: float) -> None:
    """An isolated workload: the agent moves one end of a veth pair in, names it `name`, gives it the
    workload's address and brings it up (nodeagent/isolation/bridge.py); the command starts after that."""
    import fcntl
    import socket
    import struct
    import time
    SIOCGIFADDR = 0x8915
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        while True:
            try:
                req = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", name.encode(), 0))
                flags = struct.unpack("16sH", req[:18])[1]
                fcntl.ioctl(s, SIOCGIFADDR, struct.pack("16sH22x", name.encode(), socket.AF_INET))
                if flags & IFF_UP:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfineError(f"the agent did not give the workload its network interface ({name}) "
                                   f"within {timeout:g} s")
            time.sleep(0.01)


def load_filter():
    """syscallfilter.py beside this file, by path (this init runs with -I -S: no package imports); loaded
    before the mounts change, which may hide the code's directory."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syscallfilter.py")
    spec = importlib.util.spec_from_file_location("gpumesh_syscallfilter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def drop_privileges(spec: dict) -> None:
    uid, gid = int(spec["uid"]), int(spec["gid"])
    if uid == 0 or gid == 0:
        raise ConfineError("refusing to run a workload as root")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if spec.get("no_new_privs", True):
        _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
        raise ConfineError("the uid switch did not take")


STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_received: list[int] = []
_child: list[int] = []


def _on_stop(sig: int, _frame) -> None:
    """A stop signal: remembered (one before the command started means: do not start it), and
    passed to the command (it usually got it already, through the process group)."""
    _received.append(sig)
    for pid in _child:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _exec(cmd: list[str], env: dict[str, str] | None):
    if env is None:
        os.execvp(cmd[0], cmd)
    os.execvpe(cmd[0], cmd, env)       # the program is found on the workload's own PATH


def read_env(fd: int) -> dict[str, str] | None:
    """The workload's environment from descriptor `fd` (JSON, the shim's --env-fd), closed once read."""
    if fd < 0:
        return None
    chunks, offset = [], 0
    try:
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    env = json.loads(b"".join(chunks))
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("the workload's environment is not an object of strings")
    return env


def _spawn(cmd: list[str], workdir: str, env: dict[str, str] | None = None) -> int:
    """fork + exec (stop signals blocked around the fork, so none falls between the check and the
    child); an exec failure comes back through a close-on-exec pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for sig in STOPS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
            _exec(cmd, env)
        except OSError as e:
            os.write(w, f"{e.errno}".encode())
        finally:
            os._exit(127)
    os.close(w)
    _child.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    err = os.read(r, 64)
    os.close(r)
    if err:
        os.waitpid(pid, 0)
        raise FileNotFoundError(int(err), os.strerror(int(err)), cmd[0])
    return pid


def main(argv: list[str]) -> int:
    env_fd = -1
    if argv[:1] == ["--env-fd"]:
        env_fd, argv = int(argv[1]), argv[2:]
        os.set_inheritable(env_fd, False)        # the command never gets it
    status_fd = int(argv[argv.index("--status-fd") + 1])
    rest = argv[argv.index("--status-fd") + 2:]
    spec_path, cmd = rest[0], rest[2:] if rest[1:2] == ["--"] else rest[1:]

    def report(doc: dict) -> None:
        try:
            os.write(status_fd, json.dumps(doc).encode())
        except OSError:
            pass

    os.set_inheritable(status_fd, False)         # the command never gets it
    os.umask(0o022)     # the shim's 077 is for its own files; mount points made here must be traversable
    for sig in STOPS:            # the shim started us with them blocked; they stay so until the fork
        signal.signal(sig, _on_stop)
    try:
        env = read_env(env_fd)
        with open(spec_path, encoding="utf-8") as f:
            spec = json.load(f)
        for procs in spec.get("cgroup_procs", []):
            with open(procs, "w", encoding="ascii") as f:
                f.write("0")
        syscalls = load_filter() if spec.get("seccomp") else None
        setup_mounts(spec)
        os.chdir(spec.get("workdir") or "/")
        drop_privileges(spec)
        if syscalls is not None:
            syscalls.install()
    except (OSError, ConfineError, ValueError, KeyError, ImportError, RuntimeError) as e:
        msg = f"gpumesh: cannot confine the workload: {e}"
        print(msg, file=sys.stderr, flush=True)
        report({"exit_code": 126, "signal": 0, "error": msg[len("gpumesh: "):]})
        return 126
    if "pid" not in spec.get("namespaces", []):
        # no PID namespace (a workload that CRIU must be able to dump): no init is needed, the
        # command replaces this process (its pid is the workload's, its status the shim's child's)
        for sig in STOPS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
        try:
            _exec(cmd, env)
        except OSError as e:
            print(f"gpumesh: cannot start {cmd[0]!r}: {e.strerror}", file=sys.stderr, flush=True)
            report({"exit_code": 127, "signal": 0, "error": f"cannot start {cmd[0]!r}: {e.strerror}"})
            return 127
    pending = signal.sigpending() & set(STOPS)
    if pending or _received:        # stopped before the command started: it never runs
        sig = min(pending or set(_received))
        report({"exit_code": 128 + sig, "signal": int(sig)})
        return 128 + sig
    try:
        child = _spawn(cmd, spec.get("workdir") or "/", env)
    except OSError as e:
        print(f"gpumesh: cannot start {cmd[0]!r}: {e.strerror}", file=sys.stderr, flush=True)
        report({"exit_code": 127, "signal": 0, "error": f"cannot start {cmd[0]!r}: {e.strerror}"})
        return 127
    while True:
        try:
            pid, status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            report({"exit_code": 0, "signal": 0})
            return 0
        if pid == child:
            rc = os.waitstatus_to_exitcode(status)
            report({"exit_code": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else 0})
            return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

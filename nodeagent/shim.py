"""The supervisor between the agent and a workload process.

    python nodeagent/shim.py --env-fd N --pid-file W.pid --exit-file W.exit --log-file W.log -- CMD ARGS...

It starts CMD (stdout and stderr appended to the log file, its environment
the JSON object in descriptor N: the shim's own is the agent's, for it runs as
root and the workload's is the tenant's), writes CMD's pid, waits for it and writes its exit status, so the
status survives an agent that restarts or dies meanwhile. The agent starts the
shim in a session of its own; stopping a workload signals that whole process
group. The shim outlives SIGTERM/SIGINT/SIGHUP (its child gets them through the
group) so it can record how the child ended; SIGKILL of the group ends both and
leaves no exit file, which the agent reads as "killed".

With `--restore-pidfile P` the shim adopts a process instead of starting one (transparent
migration, mesh/checkpoint/criu.py): CMD is a `criu restore --restore-detached --pidfile P`
command; `{logfd}` in it becomes the log file's descriptor (passed on, for `--inherit-fd`). The
shim is a child subreaper, so the restored process becomes its child once criu exits; then it
is followed as above (pid file, exit file). A failed restore is recorded as the exit status.

With `--confine SPEC` (the agent's isolation plan, nodeagent/isolation/plan.py) the shim unshares
a PID namespace and starts CMD under `nodeagent/isolation/confine.py`, the namespace's init, which
builds the private view, switches to the tenant's uid and runs CMD; the pid file then names that
init (the root of the workload's process tree, what CRIU dumps), and the exit status comes from
it through a pipe.

Standard library only: it runs by path, before anything of the package is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def _write(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_env(fd: int) -> dict[str, str] | None:
    """The workload's environment from descriptor `fd` (a memfd the agent wrote, read from its start without
    moving its offset, so it can be passed on to confine.py); None without one (`fd` < 0)."""
    if fd < 0:
        return None
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    env = json.loads(b"".join(chunks))
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("the workload's environment is not an object of strings")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpumesh-shim")
    parser.add_argument("--env-fd", type=int, default=-1, help="descriptor of the workload's environment (JSON)")
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--exit-file", required=True)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--restore-pidfile", default="")
    parser.add_argument("--confine", default="")
    parser.add_argument("--real-ids", default="", help="UID:GID: criu restore runs with these real ids "
                        "(effective root), see nodeagent/isolation/criu_ids.py")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    os.umask(0o077)          # its pid and exit files are the agent's alone (the workload sets its own umask)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no command after --")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)   # a handler, not SIG_IGN: the child gets default dispositions
    if args.restore_pidfile:
        return _adopt(args, cmd)        # the restored process has its environment from the images
    try:
        env = read_env(args.env_fd)
    except (OSError, ValueError) as e:
        _write(args.exit_file, {"exit_code": 126, "signal": 0, "finished_at": time.time(),
                                "error": f"cannot read the workload's environment: {e}"})
        return 126
    if args.confine:
        return _confined(args, cmd)
    with open(args.log_file, "ab", buffering=0) as log:
        try:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            log.write(f"gpumesh: cannot start {cmd[0]!r}: {e.strerror}\n".encode())
            _write(args.exit_file, {"exit_code": 127, "signal": 0, "finished_at": time.time(),
                                    "error": f"cannot start {cmd[0]!r}: {e.strerror}"})
            return 127
        _write(args.pid_file, {"pid": child.pid, "started_at": time.time()})
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
    doc = {"exit_code": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else 0, "finished_at": time.time()}
    _write(args.exit_file, doc)
    return 0


CONFINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "isolation", "confine.py")
CLONE_NEWPID = 0x20000000


def _confined(args: argparse.Namespace, cmd: list[str]) -> int:
    def fail(why: str) -> int:
        _write(args.exit_file, {"exit_code": 126, "signal": 0, "finished_at": time.time(), "error": why})
        return 126
    try:
        with open(args.confine, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        return fail(f"cannot read the confinement plan: {e}")
    if "pid" in spec.get("namespaces", []):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWPID) != 0:
            return fail(f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}")
    r, w = os.pipe()
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    with open(args.log_file, "ab", buffering=0) as log:
        # The init has no handler yet when it starts (a PID namespace's init ignores such signals):
        # it starts with them blocked, so a stop that comes early stays pending until it can act on it.
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            env_fd = [] if args.env_fd < 0 else ["--env-fd", str(args.env_fd)]     # the workload's, for its exec
            child = subprocess.Popen([sys.executable, "-I", "-S", CONFINE, *env_fd, "--status-fd", str(w),
                                      args.confine, "--", *cmd], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, pass_fds=(w, *([args.env_fd] if env_fd else [])))
        except OSError as e:
            return fail(f"cannot start the workload's init: {e.strerror}")
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        os.close(w)
        _write(args.pid_file, {"pid": child.pid, "started_at": time.time(), "confined": True})
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    try:
        doc = json.loads(data) if data else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):      # the init was killed (SIGKILL of the group) or said nothing
        doc = {"exit_code": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else 0}
    doc = {"exit_code": int(doc.get("exit_code", 0)), "signal": int(doc.get("signal", 0)),
           "finished_at": time.time(), **({"error": str(doc["error"])} if doc.get("error") else {})}
    _write(args.exit_file, doc)
    return 0


def _adopt(args: argparse.Namespace, cmd: list[str]) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER: the detached restored process is ours
    with open(args.log_file, "ab", buffering=0) as log:
        fd = log.fileno()
        argv = [a.replace("{logfd}", str(fd)) for a in cmd]
        preexec = None
        if args.real_ids:
            uid, gid = (int(x) for x in args.real_ids.split(":"))

            def preexec() -> None:
                os.setresgid(gid, 0, 0)
                os.setresuid(uid, 0, 0)
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               pass_fds=(fd,), preexec_fn=preexec)
            rc, err = r.returncode, r.stderr.decode(errors="replace").strip()[-500:]
        except OSError as e:
            rc, err = 127, e.strerror or str(e)
        try:
            with open(args.restore_pidfile, encoding="utf-8") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pid = 0
    if rc != 0 or not pid:
        _write(args.exit_file, {"exit_code": 127, "signal": 0, "finished_at": time.time(),
                                "error": f"criu restore failed (status {rc}): {err or 'see restore.log'}"})
        return 127
    _write(args.pid_file, {"pid": pid, "started_at": time.time(), "restored": True})
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:       # not ours after all (no subreaper): follow it from outside
            while os.path.exists(f"/proc/{pid}"):
                time.sleep(0.2)
            _write(args.exit_file, {"exit_code": 0, "signal": 0, "finished_at": time.time(),
                                    "error": "the restored process ended (its status is unknown)"})
            return 0
    rc = os.waitstatus_to_exitcode(status)
    _write(args.exit_file, {"exit_code": rc if rc >= 0 else 128 - rc, "signal": -rc if rc < 0 else 0,
                            "finished_at": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
